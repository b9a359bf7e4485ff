"""PaliGemma checkpoints in Hugging Face layout: checkpoint keys <-> our parameter names, strict filling, saving.

Key layouts understood (all map onto our parameter names by prefix):

| writer | vision | decoder | LM head |
|---|---|---|---|
| transformers 4.x (the Hub's) | vision_tower.vision_model.* | language_model.model.* | language_model.lm_head.* |
| transformers 5.x files | vision_tower.* | language_model.* | lm_head.* |
| transformers 5.x in memory | model.vision_tower.* | model.language_model.* | lm_head.* |
| ours (= 4.x, for compatibility) | | | |

Filling is strict: every parameter must be filled and every tensor in the files used, with the right
shape, or the error names the offenders. The model class is not imported here (model.py's
`save_pretrained` calls `save_model`); file access is safetensors_io.py's.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .hub import CheckpointError
from .quantize import quantization_entry
from .safetensors_io import FLOAT_DTYPES, checkpoint_files, read_tensors, tensor_headers, write_shards

# Checkpoint key prefix -> our prefix, tried in order on each key.
_KEY_RULES = [
    (re.compile(r"^model\."), ""),  # 5.x in-memory names: model.vision_tower..., model.language_model...
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]


def canonical_key(key: str) -> str:
    """Map a checkpoint tensor name from any supported layout to our parameter name."""
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key, count=1)
    return key


def hub_key(name: str) -> str:
    """Our parameter name -> the transformers 4.x / Hub name that every transformers version reads."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


def load_weights(model: nn.Module, directory: Path, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", headers: list | None = None) -> None:
    """Fill `model` (a PaliGemma built on the meta device) from the safetensors files in `directory`.

    dtype=None keeps the checkpoint's dtype (the one most of its weights are stored in), except
    float16, which is upcast to float32 with a warning (Gemma's activations overflow float16; ask
    for dtype=torch.float16 to keep it). Tensors are assigned, not copied (see
    safetensors_io.read_tensors), so peak memory stays near one copy. `headers`: those
    `checkpoint_headers` returned, if the caller has them. A quantized checkpoint is refused.
    """
    refuse_quantized(model.config, directory)
    if headers is None:
        headers = checkpoint_headers(directory)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    sources = match_tensors(headers, expected, model.config.tie_word_embeddings)
    if dtype is None:
        dtype = default_dtype(majority_dtype(sources), f"{directory} stores its weights")
    state = {}
    for file, names in _group_by_file(sources).items():
        state.update(read_tensors(file, names, dtype, device))
    model.load_state_dict(state, strict=True, assign=True)


def checkpoint_headers(directory: Path, config=None,
                       stem: str = "model") -> list[tuple[Path, str, tuple[int, ...], str]]:
    """(file, key, shape, dtype name) of every tensor of the checkpoint in `directory`, headers only.

    With `config` (a PaliGemmaConfig), its layer counts are checked against the tensors first, so a
    config.json that disagrees with its weights (say 6000 decoder layers) is refused before a model
    is built from it. `stem` names the weight files (safetensors_io.checkpoint_files).
    """
    headers = list(tensor_headers(checkpoint_files(directory, holds_weights=_holds_decoder_weights, stem=stem)))
    if config is not None:
        for field, prefix, what in (("text_config.num_hidden_layers", "language_model.layers.", "decoder"),
                                    ("vision_config.num_hidden_layers", "vision_tower.encoder.layers.", "vision")):
            tower = config.text if field.startswith("text") else config.vision
            stored = _layer_count(headers, prefix)
            if stored != tower.num_hidden_layers:
                raise CheckpointError(f"config.json {field} is {tower.num_hidden_layers} but the checkpoint holds "
                                      f"{stored} {what} layers: the config does not belong to these weights")
    return headers


def _layer_count(headers, prefix: str) -> int:
    """How many layers `prefix`N. the tensors hold (one more than the highest N)."""
    highest = -1
    for _, key, _, _ in headers:
        name = canonical_key(key)
        if name.startswith(prefix):
            number = name[len(prefix):].split(".", 1)[0]
            if number.isdigit():
                highest = max(highest, int(number))
    return highest + 1


def _holds_decoder_weights(keys: list[str]) -> bool:
    """Whether a safetensors file's tensor names include the decoder's: a PaliGemma weights file, not a
    mask codec, an optimizer state or a lone vision tower."""
    return any(canonical_key(key).startswith("language_model.") for key in keys)


def match_tensors(headers: Iterable[tuple[Path, str, tuple[int, ...], str]], expected: dict[str, tuple],
                  tied_head: bool) -> dict[str, tuple[Path, str, str, int]]:
    """Match every checkpoint tensor to a parameter; raise naming missing, unexpected and mis-shaped ones.

    headers: (file, key, shape, dtype name) per tensor; expected: parameter name -> shape.
    Returns parameter name -> (file, key, dtype name, element count).
    """
    sources, unexpected, misshaped = {}, [], []
    for file, key, shape, dtype in headers:
        name = canonical_key(key)
        if name == "lm_head.weight" and tied_head:
            continue  # a stored copy of the tied head: the embedding table is the head
        if name not in expected:
            unexpected.append(key)
            continue
        if shape != expected[name]:
            misshaped.append(f"{key}: checkpoint {shape} vs model {expected[name]}")
        if name in sources:
            unexpected.append(f"{key} (duplicate of {sources[name][1]})")
        sources[name] = (file, key, dtype, math.prod(shape))
    missing = sorted(set(expected) - set(sources))
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json (" + "; ".join(problems) + ")")
    return sources


def default_dtype(stored: torch.dtype, what: str) -> torch.dtype:
    """The dtype to load weights stored mostly in `stored` as, when no dtype is asked for: `stored`, except
    float16, which becomes float32 with a warning that starts with `what` (Gemma's activations overflow
    float16). Float and quantized checkpoints alike."""
    if stored != torch.float16:
        return stored
    warnings.warn(f"{what} in float16: loading them as float32, because Gemma's activations overflow float16 "
                  "(pass dtype=torch.float16 to keep it, or torch.bfloat16 for half the memory)", stacklevel=4)
    return torch.float32


def majority_dtype(sources: dict) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's parameters (`sources` as `match_tensors` returns)."""
    counts = Counter()
    for _, _, dtype, numel in sources.values():
        counts[dtype] += numel
    name = counts.most_common(1)[0][0]
    if name not in FLOAT_DTYPES:
        raise CheckpointError(f"checkpoint weights are stored as {name}; expected a floating-point dtype")
    return FLOAT_DTYPES[name]


def _group_by_file(sources: dict) -> dict[Path, list[tuple[str, str]]]:
    grouped: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key, _, _) in sources.items():
        grouped.setdefault(file, []).append((name, key))
    return grouped


def save_model(model: nn.Module, directory: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """config.json + model.safetensors (or shards and an index past `max_shard_bytes`), Hub key layout.

    A quantized model (quantize.py) is written as model-quantized.safetensors (or its shards): its
    quantized tensors in their portable layout, the rest as they are, and a `quantization` entry in
    config.json (quantized_checkpoint.py reads them back).
    """
    # The state dict and config first: a model that cannot be saved raises before anything is written.
    tensors = {hub_key(name): t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    config = checkpoint_config(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_shards(tensors, directory, max_shard_bytes, stem=QUANTIZED_STEM if "quantization" in config else "model")


# A quantized checkpoint's weight files: transformers, which cannot read them, then finds no model.safetensors.
QUANTIZED_STEM = "model-quantized"


def checkpoint_config(model: nn.Module) -> dict:
    """The config.json of `model`: its HF config, its dtype and, for a quantized model, the `quantization` entry."""
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config.pop("quantization", None)  # the entry of the checkpoint it was loaded from, if any
    entry = quantization_entry(model)
    if entry is not None:
        config["quantization"] = entry
    return config


def refuse_quantized(config, directory: Path) -> None:
    """Raise if `config` (a PaliGemmaConfig) is a quantized checkpoint's, where float weights are expected."""
    entry = config.extra.get("quantization")
    if entry is not None:
        mode = entry.get("mode", "?") if isinstance(entry, dict) else "?"
        raise CheckpointError(f"{directory} is a quantized checkpoint ({mode}, config.json 'quantization'), not "
                              "float weights: paligemma.load_model reads it for inference on the CPU, but it cannot "
                              "be fine-tuned, converted or read by transformers; use the float checkpoint it was "
                              "quantized from")
