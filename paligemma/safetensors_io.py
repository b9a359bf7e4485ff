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
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic_files import write_text_atomically, written_atomically
from .hub import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype name -> torch dtype, for the floating types weights are stored in, and for all of them.
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
DTYPES = {**FLOAT_DTYPES, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def checkpoint_files(directory: Path, holds_weights: Callable[[list[str]], bool] | None = None,
                     stem: str = "model") -> list[Path]:
    """The safetensors files of a checkpoint directory, checking the index and refusing pickles.

    `stem` names the files: STEM.safetensors, or shards listed in STEM.safetensors.index.json; "model"
    is Hugging Face's, "model-quantized" a quantized checkpoint's (quantized_checkpoint.py).

    Every file must lie in `directory` itself: an index naming `../x`, `/abs/x` or `sub/x`, or a symbolic
    link leading out of the folder, is refused (a Hub cache snapshot's links into its own `blobs/` are
    fine). Without an index or model.safetensors, the one .safetensors file whose tensor names pass
    `holds_weights` is taken (a mask codec or optimizer state next to the weights is not the model).
    """
    index, single = directory / f"{stem}.safetensors.index.json", directory / f"{stem}.safetensors"
    if index.exists():
        files = [directory / name for name in _index_names(directory, index)]
    elif single.is_file():
        files = [single]
    elif stem != "model":
        raise CheckpointError(f"{directory} holds neither {single.name} nor shards with {index.name}")
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
        raise CheckpointError(f"{directory} is missing shard(s) {missing} listed in {index.name}; "
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


def read_tensors(file: Path, names: list[tuple[str, str]], dtype: torch.dtype | None,
                 device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors `names` [(name to return it under, key in the file)] of one safetensors file, as `dtype`
    (None: each in its own) on `device`.

    Tensors already in `dtype` on the CPU are views of a private (copy-on-write) memory map of the
    file: no copy, nothing read until used, and pages shared with the OS page cache, so resident
    memory stays at one copy of the weights and loading takes no time. Other tensors are converted
    from the map, which is released once the file is done.
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        if any(header[key]["dtype"] not in DTYPES for _, key in names):
            with safe_open(file, framework="pt", device="cpu") as handle:
                return {name: handle.get_tensor(key).to(device=device, dtype=dtype) for name, key in names}
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    _remember_map(mapped)
    base = 8 + header_len
    out = {}
    for name, key in names:
        info = header[key]
        start, end = info["data_offsets"]
        source = DTYPES[info["dtype"]]
        target = source if dtype is None else dtype
        count = (end - start) // source.itemsize
        if count * source.itemsize != end - start or count != math.prod(info["shape"]):
            raise CheckpointError(f"{file}: tensor {key} has {end - start} bytes for shape {info['shape']}")
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=target, device=device)
            continue
        with warnings.catch_warnings():
            # "non-writable buffer": the map is copy-on-write, writes never reach the file
            warnings.simplefilter("ignore")
            tensor = torch.frombuffer(mapped, dtype=source, count=count, offset=base + start).view(info["shape"])
        out[name] = tensor.to(device=device, dtype=target)
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


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int, stem: str = "model") -> None:
    """`tensors` (CPU, contiguous) as STEM.safetensors, or as shards of at most `max_shard_bytes` and their index.

    Weight files already in `directory` (model*.safetensors, their indexes) are replaced. Each file is
    written under a temporary name and renamed into place, so a crash never leaves a truncated file
    under a name a loader reads; the index, if any, is written last, so a half-written set of shards
    has none and is refused.
    """
    names, shards = _plan_shards({key: _nbytes(t.shape, t.dtype) for key, t in tensors.items()}, max_shard_bytes,
                                 stem)
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model*.safetensors.index.json")):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    for name, keys in zip(names, shards, strict=True):
        with written_atomically(directory / name) as tmp:
            save_file({key: tensors[key] for key in keys}, tmp, metadata={"format": "pt"})
    _write_index(directory, stem, names, shards, sum(t.numel() * t.element_size() for t in tensors.values()))


class StreamedCheckpoint:
    """A checkpoint written one tensor at a time, each straight to its place in its shard: memory holds the
    tensor being written, never a shard. The names, shapes and dtypes are known in advance:

        with new_folder(out) as tmp:
            writer = StreamedCheckpoint(tmp, {key: (shape, dtype), ...}, max_shard_bytes)
            for key in writer.keys:
                writer.write(key, make_tensor(key))      # in any order
            writer.close()                              # checks every tensor was written, writes the index

    The files are what `write_shards` writes (safetensors, shards named by `stem`, tensors aligned to
    their element size), made in a new folder: a half-written one is never taken for a checkpoint.
    """

    def __init__(self, directory: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, stem: str = "model"):
        self.directory, self.stem, self.layout = Path(directory), stem, layout
        self.keys = list(layout)
        sizes = {key: _nbytes(shape, dtype) for key, (shape, dtype) in layout.items()}
        self.names, self.shards = _plan_shards(sizes, max_shard_bytes, stem)
        self.total = sum(sizes.values())
        self.places: dict[str, tuple[Path, int]] = {}  # key -> (file, offset of its bytes)
        for name, keys in zip(self.names, self.shards, strict=True):
            # Widest elements first: every tensor starts at a multiple of its element size.
            keys = sorted(keys, key=lambda key: -layout[key][1].itemsize)
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for key in keys:
                shape, dtype = layout[key]
                header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                               "data_offsets": [offset, offset + sizes[key]]}
                offset += sizes[key]
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            with open(self.directory / name, "wb") as f:
                f.write(len(encoded).to_bytes(8, "little") + encoded)
                f.truncate(8 + len(encoded) + offset)
            for key in keys:
                self.places[key] = (self.directory / name, 8 + len(encoded) + header[key]["data_offsets"][0])
        self.missing = set(self.keys)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.layout[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{key}: expected {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        file, offset = self.places[key]
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            with open(file, "r+b") as f:
                f.seek(offset)
                f.write(memoryview(data))
        self.missing.discard(key)

    def close(self) -> None:
        if self.missing:
            raise ValueError(f"{len(self.missing)} tensor(s) never written, e.g. {sorted(self.missing)[:3]}")
        _write_index(self.directory, self.stem, self.names, self.shards, self.total)


@contextlib.contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder next to `path` to fill, renamed to `path` once filled; removed on failure.
    `path` must not exist: nothing is overwritten."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another output folder or remove it first")
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int, stem: str) -> tuple[list[str], list[list[str]]]:
    """(file names, keys per file): keys in order, a new shard when the next would pass `max_shard_bytes`."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = ([f"{stem}.safetensors"] if len(shards) == 1
             else [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    return names, shards


def _write_index(directory: Path, stem: str, names: list[str], shards: list[list[str]], total: int) -> None:
    """STEM.safetensors.index.json for more than one shard, written last."""
    if len(names) == 1:
        return
    index = {"metadata": {"total_size": total},
             "weight_map": {key: name for name, keys in zip(names, shards, strict=True) for key in keys}}
    write_text_atomically(directory / f"{stem}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
