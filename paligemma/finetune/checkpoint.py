"""Training checkpoints: a complete HF-layout model folder plus the state needed to resume exactly.

    out/checkpoint-STEP/
        config.json, model.safetensors        the (merged) weights: load_model / transformers read it
        tokenizer.model, preprocessor_config.json, ...   copied from the base model folder
        adapter/adapter_config.json, adapter/adapter_model.safetensors   LoRA runs only (peft's format;
                                               in a subfolder: transformers would apply adapter files found
                                               next to the weights a second time)
        trainer_state.json                     step, data position, schedule, RNG states, config
        optimizer.safetensors                  AdamW moments and step counts, each rank's torch RNG state

Weights and optimizer state are stored unsharded and keyed by parameter name, whatever the run
(one process, DDP or FSDP), so any of them resumes from any other's checkpoint.
Nothing is pickled: tensors go to safetensors, everything else to JSON, so resuming from a
checkpoint of unknown origin cannot run code. A checkpoint, like `final/`, is written to a
temporary folder and swapped into place in one step (atomic_files.write_folder), so a run killed at
any moment leaves the previous complete folder or the new one, never a half-written one that
`--resume` or a user would pick.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic_files import write_folder
from ..loading import load_model
from ..model import PaliGemma
from ..vqvae import MASK_CODEC_FILE
from . import lora
from .distributed import (
    DistEnv,
    all_gather_tensor,
    barrier,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_state,
)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"
# Files of a checkpoint folder besides the weights, copied so the folder loads on its own.
PROCESSOR_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json", "chat_template.json",
                   MASK_CODEC_FILE)  # not a processor file, but part of a checkpoint that answers `segment`


def save_model_folder(model: PaliGemma, directory: Path, model_dir: str | Path | None,
                      extra_files: tuple[str, ...] = ()) -> None:
    """Weights (adapters merged) in HF layout, the adapters themselves for LoRA, the processor files, and
    `extra_files` (paths of files the base folder lacks, e.g. a mask codec), copied under their names."""
    directory.mkdir(parents=True, exist_ok=True)
    if lora.has_lora(model):
        lora.save_adapter(model, directory / ADAPTER_DIR)
        lora.merge_lora(model).save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    if model_dir is not None:
        for name in PROCESSOR_FILES:
            source = Path(model_dir) / name
            if source.is_file():
                shutil.copy2(source, directory / name)
    for source in map(Path, extra_files):
        shutil.copy2(source, directory / source.name)


def gathered_model(model: PaliGemma) -> PaliGemma | None:
    """`model` itself, or for an FSDP-sharded one a plain full copy on rank 0 (None elsewhere). Collective."""
    if not is_sharded(model):
        return model
    state = full_model_state(model)
    if not state:
        return None
    with torch.device("meta"):
        plain = PaliGemma(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_checkpoint(directory: Path, model: PaliGemma, optimizer: torch.optim.Optimizer, state: dict,
                    model_dir: str | Path | None, env: DistEnv, extra_files: tuple[str, ...] = ()) -> None:
    """Write a resumable checkpoint (see the module docstring) atomically into `directory`.

    Called on every rank (gathering sharded weights is collective); rank 0 writes.
    """
    plain = gathered_model(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    torch_rng = all_gather_tensor(torch.get_rng_state(), env)  # each rank's: LoRA dropout draws differ per rank
    if env.is_main:
        def fill(tmp: Path) -> None:
            save_model_folder(plain, tmp, model_dir, extra_files)
            tensors, groups = _flatten_optimizer(optimizer_state)
            tensors.update({f"rng.torch.{rank}": state for rank, state in enumerate(torch_rng)})
            save_file(tensors, tmp / OPTIMIZER_FILE)
            trainer_state = dict(state, optimizer_param_groups=groups, rng=_python_numpy_rng())
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n", encoding="utf-8")

        write_folder(directory, fill)
    barrier(env)


def save_final(directory: Path, model: PaliGemma, model_dir: str | Path | None, env: DistEnv,
               extra_files: tuple[str, ...] = ()) -> None:
    """The trained model as a loadable folder (`save_model_folder`), swapped in for `directory` in one step.
    Collective (an FSDP model is gathered); rank 0 writes."""
    plain = gathered_model(model)
    if env.is_main:
        write_folder(directory, lambda tmp: save_model_folder(plain, tmp, model_dir, extra_files))
    barrier(env)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The `checkpoint-STEP` folder with the highest STEP that holds a trainer state, if any."""
    found = []
    for path in Path(out_dir).glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def load_checkpoint(directory: Path, model: PaliGemma, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Restore weights (or adapters), optimizer and RNG states from `directory`; return its trainer state.

    Every rank reads the files; a sharded model keeps its own shard of them.
    """
    directory = Path(directory)
    state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    model_state = None
    if lora.has_lora(model):
        lora.load_adapter(model, directory / ADAPTER_DIR)
    else:
        model_state = load_model(directory, dtype=model.dtype).state_dict()
    tensors = load_file(directory / OPTIMIZER_FILE)
    rng = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("rng.torch.")]}
    # A checkpoint of a run with fewer processes has no state for this rank: take rank 0's.
    torch.set_rng_state(rng.get(f"rng.torch.{rank}", rng["rng.torch.0"]))
    load_full_state(model, optimizer, model_state, _unflatten_optimizer(tensors, state["optimizer_param_groups"]))
    _restore_python_numpy_rng(state["rng"])
    return state


# ---------------------------------------------------------------------- optimizer state <-> tensors + JSON

def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """{'state': {param name: {name: tensor}}, 'param_groups': [...]} -> ({'optim/param/name': tensor}, groups)."""
    tensors = {}
    for param, entry in state_dict["state"].items():
        for name, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{param}/{name}"] = value.detach().cpu().contiguous()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        _, param, name = key.split("/")
        state.setdefault(param, {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in groups]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- RNG states as JSON

def _python_numpy_rng() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _restore_python_numpy_rng(saved: dict) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
