"""Weight-only int8 / int4 quantization of linear layers, for CPU inference and as a frozen QLoRA base.

    QuantizedLinear(weight (N, K), "int8", group_size=256)(x (..., K)) -> (..., N)

- int8: symmetric per group of `group_size` input channels, scale = max|w| / 127, q in -127..127,
  stored row-major as int8 (N, K) with float32 scales (N, K/g): 1 byte/weight.
- int4: asymmetric per group (min/max -> scale, zero), a weight is (q - 8) * scale + zero with q in
  0..15, 0.5 byte/weight. Scales and zeros are rounded to bf16 before the weights are quantized
  against them, so dequantization matches what the kernels compute. With this project's kernels the
  nibbles are packed in 64-row blocks (`pack_int4`, the layout torch's AVX-512 int4 packer also
  writes); without them, in whatever layout torch's own int4 kernel wants on this CPU.

Which code multiplies is chosen when the layer is built, by the ISA level in force (kernels.py):
- inputs of <= 8 rows (decode steps): the kernels' `gemv_int8` / `gemv_int4`, which stream the
  compact weights once and widen them in registers; without kernels, torch's int4 kernel
  (`aten._weight_int4pack_mm_for_cpu`) and, for int8, the prefill path below. For 2-8 rows of int4,
  torch's kernel where it reads our layout (torch's AVX-512 build): faster there than ours;
- larger inputs (prefill): blocks of weight rows dequantized into a reused buffer and multiplied with
  torch's GEMM, in bf16 where this CPU multiplies bf16 natively and in float32 elsewhere (torch's bf16
  GEMM is several times slower than its float32 one without AVX512-BF16).

Activations go to the kernels as bf16 and the result comes back in the input's dtype. The quantized
tensors are registered (non-persistent) buffers: casting the model's dtype leaves them as they are,
moving it off the CPU raises. Autocast is switched off inside the layer: it would send the blocks'
float32 GEMM to torch's bf16 one, whose reference path is the slow one on CPUs without native bf16.

Training (QLoRA, finetune/lora.py): the weights are frozen and get no gradient, but the input does.
An input that requires grad goes through `_QuantizedMatmul`, whose backward computes
grad_x (M, K) = grad_y (M, N) @ W (N, K) with W dequantized a block of rows at a time into the same
reused buffer as prefill (the kernels' dequantizers, or torch ops without kernels), multiplied in
the layer's compute dtype and summed in float32: no full-precision copy of W is ever held.

Saved, a layer is its quantized tensors in a *portable* layout, the same whatever CPU wrote them
(`state_dict()` yields them; quantized_checkpoint.py reads them back):

    int8: qweight (N, K) int8, scales (N, K/g) float32                       layout "int8-rows"
    int4: packed (N64, K/2) uint8 in `pack_int4`'s 64-row blocks, scales_zeros (K/g, N64, 2) bf16
          (N64: N rounded up to 64, the extra rows zero)                   layout "int4-64row-blocks"

These are the kernels' own layouts, so loading them is a memory map. Only where neither these kernels
nor torch's int4 kernel read `pack_int4`'s layout (level `none` on a CPU whose torch packs int4
otherwise: ARM64, AVX2-only builds) is the int4 layer held in torch's layout: repacked when loaded,
unpacked again when saved. A layer built from meta-device weights has the shapes and no data, to be
filled by `load_portable`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import PaliGemmaError
from .kernels import BLOCK_BUFFER_BYTES, MAX_ROWS, level, matmul_by_row_blocks, native_bf16, ops, scratch
from .safetensors_io import release_file_pages

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = {"int4": 64, "int8": 256}
BITS = {"int8": 8, "int4": 4}
# The portable layouts a checkpoint stores (module docstring); a change to one bumps LAYOUT_VERSION.
LAYOUTS = {"int8": "int8-rows", "int4": "int4-64row-blocks"}
LAYOUT_VERSION = 1


class QuantizationError(PaliGemmaError, RuntimeError):
    """Quantized kernels unavailable on this machine, or a layer shape they cannot take."""


def check_available(mode: str) -> None:
    """Raise QuantizationError if `mode` cannot run here (int4 needs this project's kernels or torch's
    packed 4-bit CPU kernels)."""
    if mode not in MODES:
        raise QuantizationError(f"quantize must be one of {MODES} or None, got {mode!r}")
    if mode == "int8" or ops() is not None:
        return  # int8: the compiled kernels when there are some, torch ops otherwise
    try:
        q = torch.zeros(16, 64, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), packed, 32,
                                                    torch.zeros(2, 16, 2, dtype=torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        raise QuantizationError(f"int4 needs this project's kernels (unavailable at ISA level {level()!r}) or "
                                f"torch's packed int4 CPU kernels (aten._weight_int4pack_mm_for_cpu), unavailable "
                                f"here: {err}") from None


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


# ---------------------------------------------------------------------- int4 packing

_PACK_COLUMNS = 1024  # input columns per step of pack_int4: keeps its transposing copy in cache


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 integers 0..15, N a multiple of 64 -> the kernels' packed layout (N, K/2) uint8.

    Rows go in blocks of 64, seen as four lanes of 16 rows; for each input column k a block stores
    32 bytes: (lane 2 << 4 | lane 0) for its 16 rows, then (lane 3 << 4 | lane 1). Torch's AVX-512 int4
    packer writes the same bytes (tested); this is ~5x faster than it and the same on every CPU.
    """
    n, k = q.shape
    lanes = q.view(n // 64, 4, 16, k)
    out = torch.empty(n // 64, k, 2, 16, dtype=torch.uint8)
    for start in range(0, k, _PACK_COLUMNS):
        cols = slice(start, start + _PACK_COLUMNS)
        pairs = lanes[:, 2:, :, cols] << 4 | lanes[:, :2, :, cols]  # (N/64, 2, 16, cols)
        out[:, cols] = pairs.permute(0, 3, 1, 2)
    return out.view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4`'s layout (N, K/2) -> the integers (N, K) uint8: byte i of a 64-row block's column
    holds row i in its low nibble and row 32 + i in its high one."""
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // 64, k, 32)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).permute(0, 2, 1).reshape(n, k)


def pack_int4_for_torch(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 0..15, N a multiple of 64 -> the layout torch's int4 kernel reads on this CPU."""
    if _packs_like_torch():
        return pack_int4(q)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_torch_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of torch's int4 packer on this CPU: its (N, K/2) layout -> (N, K) uint8, N a multiple of 64."""
    n, k = packed.shape[0], packed.shape[1] * 2
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).view(n // 64, 64 * k)  # low nibble first
    out = torch.empty_like(nibbles)
    out[:, _torch_int4_order(k)] = nibbles
    return out.view(n, k)


@functools.cache
def _torch_int4_order(k: int) -> torch.Tensor:
    """Where each nibble of one 64-row block packed by torch comes from: its flat index in the (64, K)
    block, low nibble of each byte first. Found by packing every entry's own index, 4 bits per probe,
    over two blocks, and checked to repeat block after block (torch's layouts are blocked by 16-64 rows)."""
    index = torch.arange(128 * k).view(128, k)
    source = torch.zeros(128 * k, dtype=torch.long)
    for shift in range(0, (128 * k - 1).bit_length(), 4):
        digits = ((index >> shift) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1).view(128, k // 2)
        source |= torch.stack([packed & 15, packed >> 4], dim=-1).flatten().long() << shift
    first, second = source[:64 * k], source[64 * k:]
    if not torch.equal(second, first + 64 * k):
        raise QuantizationError("torch's int4 layout on this CPU is not blocked by 64 rows: an int4 model "
                                "quantized here cannot be saved; quantize the float checkpoint with "
                                "`paligemma quantize` instead")
    return first


@functools.cache
def _packs_like_torch() -> bool:
    """Whether torch's int4 packer writes `pack_int4`'s layout here (its AVX-512 build does; its AVX2 and
    plain builds use others)."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(expected, pack_int4(probe))


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group (N, K/g) scale and zero -> the kernels' (K/g, N, 2) bf16 tensor."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


# ---------------------------------------------------------------------- quantizing matrices

# Rows are quantized in blocks small enough to stay in cache (10x faster than whole matrices, and no
# float32 copy of a 0.5 G-entry LM head). The packed int4 layouts are blocked by at most 64 rows, so
# blocks of a multiple of 64 rows pack to the same bytes as the whole matrix (tested).
_ROW_BLOCK = 256

# A weight read from a checkpoint's memory map has its pages handed back to the OS block by block as it
# is quantized (safetensors_io.release_file_pages), so a large one (a tied head's embedding table: 1.8 GB
# for PaliGemma 2 10B, 2.4 GB for 28B) never sits in memory whole next to the quantized model. The int8
# kernel's blocks are this many rows.
_KERNEL_ROWS = 4096

Weights = torch.Tensor | list[torch.Tensor]  # one (N, K) matrix, or matrices (N_i, K) stacked by rows


def _stacked_rows(weight: Weights) -> tuple[list[torch.Tensor], int, int]:
    """(the matrices, total rows N, columns K) of one matrix or of matrices fused by rows."""
    parts = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if any(part.dim() != 2 or part.shape[1] != parts[0].shape[1] for part in parts):
        shapes = [tuple(part.shape) for part in parts]
        raise QuantizationError(f"weights to fuse must be matrices of equal width, got {shapes}")
    return parts, sum(part.shape[0] for part in parts), parts[0].shape[1]


@torch.no_grad()  # a weight that requires grad would leave its autograd history on the shared scratch buffer
def _by_row_blocks(parts: list[torch.Tensor], group_size: int, quantize_block, outputs: list[torch.Tensor],
                   row_dims: list[int]) -> tuple[torch.Tensor, ...]:
    """Fill `outputs` (preallocated; rows along `row_dims`) with quantize_block(rows as float32, group_size)
    over the rows of `parts` stacked in order: fused projections are never concatenated in float."""
    if len(parts) > 1 and any(part.shape[0] % 64 for part in parts):
        parts = [torch.cat(parts)]  # a 64-row block of the packed layout would straddle two parts
    offset = 0
    for part in parts:
        n = part.shape[0]
        block = _ROW_BLOCK if n % 64 == 0 else n
        for start in range(0, n, block):
            count = min(block, n - start)
            rows = slice(offset + start, offset + start + count)
            # float32 rows in a reused buffer: a fresh tensor per block would page-fault each time
            block_rows = scratch((count, part.shape[1]), torch.float32).copy_(part[start:start + count])
            release_file_pages(part[start:start + count])  # a mapped weight's block: done with
            quantized = quantize_block(block_rows, group_size)
            for out, dim, values in zip(outputs, row_dims, quantized):
                out[(slice(None),) * dim + (rows,)] = values
        offset += n
    return tuple(outputs)


def _int4_block(w: torch.Tensor, group_size: int, pack) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 rows w (n, K), overwriting w."""
    n, k = w.shape
    w = w.view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # ~8x faster than aminmax over a short last dim
    scale = ((high - low) / 15).clamp_(min=1e-8).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()  # the value that q = 8 stands for
    q = w.sub_(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
    return pack(q.view(n, k).to(torch.uint8)), _scales_zeros(scale, zero)


def _int8_block(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    w = w.view(n, k // group_size, group_size)
    scale = (w.abs().amax(-1) / 127).clamp_(min=1e-8)
    q = w.div(scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(n, k), scale


def quantize_int4(weight: Weights, group_size: int, pack=pack_int4) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit, per group: returns (packed (N, K/2) uint8, scales_zeros (K/g, N, 2) bf16).
    `pack` is `pack_int4` (the kernels' layout) or `pack_int4_for_torch`.

    On one thread: a block is some 30 small torch ops, each a parallel region whose threads wait for
    one another at its end; on a machine whose cores are busy with other work, a waiting thread's
    partner is often descheduled, and a 2048 x 16384 matrix took 2.4-4 s of wall time on 2 threads
    against 0.15 s on one (BENCHMARKS.md: 894 s to quantize PaliGemma 3B at load, on a loaded machine).
    """
    parts, n, k = _stacked_rows(weight)
    outputs = [torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(k // group_size, n, 2, dtype=torch.bfloat16)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _by_row_blocks(parts, group_size, functools.partial(_int4_block, pack=pack), outputs, [0, 1])
    finally:
        torch.set_num_threads(threads)


def quantize_int8(weight: Weights, group_size: int, kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit, per group: returns (q (N, K) int8, scales (N, K/g) float32). `kernels` (an
    `ops()` module) does the same arithmetic ~10x faster than the torch ops."""
    parts, n, k = _stacked_rows(weight)
    outputs = [torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // group_size, dtype=torch.float32)]
    if kernels is None or any(p.device.type != "cpu" or p.dtype not in (torch.bfloat16, torch.float32) for p in parts):
        return _by_row_blocks(parts, group_size, _int8_block, outputs, [0, 0])
    offset = 0
    for part in parts:  # the same arithmetic as _int8_block (tested)
        for start in range(0, part.shape[0], _KERNEL_ROWS):
            rows = part[start:start + _KERNEL_ROWS]
            done = slice(offset + start, offset + start + rows.shape[0])
            kernels.quantize_int8(rows.contiguous(), outputs[0][done], outputs[1][done])
            release_file_pages(rows)
        offset += part.shape[0]
    return tuple(outputs)


def dequantize_int8_rows(q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, kernels=None) -> torch.Tensor:
    """out (n, K) = q * scale (rounded to out's dtype, bf16 or float32) for int8 rows q (n, K), scales (n, K/g)."""
    if kernels is not None:
        kernels.dequantize_int8(q, scales, out)
    else:
        n, k = q.shape
        out.copy_(q.view(n, scales.shape[1], -1).float().mul_(scales[..., None]).view(n, k))
    return out


def dequantize_int4_rows(packed: torch.Tensor, scales_zeros: torch.Tensor, out: torch.Tensor,
                         portable: bool = True) -> torch.Tensor:
    """out (K, n) = weight rows packed (n, K/2) (n a multiple of 64), transposed as the kernels' dequantize_int4
    writes them: (q - 8) * scale + zero with scales_zeros (K/g, n, 2). Torch ops, for CPUs without the kernels;
    `portable`: `pack_int4`'s layout, else torch's own."""
    q = unpack_int4(packed) if portable else unpack_torch_int4(packed)  # (n, K)
    n, k = q.shape
    scale, zero = scales_zeros.float().permute(2, 1, 0)  # each (n, K/g)
    w = q.view(n, scale.shape[1], -1).float().sub_(8).mul_(scale[..., None]).add_(zero[..., None])
    return out.copy_(w.view(n, k).T)


def quantize_weights(weight: Weights, mode: str, group_size: int, kernels=None) -> dict[str, torch.Tensor]:
    """One matrix (or matrices fused by rows) quantized into the portable layout (module docstring): the
    tensors a QuantizedLinear saves, by name. `kernels` as for quantize_int8."""
    parts, n, k = _stacked_rows(weight)
    if mode == "int8":
        qweight, scales = quantize_int8(parts, group_size, kernels)
        return {"qweight": qweight, "scales": scales}
    if n % 64:  # the packed layout takes rows in blocks of 64: zero rows pad the last
        parts = parts + [parts[0].new_zeros(-n % 64, k)]
    packed, scales_zeros = quantize_int4(parts, group_size)
    return {"packed": packed, "scales_zeros": scales_zeros}


# ---------------------------------------------------------------------- the layer

class _QuantizedMatmul(torch.autograd.Function):
    """y = x @ W^T through a QuantizedLinear, with grad_x = grad_y @ W (`QuantizedLinear.input_grad`); W is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.multiply(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return ctx.layer.input_grad(grad_y), None


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with frozen int8 or int4 weights (inference, or the base of QLoRA adapters).

    `weight` is one (N, K) matrix, or a list of matrices (N_i, K) to fuse, stacked by rows (quantized
    part by part, never concatenated in float). `parts` names the HF projections fused into this one
    (for error messages and bookkeeping). Meta-device weights give a layer with shapes and no data,
    to be filled by `load_portable`.
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
        self.kernels = ops()
        self.compute_dtype = torch.bfloat16 if native_bf16() else torch.float32  # of prefill's GEMMs
        # Where torch's int4 kernel reads the kernels' layout (its AVX-512 build), it multiplies 2-8 rows
        # ~1.3x faster than gemv_int4, which is built for one (BENCHMARKS.md, kernel microbenchmarks).
        self.torch_reads_layout = self.kernels is None or _packs_like_torch()
        # Whether `packed` is in the portable layout (the kernels', and torch's AVX-512 one), not torch's own.
        self.portable = mode == "int8" or self.kernels is not None or _packs_like_torch()
        if matrices[0].is_meta:
            tensors = {name: torch.empty(shape, dtype=dtype, device="meta")
                       for name, (shape, dtype) in self.portable_shapes().items()}
        else:
            tensors = quantize_weights(matrices, mode, self.group_size, self.kernels)
        for name in tensors:
            self.register_buffer(name, None, persistent=False)  # filled by load_portable
        self.load_portable(tensors)

    def portable_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the tensors this layer saves (module docstring)."""
        n, k, groups = self.out_features, self.in_features, self.in_features // self.group_size
        if self.mode == "int8":
            return {"qweight": ((n, k), torch.int8), "scales": ((n, groups), torch.float32)}
        n64 = n + -n % 64
        return {"packed": ((n64, k // 2), torch.uint8), "scales_zeros": ((groups, n64, 2), torch.bfloat16)}

    def load_portable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take saved tensors (those `state_dict()` yields) as this layer's weights: as they are, so views
        of a checkpoint's memory map stay views, except where this CPU reads int4 in torch's own layout."""
        expected = self.portable_shapes()
        got = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
        if got != expected:
            names = " + ".join(name for name, _ in self.parts) or "a quantized layer"
            raise QuantizationError(f"{names}: saved tensors {got} do not match the {self.mode} layout "
                                    f"{expected} of a {self.out_features} x {self.in_features} weight with "
                                    f"group size {self.group_size}")
        if self.mode == "int4" and not self.portable and not tensors["packed"].is_meta:
            tensors = dict(tensors, packed=pack_int4_for_torch(unpack_int4(tensors["packed"])))
        for name, tensor in tensors.items():
            self._buffers[name] = tensor

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.mode == "int8":
            destination[prefix + "qweight"], destination[prefix + "scales"] = self.qweight, self.scales
            return
        portable = self.portable or self.packed.is_meta
        destination[prefix + "packed"] = self.packed if portable else pack_int4(unpack_torch_int4(self.packed))
        destination[prefix + "scales_zeros"] = self.scales_zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):  # checked first: no context is entered when autocast is off
            with torch.autocast("cpu", enabled=False):
                return self.forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantizedMatmul.apply(x, self)  # the weights get no gradient; the input does
        return self.multiply(x)

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) @ W^T -> (..., N) in x's dtype, without autograd."""
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        path = self._path(rows.shape[0])
        if path == "kernel":
            x_bf16 = rows.to(torch.bfloat16).contiguous()  # the kernels take no strides
            y = (self.kernels.gemv_int8(x_bf16, self.qweight, self.scales) if self.mode == "int8"
                 else self.kernels.gemv_int4(x_bf16, self.packed, self.scales_zeros))
        elif path == "torch_int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16).contiguous(), self.packed,
                                                           self.group_size, self.scales_zeros)
        else:
            y = matmul_by_row_blocks(rows.to(self.compute_dtype).contiguous(), self._stored_rows(), self.in_features,
                                     self._dequantize_block, transposed=self.mode == "int4")
        return y[:, :self.out_features].to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _path(self, num_rows: int) -> str:
        """Which code multiplies `num_rows` input rows: "kernel", "torch_int4" or "blocks" (module docstring)."""
        if self.mode == "int4" and self.kernels is None:
            return "torch_int4"
        if num_rows > MAX_ROWS or self.kernels is None:
            return "blocks"
        if self.mode == "int4" and num_rows > 1 and self.torch_reads_layout:
            return "torch_int4"
        return "kernel"

    @torch.autocast("cpu", enabled=False)
    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y (..., N) -> grad_x = grad_y @ W (..., K) in grad_y's dtype: W dequantized a block of rows at a
        time into a reused buffer (never whole), multiplied in the compute dtype, summed in float32."""
        g = grad_y.reshape(-1, self.out_features).to(self.compute_dtype)
        grad_x = torch.zeros(g.shape[0], self.in_features, dtype=torch.float32)
        rows_per_64 = BLOCK_BUFFER_BYTES // (g.element_size() * self.in_features) // 64
        for start, w in self._weight_blocks(64 * max(1, rows_per_64), self.compute_dtype, scratch):
            part = g[:, start:start + w.shape[0]]
            if part.dtype == torch.float32:
                grad_x.addmm_(part, w)
            else:
                grad_x += part @ w  # a bf16 product per block, summed in float32
        return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight these integers stand for: a full copy, for merging adapters, never for computing."""
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype)
        for start, w in self._weight_blocks(1024, torch.float32, lambda shape, dt: torch.empty(shape, dtype=dt)):
            weight[start:start + w.shape[0]] = w
        return weight

    def _weight_blocks(self, block: int, dtype: torch.dtype, allocate):
        """(first row, weight rows (n, K) of `dtype`) over W by blocks of `block` rows (a multiple of 64), each
        dequantized into allocate(shape, dtype); int4's padding rows left out."""
        for start in range(0, self.out_features, block):
            rows = min(block, self._stored_rows() - start)  # int4: whole 64-row blocks, padding included
            shape = (self.in_features, rows) if self.mode == "int4" else (rows, self.in_features)
            w = self._dequantize_block(start, allocate(shape, dtype))
            w = w.T if self.mode == "int4" else w
            yield start, w[:min(rows, self.out_features - start)]

    def _stored_rows(self) -> int:
        return self.qweight.shape[0] if self.mode == "int8" else self.packed.shape[0]  # int4: padded

    def _dequantize_block(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Weight rows start.. dequantized into `out`: (rows, K) for int8, transposed (K, rows) for int4."""
        if self.mode == "int8":
            rows = slice(start, start + out.shape[0])
            return dequantize_int8_rows(self.qweight[rows], self.scales[rows], out, self.kernels)
        if self.kernels is None:  # torch's int4 kernel alone: only input_grad and dequantize get here
            rows = slice(start, start + out.shape[1])
            return dequantize_int4_rows(self.packed[rows], self.scales_zeros[:, rows], out, self.portable)
        self.kernels.dequantize_int4(self.packed, self.scales_zeros, start, out)
        return out

    def _apply(self, fn, recurse=True):
        # Casting the model (model.float(), .to(torch.bfloat16)) leaves the quantized weights as they are:
        # outputs follow the input's dtype. Moving them off the CPU is refused before anything moves here.
        if fn(torch.empty(0)).device.type != "cpu":
            raise QuantizationError("quantized layers run on the CPU only: load the model without quantize= "
                                    "to move it to another device")
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("an inference-optimized model cannot be loaded into; load the checkpoint afresh")

    def extra_repr(self) -> str:
        isa = self.kernels.isa() if self.kernels is not None else "none"
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, " \
               f"group_size={self.group_size}, kernels={isa}, compute={self.compute_dtype}"


def quantization_entry(model: nn.Module) -> dict | None:
    """The `quantization` entry of config.json for a model holding QuantizedLinear layers (None if it has
    none): mode, bits, group size (each layer's is `choose_group_size(K, mode, group_size)`) and the
    portable layout's name and version."""
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    if not layers:
        return None
    modes = sorted({layer.mode for layer in layers})
    if len(modes) > 1:
        raise QuantizationError(f"cannot save a model that mixes {' and '.join(modes)} layers")
    mode, group_size = modes[0], max(layer.group_size for layer in layers)
    if any(choose_group_size(layer.in_features, mode, group_size) != layer.group_size for layer in layers):
        raise QuantizationError("cannot save a model whose layers were quantized with different group sizes")
    return {"format": "paligemma", "mode": mode, "bits": BITS[mode], "group_size": group_size,
            "layout": LAYOUTS[mode], "layout_version": LAYOUT_VERSION}
