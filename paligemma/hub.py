"""Find a checkpoint directory: a local path, or a Hugging Face Hub repo id resolved through the cache.

huggingface_hub is optional: only a name that is not a local directory needs it. HF_HUB_OFFLINE=1 is
honoured by huggingface_hub itself (cache only, no network).
"""

from __future__ import annotations

from pathlib import Path

from .errors import PaliGemmaError

# What a PaliGemma checkpoint needs from a repo: config, weights, tokenizer, preprocessing.
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


class CheckpointError(PaliGemmaError, ValueError):
    """A checkpoint cannot be found, read or trusted; the message says which and what to do."""


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The local directory holding checkpoint `name_or_path`, downloading it from the Hub if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json "
                              "and the .safetensors files")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name} is not a directory (and not a Hub repo id like 'google/paligemma-3b-pt-224')")
    try:
        import huggingface_hub
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(f"{name} is not a local directory, and huggingface_hub is not installed to fetch it "
                              "from the Hub: `pip install huggingface_hub`, or pass a local checkpoint directory"
                              ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=name, allow_patterns=_CHECKPOINT_FILES))
    except GatedRepoError:
        raise CheckpointError(f"{name} is gated on the Hugging Face Hub: accept its license on the model page, "
                              "then log in with `hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name} is neither a local directory nor a Hub repo you can access "
                              "(check the spelling, or log in for a private repo)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name} is not in the local Hugging Face cache and cannot be downloaded "
                              "(offline: HF_HUB_OFFLINE is set or there is no network)") from None
    except Exception as err:  # network failures and the like, reported in one line
        raise CheckpointError(f"could not fetch {name} from the Hugging Face Hub: {err}") from None
