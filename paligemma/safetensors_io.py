"""Safetensors checkpoint files: find them, read tensors through a private memory map, write shards.

Nothing here knows the model: tensors are named by their keys in the files, and `checkpoint_layout.py`
maps those onto parameters. Pickle weights (.bin/.pt) are refused, never opened: unpickling runs
arbitrary code.

Reading maps each file copy-on-write: a tensor already in the wanted dtype on the CPU is a view of
the map (no copy, pages shared with the OS page cache), so loading costs no time and resident memory
stays at one copy of the weights. `release_file_pages` hands a mapped weight's pages back to the OS
once it has been copied into another form (quantized, fused).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .hub import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype name -> torch dtype, for the floating types weights are stored in.
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def checkpoint_files(directory: Path, holds_weights: Callable[[list[str]], bool] | None = None) -> list[Path]:
    """The safetensors files of a checkpoint directory, checking the index and refusing pickles.

    Every file must lie in `directory` itself: an index naming `../x`, `/abs/x` or `sub/x`, or a symbolic
    link leading out of the folder, is refused (a Hub cache snapshot's links into its own `blobs/` are
    fine). Without an index or model.safetensors, the one .safetensors file whose tensor names pass
    `holds_weights` is taken (a mask codec or optimizer state next to the weights is not the model).
    """
    index = directory / INDEX_FILE
    if index.exists():
        files = [directory / name for name in _index_names(directory, index)]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        files = _only_weights_file(directory, holds_weights)
    for file in files:
        _check_inside(file, directory)
    return files


def _index_names(directory: Path, index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        if not all(isinstance(name, str) for name in names):
            raise TypeError("weight_map values must be file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index ({err!r}); "
                              "re-download the checkpoint") from None
    outside = [name for name in names if not _is_plain_name(name)]
    if outside:
        raise CheckpointError(f"{index} names files outside the checkpoint folder ({', '.join(map(repr, outside))}); "
                              "an index may only list file names in its own folder: this checkpoint cannot be "
                              "trusted, fetch it again from its source")
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(_pickle_message(directory, pickles))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is missing shard(s) {missing} listed in {INDEX_FILE}; "
                              "the download is incomplete: fetch the checkpoint again")
    return names


def _is_plain_name(name: str) -> bool:
    """A file name with no folder part: not absolute, no separator, not "." or ".."."""
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _check_inside(file: Path, directory: Path) -> None:
    """Refuse a weights file that is, or links to, a file outside `directory`."""
    real, root = file.resolve(), directory.resolve()
    if real.parent == root:
        return
    # huggingface_hub's cache: <repo>/snapshots/<revision>/<name> links to <repo>/blobs/<hash>.
    if root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs":
        return
    raise CheckpointError(f"{file} leads to {real}, outside the checkpoint folder {directory}; weights are only "
                          "read from the checkpoint's own folder: copy the file there if you trust it")


def _only_weights_file(directory: Path, holds_weights: Callable[[list[str]], bool] | None) -> list[Path]:
    """The single .safetensors file of `directory` holding model weights; a clear error otherwise."""
    found = sorted(directory.glob("*.safetensors"))
    weights = []
    for path in found:
        keys = None if holds_weights is None else _keys_or_none(path)
        if keys is None or holds_weights(keys):  # an unreadable file stays, to be reported as unreadable
            weights.append(path)
    if len(weights) == 1:
        return weights
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(_pickle_message(directory, pickles))
    if weights:
        raise CheckpointError(f"{directory} has several .safetensors files with model weights "
                              f"({', '.join(p.name for p in weights)}) but no {INDEX_FILE} saying which belong "
                              "to the model")
    others = f" ({', '.join(p.name for p in found)} hold other things)" if found else ""
    raise CheckpointError(f"{directory} holds no model weights: expected {SINGLE_FILE} or shards with "
                          f"{INDEX_FILE}{others}")


def _keys_or_none(path: Path) -> list[str] | None:
    """The tensor names in a safetensors file's header, or None if it cannot be read."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return list(handle.keys())
    except Exception:  # safetensors raises several types for a bad header; the loader reports it later
        return None


def _pickle_message(directory: Path, names: list[str]) -> str:
    return (f"{directory} stores weights as pickle files ({', '.join(names)}); they are refused because loading "
            "a pickle can run arbitrary code. Convert them to safetensors in a trusted environment, e.g. "
            "transformers' `model.save_pretrained(dir, safe_serialization=True)`")


def tensor_headers(files: list[Path]) -> Iterator[tuple[Path, str, tuple[int, ...], str]]:
    """(file, key, shape, safetensors dtype name) of every tensor in `files`, reading headers only."""
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); re-download it") from None
        with handle:
            for key in handle.keys():
                info = handle.get_slice(key)
                yield file, key, tuple(info.get_shape()), info.get_dtype()


def read_tensors(file: Path, names: list[tuple[str, str]], dtype: torch.dtype,
                 device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors `names` [(name to return it under, key in the file)] of one safetensors file, as `dtype` on `device`.

    Tensors already in `dtype` on the CPU are views of a private (copy-on-write) memory map of the
    file: no copy, nothing read until used, and pages shared with the OS page cache, so resident
    memory stays at one copy of the weights and loading takes no time. Other tensors are converted
    from the map, which is released once the file is done.
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        if any(header[key]["dtype"] not in FLOAT_DTYPES for _, key in names):
            with safe_open(file, framework="pt", device="cpu") as handle:
                return {name: handle.get_tensor(key).to(device=device, dtype=dtype) for name, key in names}
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _remember_map(mapped)
    base = 8 + header_len
    out = {}
    for name, key in names:
        info = header[key]
        start, end = info["data_offsets"]
        source = FLOAT_DTYPES[info["dtype"]]
        count = (end - start) // source.itemsize
        if count * source.itemsize != end - start or count != math.prod(info["shape"]):
            raise CheckpointError(f"{file}: tensor {key} has {end - start} bytes for shape {info['shape']}")
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype, device=device)
            continue
        with warnings.catch_warnings():
            # "non-writable buffer": the map is copy-on-write, writes never reach the file
            warnings.simplefilter("ignore")
            tensor = torch.frombuffer(mapped, dtype=source, count=count, offset=base + start).view(info["shape"])
        out[name] = tensor.to(device=device, dtype=dtype)
        if out[name].data_ptr() != tensor.data_ptr():  # converted or moved: the mapped source is done with
            release_file_pages(tensor)
    return out


# (address, length, map) of each weight file mapped by read_tensors, while the map is alive.
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


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """`tensors` (CPU, contiguous) as model.safetensors, or as shards of at most `max_shard_bytes` and their index.

    Weight files already in `directory` are replaced. Each file is written under a temporary name and
    renamed into place, so a crash never leaves a truncated file under a name a loader reads; the
    index, if any, is written last, so a half-written set of shards has none and is refused.
    """
    shards: list[dict] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    for name, shard in zip(names, shards, strict=True):
        with _written_atomically(directory / name) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
    if len(shards) == 1:
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard}}
    with _written_atomically(directory / INDEX_FILE) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to, renamed to `path` (one step on POSIX) once written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
