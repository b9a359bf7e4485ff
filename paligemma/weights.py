"""Load and save PaliGemma checkpoints in Hugging Face layout (config.json + safetensors).

Loading builds the model on the meta device (no memory), then assigns each tensor as it is read
from the memory-mapped safetensors files, so peak memory stays near one copy of the weights.
It is strict: every parameter must be filled and every tensor in the files used, with the right
shape, or the error names the offenders. Pickle checkpoints (.bin/.pt) are refused: unpickling
runs arbitrary code.

Key layouts understood (all map onto our parameter names by prefix):

| writer | vision | decoder | LM head |
|---|---|---|---|
| transformers 4.x (the Hub's) | vision_tower.vision_model.* | language_model.model.* | language_model.lm_head.* |
| transformers 5.x files | vision_tower.* | language_model.* | lm_head.* |
| transformers 5.x in memory | model.vision_tower.* | model.language_model.* | lm_head.* |
| ours (= 4.x, for compatibility) | | | |
"""

from __future__ import annotations

import json
import mmap
import re
import warnings
import weakref
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PaliGemmaConfig
from .hub import CheckpointError, resolve_checkpoint
from .model import PaliGemma

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None, optimize: bool = False) -> PaliGemma:
    """Load a PaliGemma checkpoint directory (or Hub repo id) in HF layout, in eval mode.

    dtype=None keeps the checkpoint's dtype (the one most of its weights are stored in).
    optimize=True rewrites the model for fast inference (fused, prepacked matrices; see inference.py):
    same outputs, but it can no longer be trained. quantize="int8" | "int4" (CPU) also makes the
    decoder's weights and the LM head weight-only quantized, implying optimize.
    """
    directory = resolve_checkpoint(path)
    config = PaliGemmaConfig.from_json_file(directory / "config.json")
    files = checkpoint_files(directory)
    with torch.device("meta"):
        model = PaliGemma(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    tied_head = config.tie_word_embeddings

    sources = _tensor_sources(files, expected, tied_head)  # our name -> (file, checkpoint key)
    if dtype is None:
        dtype = _majority_dtype(sources)
    state = {}
    for file, names in _group_by_file(sources).items():
        state.update(_read_tensors(file, names, dtype, device))
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the only references now, so optimizing can free each float weight
    if quantize is not None or optimize:
        from .inference import optimize_for_inference
        optimize_for_inference(model, quantize=quantize)
    return model.eval()


_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _read_tensors(file: Path, names: list[tuple[str, str]], dtype: torch.dtype,
                  device: str | torch.device) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file, as `dtype` on `device`.

    Tensors already in `dtype` on the CPU are views of a private (copy-on-write) memory map of the
    file: no copy, nothing read until used, and pages shared with the OS page cache, so resident
    memory stays at one copy of the weights and loading takes no time. Other tensors are converted
    from the map, which is released once the file is done.
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        if any(header[key]["dtype"] not in _TORCH_DTYPES for _, key in names):
            with safe_open(file, framework="pt", device="cpu") as handle:
                return {name: handle.get_tensor(key).to(device=device, dtype=dtype) for name, key in names}
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _remember_map(mapped)
    base = 8 + header_len
    out = {}
    for name, key in names:
        info = header[key]
        start, end = info["data_offsets"]
        source = _TORCH_DTYPES[info["dtype"]]
        count = (end - start) // source.itemsize
        if count * source.itemsize != end - start or count != _numel(tuple(info["shape"])):
            raise CheckpointError(f"{file}: tensor {key} has {end - start} bytes for shape {info['shape']}")
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype, device=device)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": the map is copy-on-write, writes never reach the file
            tensor = torch.frombuffer(mapped, dtype=source, count=count, offset=base + start).view(info["shape"])
        out[name] = tensor.to(device=device, dtype=dtype)
        if out[name].data_ptr() != tensor.data_ptr():  # converted or moved: the mapped source is done with
            release_file_pages(tensor)
    return out


# (address, length, map) of each weight file mapped by _read_tensors, while the map is alive.
_FILE_MAPS: list[tuple[int, int, weakref.ref]] = []


def _remember_map(mapped: mmap.mmap) -> None:
    _FILE_MAPS[:] = [entry for entry in _FILE_MAPS if entry[2]() is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        address = torch.frombuffer(mapped, dtype=torch.uint8, count=1).data_ptr()
    _FILE_MAPS.append((address, len(mapped), weakref.ref(mapped)))


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages of a weight that is a view of a checkpoint's memory map; returns bytes dropped.

    For a model that only reads its weights (inference): once a weight has been copied into another form
    (quantized), its pages in the map still count in the process's resident memory. MADV_DONTNEED hands
    them back; the map is private and never written, so a later read (a weight still in use, like the
    embedding table behind a quantized head) faults the file's bytes back in from the page cache.
    Only whole pages inside the tensor are dropped; tensors outside the maps are left alone (returns 0).
    """
    if not hasattr(mmap, "MADV_DONTNEED") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for address, length, ref in _FILE_MAPS:
        mapped = ref()
        if mapped is None or not (address <= start and end <= address + length):
            continue
        first = -(-(start - address) // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only
        last = (end - address) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
        return max(0, last - first)
    return 0


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checking the index and refusing pickles."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r}); re-download the checkpoint") from None
        pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(_pickle_message(directory, pickles))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{directory} is missing shard(s) {missing} listed in {INDEX_FILE}; "
                                  "the download is incomplete: fetch the checkpoint again")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_message(directory, pickles))
    if found:
        raise CheckpointError(f"{directory} has several .safetensors files but no {INDEX_FILE} saying which "
                              "belong to the model")
    raise CheckpointError(f"{directory} holds no model weights: expected {SINGLE_FILE} or shards with {INDEX_FILE}")


def _pickle_message(directory: Path, names: list[str]) -> str:
    return (f"{directory} stores weights as pickle files ({', '.join(names)}); they are refused because loading "
            "a pickle can run arbitrary code. Convert them to safetensors in a trusted environment, e.g. "
            "transformers' `model.save_pretrained(dir, safe_serialization=True)`")


def _tensor_sources(files: list[Path], expected: dict[str, tuple], tied_head: bool) -> dict:
    """Match every checkpoint tensor to a parameter; raise naming missing, unexpected and mis-shaped ones."""
    sources, unexpected, misshaped = {}, [], []
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); re-download it") from None
        with handle:
            for key in handle.keys():
                name = canonical_key(key)
                if name == "lm_head.weight" and tied_head:
                    continue  # a stored copy of the tied head: the embedding table is the head
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != expected[name]:
                    misshaped.append(f"{key}: checkpoint {shape} vs model {expected[name]}")
                if name in sources:
                    unexpected.append(f"{key} (duplicate of {sources[name][1]})")
                dtype = handle.get_slice(key).get_dtype()
                sources[name] = (file, key, dtype, _numel(shape))
    missing = sorted(set(expected) - set(sources))
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json (" + "; ".join(problems) + ")")
    return sources


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _majority_dtype(sources: dict) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's parameters."""
    counts = Counter()
    for _, _, dtype, numel in sources.values():
        counts[dtype] += numel
    name = counts.most_common(1)[0][0]
    if name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"checkpoint weights are stored as {name}; expected a floating-point dtype")
    return _SAFETENSORS_DTYPES[name]


def _group_by_file(sources: dict) -> dict[Path, list[tuple[str, str]]]:
    grouped: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key, _, _) in sources.items():
        grouped.setdefault(file, []).append((name, key))
    return grouped


def save_model(model: PaliGemma, directory: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """config.json + model.safetensors (or shards and an index past `max_shard_bytes`), Hub key layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype_name = str(model.dtype).removeprefix("torch.")
    config = model.config.to_hf_dict()
    config["torch_dtype"] = dtype_name
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tensors = {hub_key(name): t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
