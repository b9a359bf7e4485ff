"""This project's C++ CPU kernels, compiled for the instruction set of the running CPU.

The source is one file, `csrc/kernels.cpp`, compiled on first use (about 40 s, cached under
~/.cache/torch_extensions) once per *ISA level*:

| level | CPUs | what the kernels use |
|---|---|---|
| `avx512bf16` | AMD Zen 4/5, Intel Cooper Lake, Sapphire Rapids and later | AVX-512, `vdpbf16ps` bf16 dot products |
| `avx2` | AMD Zen 1-3, Intel Haswell and later client/server chips | AVX2 + FMA, bf16 widened by a 16-bit shift |
| `none` | anything else (ARM64, no compiler, kernels switched off) | nothing of ours: plain PyTorch |

`level()` is the level in force: the best the CPU supports (probed once from torch and the CPU
flags), capped by the environment variable `PALIGEMMA_ISA=avx512bf16|avx2|none` or, in tests and
benchmarks, by `with use_level("avx2"): ...`. `ops()` returns the compiled module of that level, or
None when there is none (level `none`, no compiler, a build error: then the next level down is
tried and a warning logged once). Modules built by `inference.py` / `quantize.py` take `ops()` once,
when they are built, so a model keeps the kernels it was built with.

The module's functions (x: (M, K) bf16 activations with M <= MAX_ROWS; weights row-major (N, K)):

    gemv_bf16(x, w (N, K) bf16) -> (M, N) bf16
    gemv_int8(x, q (N, K) int8, scales (N, K/G) f32) -> (M, N) bf16
    gemv_int4(x, packed (N, K/2) u8, scales_zeros (K/G, N, 2) bf16) -> (M, N) bf16   (64-row layout)
    dequantize_int8(q, scales, out (N, K) bf16 | f32)                  out = q * scale
    quantize_int8(w (N, K) bf16 | f32, q, scales)                       fills q and scales
    dequantize_int4(packed, scales_zeros, n0, out (K, n) bf16 | f32)   weight rows n0..n0+n, transposed
    isa() -> the level it was compiled for

Decode steps are chains of matrix-vector products whose cost is streaming the weights: the GEMVs
read each weight once, one row at a time front to back (one sequential stream the hardware
prefetcher follows), widen it to float32 in registers and accumulate in float32, over every thread
torch may use. `python benchmarks/bench_kernels.py` measures them against `F.linear` (BENCHMARKS.md).

`native_bf16()` says whether bf16 matrix products are fast here (AVX512-BF16 or AMX, not capped
below `avx512bf16`); without it, torch's bf16 matmul falls to a slow path and `inference.py`
multiplies bf16 weights in float32 instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 8  # the GEMVs take 1..MAX_ROWS input rows: decode steps of up to 8 sequences
LEVELS = ("avx512bf16", "avx2", "none")  # best first
_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_FLAGS = {
    "avx512bf16": ["-DPALIGEMMA_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                   "-mfma", "-mf16c"],
    "avx2": ["-DPALIGEMMA_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
_override: str | None = None  # set by use_level()


@functools.cache
def cpu_level() -> str:
    """The best level this CPU runs: from torch's CPU capability (which honours ATEN_CPU_CAPABILITY,
    so an emulated AVX2 machine reads as one) and the AVX512-BF16 flag."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "none"
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if capability == "AVX512" and torch.cpu._is_avx512_bf16_supported():
        return "avx512bf16"
    if capability in ("AVX512", "AVX2"):  # torch's AVX2 level requires FMA as well
        return "avx2"
    return "none"


def _check_level(name: str, source: str) -> str:
    if name not in LEVELS:
        raise ValueError(f"{source} must be one of {'|'.join(LEVELS)}, got {name!r}")
    return name


def _lower(a: str, b: str) -> str:
    return max(a, b, key=LEVELS.index)


def level() -> str:
    """The ISA level in force: the CPU's, capped by PALIGEMMA_ISA and by use_level()."""
    chosen = cpu_level()
    cap = os.environ.get("PALIGEMMA_ISA", "").strip().lower()
    if cap:
        chosen = _lower(chosen, _check_level(cap, "PALIGEMMA_ISA"))
    if _override is not None:
        chosen = _lower(chosen, _override)
    return chosen


def supported_levels() -> list[str]:
    """Every level this machine can run under the cap in force (PALIGEMMA_ISA), best first: what the
    tests sweep."""
    return list(LEVELS[LEVELS.index(level()):])


@contextlib.contextmanager
def use_level(name: str):
    """Cap the ISA level inside the block (never raises it above the CPU's): for tests and benchmarks."""
    global _override
    previous = _override
    _override = _check_level(name, "level") if previous is None else _lower(previous, name)
    try:
        yield
    finally:
        _override = previous


def native_bf16() -> bool:
    """Whether bf16 matrix products run at hardware speed here (else multiply bf16 weights in float32)."""
    return level() == "avx512bf16"


def ops():
    """The compiled kernels of the level in force (the next level down if that build fails), or None."""
    for name in LEVELS[LEVELS.index(level()):]:
        if name == "none":
            return None
        module = _build(name)
        if module is not None:
            return module
    return None


@functools.cache
def _build(name: str):
    try:
        from torch.utils.cpp_extension import load
        # -fopenmp: at::parallel_for is an OpenMP loop in torch's CPU builds; without the flag its pragma is
        # ignored and every kernel runs on one thread. The extension then shares torch's libgomp.
        return load(f"paligemma_kernels_{name}", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", *_FLAGS[name]], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler or headers: the next level down still works
        log.warning("paligemma: the %s kernels could not be built, falling back (%s)", name, err)
        return None


# ------------------------------------------------------------------ multiplying by a weight a block at a time

# Prefill multiplies by weights converted (dequantized, or widened from bf16 to float32) a block of rows
# at a time into a per-thread buffer of about this many bytes: a fresh tensor per block would page-fault
# its way through new memory, and a whole converted matrix would cost its full size.
BLOCK_BUFFER_BYTES = 8 << 20
_scratch = threading.local()


def scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A reused per-thread (rows, cols) buffer of `dtype`: its contents are garbage until written."""
    numel = shape[0] * shape[1]
    buffer = getattr(_scratch, str(dtype), None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_scratch, str(dtype), buffer)
    return buffer[:numel].view(shape)


def matmul_by_row_blocks(x: torch.Tensor, out_features: int, in_features: int, fill_block,
                         transposed: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, for a weight W (N, K) held in some compact form.

    `fill_block(start, buffer)` writes weight rows start .. start + rows into `buffer`, a scratch tensor
    of x's dtype shaped (rows, K), or (K, rows) when `transposed`; rows is a multiple of 64 (the int4
    dequantizer fills whole 64-row blocks) except for the last block.
    """
    rows_per_64 = BLOCK_BUFFER_BYTES // (x.element_size() * in_features) // 64
    block = 64 * max(1, rows_per_64)
    out = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, block):
        rows = min(block, out_features - start)
        if transposed:
            out[:, start:start + rows] = x @ fill_block(start, scratch((in_features, rows), x.dtype))
        else:
            out[:, start:start + rows] = F.linear(x, fill_block(start, scratch((rows, in_features), x.dtype)))
    return out
