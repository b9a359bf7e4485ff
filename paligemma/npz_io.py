"""big_vision `.npz` files: read lazily (one array at a time), written atomically; bfloat16 as raw bits.

An `.npz` is a zip of `.npy` members named by the flat params-tree keys. Nothing here knows what the
keys mean (bigvision_npz.py maps them onto the model). Arrays are read with
`np.load(allow_pickle=False)` only: a member holding pickled objects is refused, never unpickled.
numpy has no bfloat16: jax's (ml_dtypes') bfloat16 arrays are saved as raw 2-byte void (`|V2`), read
back here as float32 (exactly: the bits are float32's upper half) and written the same way.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .hub import CheckpointError

VOID_BF16 = np.dtype("V2")  # how np.save stores an ml_dtypes bfloat16 array
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, VOID_BF16: torch.bfloat16}


class NpzArrays(Mapping):
    """A big_vision `.npz` as key -> array in the scanned layout ("params/" dropped, per-layer subtrees
    such as `encoderblock_3/...` or `llm/layers/3/...` stacked), each array read from the file when
    asked and not kept, so a conversion that takes one key at a time holds one array at a time.
    Only `np.load(allow_pickle=False)`: an object array is refused, never unpickled."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"big_vision checkpoint {self.path} does not exist")
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise CheckpointError(f"{self.path} is not a readable .npz checkpoint ({err})") from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{self.path} holds one array, not a big_vision params tree (.npz)")
        self._members = _members(self._npz.files)

    def __getitem__(self, key: str) -> np.ndarray:
        names, stacked = self._members[key]
        try:
            arrays = [self._npz[name] for name in names]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # pickled objects, truncation
            raise CheckpointError(f"{self.path}: {names[0]} is not readable ({err}); big_vision checkpoints are "
                                  "read with allow_pickle=False") from None
        return np.stack(arrays) if stacked else arrays[0]

    def __contains__(self, key) -> bool:  # Mapping's would read the array
        return key in self._members

    def __iter__(self):
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def dtype_sizes(self) -> list[tuple[np.dtype, int]]:
        """(dtype, element count) of every stored array, from the .npy headers (nothing is read)."""
        out = []
        for name in self._npz.files:
            with self._npz.zip.open(name + ".npy") as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(f)
            out.append((dtype, math.prod(shape)))
        return out

    def close(self) -> None:
        self._npz.close()

    def __enter__(self) -> "NpzArrays":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a big_vision `.npz`, read at once (`NpzArrays` reads them one by one)."""
    with NpzArrays(path) as arrays:
        return {key: arrays[key] for key in arrays}


def write_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write `arrays` as an uncompressed .npz, atomically (a temporary file renamed into place)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise CheckpointError(f"{path}: a big_vision checkpoint file name ends in .npz")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; remove it or choose another name")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append ".npz" to a name
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_UNSCANNED = [(re.compile(r"^img/Transformer/encoderblock_(\d+)/(.+)$"), "img/Transformer/encoderblock/"),
              (re.compile(r"^llm/layers/(\d+)/(.+)$"), "llm/layers/")]


def _members(files: list[str]) -> dict[str, tuple[list[str], bool]]:
    """Scanned key -> (the .npz members holding it, whether they are per-layer members to stack)."""
    members, groups = {}, {}
    for name in files:
        key = name.removeprefix("params/")
        for pattern, prefix in _UNSCANNED:
            if match := pattern.match(key):
                groups.setdefault(prefix + match.group(2), {})[int(match.group(1))] = name
                break
        else:
            members[key] = ([name], False)
    for key, layers in groups.items():
        if key in members or sorted(layers) != list(range(len(layers))):
            raise CheckpointError(f"{key}: per-layer tensors for layers {sorted(layers)}, expected 0..N-1 "
                                  "and no scanned tensor of the same name")
        members[key] = ([layers[i] for i in range(len(layers))], True)
    return members


def as_float(a: np.ndarray) -> np.ndarray:
    """bfloat16 raw bits (`|V2`) widened exactly to float32 (the bits are float32's upper half); floats unchanged."""
    if a.dtype == VOID_BF16:
        return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if a.dtype not in (np.float32, np.float16, np.float64):
        raise CheckpointError(f"unsupported dtype {a.dtype} in the big_vision checkpoint (floats only)")
    return a


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the array np.savez writes: bfloat16 as its raw bits (`|V2`, as jax saves it)."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(VOID_BF16)
    if t.dtype not in _NUMPY_DTYPES:
        raise CheckpointError(f"cannot write {t.dtype} tensors to a big_vision checkpoint (float32, float16, bfloat16)")
    return t.contiguous().numpy()


def majority_dtype(arrays: Mapping[str, np.ndarray]) -> torch.dtype:
    """The torch dtype most of the arrays' elements are stored in (an NpzArrays' from its headers)."""
    counts = Counter()
    sizes = arrays.dtype_sizes() if isinstance(arrays, NpzArrays) else [(a.dtype, a.size) for a in arrays.values()]
    for dtype, size in sizes:
        counts[dtype] += size
    name = counts.most_common(1)[0][0]
    return _TORCH_DTYPES.get(name, torch.float32)
