"""Weight-only int8 / int4 quantization of linear layers, on torch's packed 4-bit CPU kernel.

    QuantizedLinear(weight (N, K), "int4", group_size=64)(x (..., K)) -> (..., N)

Both modes run on `torch.ops.aten._weight_int4pack_mm_for_cpu`, which multiplies bf16 activations
by 4-bit weights dequantized group-wise as (q - 8) * scale + zero, q in 0..15:

- int4: asymmetric per group of `group_size` input channels (min/max -> scale, zero), 0.5 byte/weight.
- int8: symmetric per group (scale = max|w| / 127), w8 in -127..127 stored as two 4-bit planes,
  w8 = 16 * hi + lo with hi in -8..7 and lo in 0..15; y = x @ (16 s hi) + x @ (s lo), two kernel calls
  that together stream 1 byte/weight. torch's `_weight_int8pack_mm` computes the same thing but
  measured slower than plain bf16 `F.linear` on this project's benchmark CPU (AMD EPYC, AVX-512), while
  the 4-bit kernel streams ~4x faster; see BENCHMARKS.md.

Activations are cast to bf16 for the kernel (its float32 path is ~30x slower) and the result back to
the input dtype. Scales and zeros are rounded to bf16 before the weights are quantized against them,
so dequantization matches what the kernel computes. A quantized layer cannot be saved back to a
checkpoint: quantization is a load-time transform of a float checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = {"int4": 64, "int8": 256}


class QuantizationError(RuntimeError):
    """Quantized kernels unavailable on this machine, or a layer shape they cannot take."""


def check_available() -> None:
    """Raise QuantizationError if torch's packed 4-bit CPU kernels are missing or fail on this machine."""
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
    """(N, K) integers 0..15 -> torch's packed int4 CPU layout (N, K/2) uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group (N, K/g) scale and zero -> the kernel's (K/g, N, 2) bf16 tensor."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


# Rows are quantized in blocks small enough to stay in cache (10x faster than whole matrices, and no
# float32 copy of a 0.5 G-entry LM head). The packed layout is blocked by 64 rows, so blocks of a
# multiple of 64 rows pack to the same bytes as the whole matrix (tested).
_ROW_BLOCK = 256


def _by_row_blocks(weight: torch.Tensor, group_size: int, quantize_block, planes: int) -> list[torch.Tensor]:
    n, k = weight.shape
    block = _ROW_BLOCK if n % 64 == 0 else n
    out = []
    for _ in range(planes):
        out += [torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // group_size, n, 2, dtype=torch.bfloat16)]
    for start in range(0, n, block):
        rows = slice(start, start + block)
        for i, part in enumerate(quantize_block(weight[rows].float(), group_size)):
            if i % 2 == 0:
                out[i][rows] = part
            else:
                out[i][:, rows] = part
    return out


def _int4_block(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    w = w.view(n, k // group_size, group_size)
    low, high = w.aminmax(dim=-1)
    scale = ((high - low) / 15).clamp_(min=1e-8).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()  # the value that q = 8 stands for
    q = w.sub(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
    return _pack(q.view(n, k)), _scales_zeros(scale, zero)


def _int8_block(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    n, k = w.shape
    w = w.view(n, k // group_size, group_size)
    scale = (w.abs().amax(-1) / 127).clamp_(min=1e-8).bfloat16().float()
    q = w.div(scale[..., None]).round_().clamp_(-127, 127).to(torch.int32)  # (N, K/g, g)
    hi = q.bitwise_right_shift(4)  # floor(q / 16): -8..7
    lo = q.bitwise_and_(15)  # q - 16 hi: 0..15
    # The kernel dequantizes (q - 8) * scale + zero: hi plane q = hi + 8 with scale 16 s; lo plane q = lo, zero 8 s.
    return (_pack(hi.add_(8).view(n, k)), _scales_zeros(16 * scale, torch.zeros_like(scale)),
            _pack(lo.view(n, k)), _scales_zeros(scale, 8 * scale))


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit, per group: returns (packed (N, K/2) uint8, scales_zeros (K/g, N, 2) bf16)."""
    return tuple(_by_row_blocks(weight, group_size, _int4_block, 1))


def quantize_int8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit, per group, as two 4-bit planes: (hi, hi scales_zeros, lo, lo scales_zeros)."""
    return tuple(_by_row_blocks(weight, group_size, _int8_block, 2))


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with int8 or int4 weights; inference only.

    `parts` names the HF projections fused into this one (for error messages and bookkeeping).
    """

    def __init__(self, weight: torch.Tensor, mode: str, group_size: int | None = None,
                 parts: list[tuple[str, int]] | None = None):
        super().__init__()
        if mode not in MODES:
            raise QuantizationError(f"quantize must be one of {MODES} or None, got {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        self.group_size = choose_group_size(self.in_features, mode, group_size)
        self.parts = parts or []
        rows = -self.out_features % 16  # the kernel packs rows in blocks of 16: pad with zero rows
        if rows:
            weight = torch.cat([weight, weight.new_zeros(rows, self.in_features)])
        if mode == "int4":
            self.packed, self.scales_zeros = quantize_int4(weight, self.group_size)
        else:
            self.packed_hi, self.scales_zeros_hi, self.packed_lo, self.scales_zeros_lo = quantize_int8(
                weight, self.group_size)

    def inference_tensors(self):
        """The tensors this layer holds (not parameters or buffers: they must never be trained or cast)."""
        if self.mode == "int4":
            return [self.packed, self.scales_zeros]
        return [self.packed_hi, self.scales_zeros_hi, self.packed_lo, self.scales_zeros_lo]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # the kernel takes no strides
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        if self.mode == "int4":
            y = mm(x2, self.packed, self.group_size, self.scales_zeros)
        else:
            y = (mm(x2, self.packed_hi, self.group_size, self.scales_zeros_hi).float()
                 + mm(x2, self.packed_lo, self.group_size, self.scales_zeros_lo).float())
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

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
