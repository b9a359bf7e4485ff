"""Quantized checkpoints: quantized once, memory-mapped at every load.

    load_model("paligemma2-10b-pt-448", quantize="int4").save_pretrained("pg2-10b-int4")
    paligemma quantize --model paligemma2-10b-pt-448 --to int4 --out pg2-10b-int4   # the same, a tensor at a time
    model = load_model("pg2-10b-int4")       # a memory map of the files: no float copy, no quantizing

A quantized checkpoint folder holds config.json with a `quantization` entry (mode, bits, group size,
the portable layout's name and version: quantize.quantization_entry) and model-quantized.safetensors
(or its shards and model-quantized.safetensors.index.json) with

- the decoder's quantized layers, fused as the inference layout fuses them (`self_attn.qkv`,
  `self_attn.o_proj`, `mlp.gate_up`, `mlp.down_proj`) and the LM head, in quantize.py's portable
  layout, the same whatever CPU wrote it (`...qkv.packed`, `...qkv.scales_zeros` for int4;
  `...qweight`, `...scales` for int8);
- everything else (vision tower, projector, embedding table, norms) as float tensors under their Hub
  names.

transformers cannot read these files (it finds no model.safetensors), nor can any of our paths that
expect float weights (checkpoint_layout.refuse_quantized): they run, on the CPU, as loaded here.

Loading builds the quantized model on the meta device (`optimize_for_inference` of a meta model gives
every layer its shapes and no data), matches the files' tensors against it strictly, and assigns
them: views of the files' memory maps, except where the CPU reads int4 in torch's own layout
(repacked, quantize.py). `quantize_checkpoint` writes the same files from a float checkpoint a
tensor at a time, never holding the model in memory.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .checkpoint_layout import (
    QUANTIZED_STEM,
    checkpoint_config,
    checkpoint_headers,
    default_dtype,
    hub_key,
    majority_dtype,
    match_tensors,
    refuse_quantized,
)
from .config import PaliGemmaConfig
from .hub import CheckpointError, resolve_checkpoint
from .inference import optimize_for_inference
from .kernels import ops
from .model import PaliGemma
from .quantize import BITS, GROUP_SIZES, LAYOUT_VERSION, LAYOUTS, MODES, QuantizedLinear, quantize_weights
from .safetensors_io import (
    DTYPES,
    INDEX_FILE,
    StreamedCheckpoint,
    checkpoint_files,
    new_folder,
    read_tensors,
    release_file_pages,
)


def quantization_scheme(config: PaliGemmaConfig) -> tuple[str, int] | None:
    """(mode, group size) of a quantized checkpoint's config, None for a float checkpoint's; a
    CheckpointError for an entry this version cannot read."""
    entry = config.extra.get("quantization")
    if entry is None:
        return None
    mode = entry.get("mode") if isinstance(entry, dict) else None
    if mode not in MODES or entry.get("format") != "paligemma" or entry.get("bits") != BITS[mode]:
        raise CheckpointError(f"config.json 'quantization' is {entry!r}, not a paligemma quantized checkpoint "
                              f"(format 'paligemma', mode one of {MODES})")
    if entry.get("layout") != LAYOUTS[mode] or entry.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"config.json 'quantization' stores {mode} weights in layout "
                              f"{entry.get('layout')!r} version {entry.get('layout_version')!r}; this paligemma "
                              f"reads {LAYOUTS[mode]!r} version {LAYOUT_VERSION}: upgrade paligemma, or quantize the "
                              "float checkpoint again")
    if entry.get("group_size") not in GROUP_SIZES:
        raise CheckpointError(f"config.json 'quantization' group_size {entry.get('group_size')!r} is not one of "
                              f"{GROUP_SIZES}")
    return mode, entry["group_size"]


def quantized_skeleton(config: PaliGemmaConfig, mode: str, group_size: int | None,
                       dtype: torch.dtype) -> PaliGemma:
    """The quantized model of `config` on the meta device: its float parts in `dtype`, every tensor named
    and shaped as a quantized checkpoint stores it, no data."""
    with torch.device("meta"):
        model = PaliGemma(config)
    return optimize_for_inference(model.to(dtype), quantize=mode, group_size=group_size)


def load_quantized_model(directory: Path, config: PaliGemmaConfig, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu", quantize: str | None = None) -> PaliGemma:
    """The quantized checkpoint in `directory` (config: its config.json) as a model for inference on the CPU.

    dtype converts the float parts (None: as stored); quantize, if given, must be the stored mode.
    """
    mode, group_size = quantization_scheme(config)
    if quantize is not None and quantize != mode:
        raise CheckpointError(f"{directory} holds {mode} weights and cannot be re-quantized to {quantize}: load "
                              "it without quantize=, or quantize the float checkpoint it was made from")
    if torch.device(device).type != "cpu":
        raise CheckpointError(f"{directory} is a quantized checkpoint: it runs on the CPU only, not on {device}")
    headers = checkpoint_headers(directory, config, stem=QUANTIZED_STEM)
    if dtype is None:
        dtype = default_dtype(_float_dtype(headers), f"{directory} stores its float weights (vision tower, embedding, "
                              "norms)")
    model = quantized_skeleton(config, mode, group_size, dtype)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    sources = match_tensors(headers, expected, config.tie_word_embeddings)
    quantized: dict[str, dict[str, torch.Tensor]] = {}  # layer name -> its saved tensors
    for file in {file for file, *_ in sources.values()}:
        names = [(name, key) for name, (source, key, *_) in sources.items() if source == file]
        floats = [(name, key) for name, key in names if not _in_quantized_layer(model, name)]
        state = read_tensors(file, floats, dtype, device)
        state.update(read_tensors(file, [item for item in names if item not in floats], None, device))
        for name, tensor in state.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if isinstance(module, QuantizedLinear):
                quantized.setdefault(owner, {})[attr] = tensor
            elif attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
            else:
                module._buffers[attr] = tensor
    for owner, tensors in quantized.items():
        layer = model.get_submodule(owner)
        layer.load_portable(tensors)
        kept = {t.data_ptr() for t in layer.buffers()}
        for tensor in tensors.values():
            if tensor.data_ptr() not in kept:  # repacked: the mapped bytes are done with
                release_file_pages(tensor)
    return model.eval()


def _in_quantized_layer(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedLinear)


def _float_dtype(headers) -> torch.dtype:
    """The dtype of most of the float parts' values (their tensors are the `.weight`s and `.bias`es)."""
    counts = Counter()
    for _, key, shape, dtype in headers:
        if key.endswith((".weight", ".bias")) and dtype in DTYPES and DTYPES[dtype].is_floating_point:
            counts[DTYPES[dtype]] += torch.Size(shape).numel()
    if not counts:
        raise CheckpointError("a quantized checkpoint without float tensors (vision tower, embedding)")
    return counts.most_common(1)[0][0]


# ---------------------------------------------------------------------- writing one from a float checkpoint

def quantize_checkpoint(source: str | Path, out: str | Path, mode: str, group_size: int | None = None,
                        max_shard_bytes: int = 5 * 1024**3,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the float checkpoint `source` (folder or Hub repo id) quantized to `mode` into the new folder
    `out`, with its other files (tokenizer, preprocessor config, mask codec): the files `save_pretrained`
    of the quantized model writes, bit for bit.

    One tensor at a time: memory holds one layer's float weights (the parts it fuses, read from the
    source's memory map and released once quantized) and its quantized tensors, never the model.
    `out` appears once complete (written as a hidden sibling folder, then renamed); it must not exist.
    """
    directory = resolve_checkpoint(source)
    config = PaliGemmaConfig.from_json_file(directory / "config.json")
    refuse_quantized(config, directory)
    headers = checkpoint_headers(directory, config)
    with torch.device("meta"):
        float_model = PaliGemma(config)
    sources = match_tensors(headers, {n: tuple(p.shape) for n, p in float_model.state_dict().items()},
                            config.tie_word_embeddings)
    dtype = majority_dtype(sources)  # the source's: float parts are copied as they are
    model = quantized_skeleton(config, mode, group_size, dtype)
    layout = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}

    def read(name: str) -> torch.Tensor:
        file, key, *_ = sources[name]
        return read_tensors(file, [(name, key)], None, "cpu")[name]  # a view of the source's memory map

    kernels = ops()
    with new_folder(out) as tmp:
        writer = StreamedCheckpoint(tmp, {hub_key(name): spec for name, spec in layout.items()}, max_shard_bytes,
                                    QUANTIZED_STEM)
        done = set()
        for count, name in enumerate(layout, 1):
            owner, _, attr = name.rpartition(".")
            layer = model.get_submodule(owner)
            if not isinstance(layer, QuantizedLinear):
                tensor = read(name)
                writer.write(hub_key(name), tensor.to(layout[name][1]))
                release_file_pages(tensor)
            elif owner not in done:
                weights = [read(part) for part in _float_sources(owner, layer, config)]
                for attr, tensor in quantize_weights(weights, mode, layer.group_size, kernels).items():
                    writer.write(hub_key(f"{owner}.{attr}"), tensor)
                for weight in weights:
                    release_file_pages(weight)
                done.add(owner)
            if progress is not None:
                progress(count, len(layout))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(model), indent=2) + "\n", encoding="utf-8")
        weight_files = {path.name for path in checkpoint_files(directory)} | {INDEX_FILE, "config.json"}
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name not in weight_files and not path.name.startswith("."):
                shutil.copyfile(path, tmp / path.name)
    return Path(out)


def _float_sources(owner: str, layer: QuantizedLinear, config: PaliGemmaConfig) -> list[str]:
    """The float parameters a quantized layer of the skeleton stands for, by name: the projections it
    fuses (its `parts`), or the head (the embedding table when tied)."""
    if owner == "lm_head":
        return ["language_model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    parent = owner.rpartition(".")[0]
    return [f"{parent}.{part}.weight" for part, _ in layer.parts]
