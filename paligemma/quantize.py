"""Weight-only int8 / int4 quantization of linear layers, for CPU inference.

    QuantizedLinear(weight (N, K), "int8", group_size=256)(x (..., K)) -> (..., N)

- int8: symmetric per group of `group_size` input channels, scale = max|w| / 127, q in -127..127,
  stored row-major as int8 (N, K) with float32 scales (N, K/g): 1 byte/weight. Inputs of <= 8 rows
  (decode steps) go through `gemv_int8` of kernels.py, which widens the weights to bf16 in registers
  and streams ~2x the weights per second of bf16; larger inputs (prefill) are multiplied by blocks
  of rows dequantized to bf16 (`bf16(q * scale)`) with `F.linear`, at bf16 speed.
- int4: asymmetric per group (min/max -> scale, zero), 0.5 byte/weight, in torch's packed 4-bit layout.
  Decode steps run torch's kernel `aten._weight_int4pack_mm_for_cpu`, which dequantizes
  (q - 8) * scale + zero, q in 0..15; larger inputs (prefill) are multiplied by blocks of rows
  dequantized to bf16 by `dequantize_int4` of kernels.py (same values), as for int8.
  Scales and zeros are rounded to bf16 before the weights are quantized against them, so
  dequantization matches what the kernel computes.

Activations are cast to bf16 for the kernels (int4's float32 path is ~30x slower) and the result back
to the input dtype. Without the compiled kernels (no compiler, no AVX512-BF16), int8 falls back to
dequantizing with torch ops, which gives the same numbers slower, and int4 uses torch's kernel for
every input. A quantized layer cannot be saved back to a checkpoint: quantization is a load-time
transform of a float checkpoint.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PaliGemmaError
from .kernels import MAX_ROWS, dequantize_int4, dequantize_int8, gemv_int8, quantize_int8 as quantize_int8_kernel

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = {"int4": 64, "int8": 256}


class QuantizationError(PaliGemmaError, RuntimeError):
    """Quantized kernels unavailable on this machine, or a layer shape they cannot take."""


def check_available(mode: str) -> None:
    """Raise QuantizationError if `mode` cannot run here (int4 needs torch's packed 4-bit CPU kernels)."""
    if mode not in MODES:
        raise QuantizationError(f"quantize must be one of {MODES} or None, got {mode!r}")
    if mode == "int8":
        return  # the compiled kernel when there is one, torch ops otherwise
    try:
        q = torch.zeros(16, 64, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), packed, 32,
                                                    torch.zeros(2, 16, 2, dtype=torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        raise QuantizationError(f"weight-only quantization needs torch's packed int4 CPU kernels "
                                f"(aten._weight_int4pack_mm_for_cpu), unavailable here: {err}") from None


def choose_group_size(in_features: int, mode: str, group_size: int | None = None) -> int:
    """The requested (or default) group size, shrunk to one that divides `in_features`."""
    wanted = group_size or DEFAULT_GROUP_SIZE[mode]
    if wanted not in GROUP_SIZES:
        raise QuantizationError(f"group size must be one of {GROUP_SIZES}, got {wanted}")
    for size in sorted((g for g in GROUP_SIZES if g <= wanted), reverse=True):
        if in_features % size == 0:
            return size
    raise QuantizationError(f"cannot quantize a layer with {in_features} input features: "
                            f"it must be a multiple of {min(GROUP_SIZES)}")


def _pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 integers 0..15 -> torch's packed int4 CPU layout (N, K/2) uint8."""
    if q.shape[0] % 64 == 0 and _packs_like_torch():
        return _pack_64_row_blocks(q)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


_PACK_COLUMNS = 1024  # input columns per step of _pack_64_row_blocks: keeps its transposing copy in cache


def _pack_64_row_blocks(q: torch.Tensor) -> torch.Tensor:
    """The layout torch's AVX-512 int4 packer writes, with tensor ops (~5x faster than that packer).

    Rows go in blocks of 64, seen as four lanes of 16 rows; for each input column k a block stores
    32 bytes: (lane 2 << 4 | lane 0) for its 16 rows, then (lane 3 << 4 | lane 1).
    """
    n, k = q.shape
    lanes = q.view(n // 64, 4, 16, k)
    out = torch.empty(n // 64, k, 2, 16, dtype=torch.uint8)
    for start in range(0, k, _PACK_COLUMNS):
        cols = slice(start, start + _PACK_COLUMNS)
        pairs = lanes[:, 2:, :, cols] << 4 | lanes[:, :2, :, cols]  # (N/64, 2, 16, cols)
        out[:, cols] = pairs.permute(0, 3, 1, 2)
    return out.view(n, k // 2)


@functools.cache
def _packs_like_torch() -> bool:
    """Whether torch's int4 packer writes `_pack_64_row_blocks`'s layout here (its AVX-512 build does;
    its AVX2 and plain builds use others, and then `_pack` calls torch's packer)."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(expected, _pack_64_row_blocks(probe))


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group (N, K/g) scale and zero -> the kernel's (K/g, N, 2) bf16 tensor."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


# Rows are quantized in blocks small enough to stay in cache (10x faster than whole matrices, and no
# float32 copy of a 0.5 G-entry LM head). The packed int4 layout is blocked by 64 rows, so blocks of a
# multiple of 64 rows pack to the same bytes as the whole matrix (tested).
_ROW_BLOCK = 256

Weights = torch.Tensor | list[torch.Tensor]  # one (N, K) matrix, or matrices (N_i, K) stacked by rows


def _stacked_rows(weight: Weights) -> tuple[list[torch.Tensor], int, int]:
    """(the matrices, total rows N, columns K) of one matrix or of matrices fused by rows."""
    parts = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if any(part.dim() != 2 or part.shape[1] != parts[0].shape[1] for part in parts):
        shapes = [tuple(part.shape) for part in parts]
        raise QuantizationError(f"weights to fuse must be matrices of equal width, got {shapes}")
    return parts, sum(part.shape[0] for part in parts), parts[0].shape[1]


def _by_row_blocks(parts: list[torch.Tensor], group_size: int, quantize_block, outputs: list[torch.Tensor],
                   row_dims: list[int]) -> tuple[torch.Tensor, ...]:
    """Fill `outputs` (preallocated; rows along `row_dims`) with quantize_block(rows as float32, group_size)
    over the rows of `parts` stacked in order: fused projections are never concatenated in float."""
    if len(parts) > 1 and any(part.shape[0] % 64 for part in parts):
        parts = [torch.cat(parts)]  # a 64-row block of the packed layout would straddle two parts
    scratch = torch.empty(0)  # float32 rows, reused: a fresh tensor per block would page-fault each time
    offset = 0
    for part in parts:
        n = part.shape[0]
        block = _ROW_BLOCK if n % 64 == 0 else n
        for start in range(0, n, block):
            count = min(block, n - start)
            if scratch.shape[0] < count:
                scratch = torch.empty(count, part.shape[1])
            rows = slice(offset + start, offset + start + count)
            quantized = quantize_block(scratch[:count].copy_(part[start:start + count]), group_size)
            for out, dim, values in zip(outputs, row_dims, quantized):
                out[(slice(None),) * dim + (rows,)] = values
        offset += n
    return tuple(outputs)


def _int4_block(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 rows w (n, K), overwriting w."""
    n, k = w.shape
    w = w.view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # ~8x faster than aminmax over a short last dim
    scale = ((high - low) / 15).clamp_(min=1e-8).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()  # the value that q = 8 stands for
    q = w.sub_(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
    return _pack(q.view(n, k).to(torch.uint8)), _scales_zeros(scale, zero)


def _int8_block(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    w = w.view(n, k // group_size, group_size)
    scale = (w.abs().amax(-1) / 127).clamp_(min=1e-8)
    q = w.div(scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(n, k), scale


def quantize_int4(weight: Weights, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit, per group: returns (packed (N, K/2) uint8, scales_zeros (K/g, N, 2) bf16)."""
    parts, n, k = _stacked_rows(weight)
    outputs = [torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // group_size, n, 2, dtype=torch.bfloat16)]
    return _by_row_blocks(parts, group_size, _int4_block, outputs, [0, 1])


def quantize_int8(weight: Weights, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit, per group: returns (q (N, K) int8, scales (N, K/g) float32)."""
    parts, n, k = _stacked_rows(weight)
    outputs = [torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // group_size, dtype=torch.float32)]
    kernel = quantize_int8_kernel()
    if kernel is None or any(p.device.type != "cpu" or p.dtype not in (torch.bfloat16, torch.float32) for p in parts):
        return _by_row_blocks(parts, group_size, _int8_block, outputs, [0, 0])
    offset = 0
    for part in parts:  # the same arithmetic as _int8_block (tested), ~10x faster
        rows = slice(offset, offset + part.shape[0])
        kernel(part.contiguous(), outputs[0][rows], outputs[1][rows])
        offset += part.shape[0]
    return tuple(outputs)


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (n, K) bf16 = bf16(q * scale) for int8 rows q (n, K) and their scales (n, K/g)."""
    kernel = dequantize_int8()
    if kernel is not None:
        kernel(q, scales, out)
    else:
        n, k = q.shape
        out.copy_(q.view(n, scales.shape[1], -1).float().mul_(scales[..., None]).view(n, k))
    return out


# Prefill multiplies by int8 weights dequantized a block of rows at a time into a per-thread buffer of
# about this many bytes (a fresh tensor per block would page-fault its way through new memory).
_DEQUANT_BUFFER_BYTES = 4 << 20
_scratch = threading.local()


def _dequant_buffer(rows: int, in_features: int) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows * in_features:
        buffer = _scratch.buffer = torch.empty(rows * in_features, dtype=torch.bfloat16)
    return buffer[:rows * in_features].view(rows, in_features)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with int8 or int4 weights; inference only.

    `weight` is one (N, K) matrix, or a list of matrices (N_i, K) to fuse, stacked by rows (quantized
    part by part, never concatenated in float). `parts` names the HF projections fused into this one
    (for error messages and bookkeeping).
    """

    def __init__(self, weight: Weights, mode: str, group_size: int | None = None,
                 parts: list[tuple[str, int]] | None = None):
        super().__init__()
        if mode not in MODES:
            raise QuantizationError(f"quantize must be one of {MODES} or None, got {mode!r}")
        self.mode = mode
        matrices, self.out_features, self.in_features = _stacked_rows(weight)
        self.group_size = choose_group_size(self.in_features, mode, group_size)
        self.parts = parts or []
        if mode == "int8":
            self.qweight, self.scales = quantize_int8(matrices, self.group_size)
            return
        rows = -self.out_features % 16  # the int4 kernel packs rows in blocks of 16: pad with zero rows
        if rows:
            matrices = matrices + [matrices[0].new_zeros(rows, self.in_features)]
        self.packed, self.scales_zeros = quantize_int4(matrices, self.group_size)

    def inference_tensors(self):
        """The tensors this layer holds (not parameters or buffers: they must never be trained or cast)."""
        return [self.qweight, self.scales] if self.mode == "int8" else [self.packed, self.scales_zeros]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # the kernels take no strides
        if self.mode == "int4":
            dequantize = self._int4_dequantizer() if x2.shape[0] > MAX_ROWS else None
            if dequantize is not None:
                y = self._dequantized_matmul_int4(x2, dequantize)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
            y = y[:, :self.out_features]
        elif x2.shape[0] <= MAX_ROWS and gemv_int8() is not None:
            y = gemv_int8()(x2, self.qweight, self.scales)
        else:
            y = self._dequantized_matmul(x2)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _dequantized_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) bf16 @ dequantized weight^T, a block of weight rows at a time -> (M, N) bf16."""
        block = max(64, _DEQUANT_BUFFER_BYTES // (2 * self.in_features))
        out = x2.new_empty(x2.shape[0], self.out_features)
        for start in range(0, self.out_features, block):
            rows = slice(start, min(start + block, self.out_features))
            weight = _dequant_buffer(rows.stop - start, self.in_features)
            out[:, rows] = F.linear(x2, dequantize_int8_rows(self.qweight[rows], self.scales[rows], weight))
        return out

    def _int4_dequantizer(self):
        """The compiled int4 dequantizer if it reads this layer's packed layout (whole 64-row blocks), else None."""
        kernel = dequantize_int4()
        return kernel if kernel is not None and self.packed.shape[0] % 64 == 0 and _packs_like_torch() else None

    def _dequantized_matmul_int4(self, x2: torch.Tensor, dequantize) -> torch.Tensor:
        """x2 (M, K) bf16 @ the int4 weight^T, dequantizing blocks of 64-row multiples into a transposed
        (K, rows) bf16 buffer -> (M, padded N) bf16. torch's int4 kernel dequantizes the weight again for
        every 4 input rows; this dequantizes it once (~0.1 ns/weight), then multiplies at bf16 speed."""
        n = self.packed.shape[0]
        block = max(64, _DEQUANT_BUFFER_BYTES // (2 * self.in_features) // 64 * 64)
        out = x2.new_empty(x2.shape[0], n)
        for start in range(0, n, block):
            rows = min(block, n - start)
            weight_t = _dequant_buffer(self.in_features, rows)  # (K, rows)
            dequantize(self.packed, self.scales_zeros, start, weight_t)
            out[:, start:start + rows] = x2 @ weight_t
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float32 weight as the kernel sees it (computed by multiplying the identity: slow, for tests)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self.forward(eye).float().t().contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError("a quantized model has no float state dict: quantization is a load-time transform; "
                           "save (or fine-tune) the original checkpoint and quantize it when loading")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, " \
               f"group_size={self.group_size}"
