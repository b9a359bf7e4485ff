"""Inference-only layout of a loaded model: fused projections, fast kernels, quantized matrices.

`optimize_for_inference(model, quantize=None)` rewrites a loaded `PaliGemma` in place, once, the way
gpt-fast swaps modules: the model classes (gemma.py, model.py) stay the textbook ones, and this
module replaces some of their submodules with inference subclasses and layers:

- each decoder layer's attention becomes a `FusedAttention` whose q/k/v projections are one matrix
  (one weight stream and kernel call instead of three small ones); gate/up are fused the same way
  (`FusedMLP`) unless the decode kernel streams them as fast one by one, when they stay apart and
  in the checkpoint's memory map instead of being copied;
- every decoder matrix and the LM head become an `InferenceLinear` (or, with quantize="int8" |
  "int4", a `QuantizedLinear` of quantize.py), which picks its arithmetic once, when built, from
  the ISA level in force (kernels.py):
  - inputs of <= 8 rows (decode steps) of a bf16 weight: the kernels' `gemv_bf16`, which streams
    the weight ~1.5-2.5x faster than `F.linear` (same result up to float32 summation order);
  - larger inputs (prefill) of a bf16 weight on a CPU without native bf16 arithmetic (AVX2 only,
    ARM64, or capped by PALIGEMMA_ISA): blocks of weight rows widened to float32 into a reused
    buffer and multiplied by torch's float32 GEMM, ~5x faster there than torch's bf16 GEMM (within
    bf16 rounding of it: the products are exact, only the summation is finer). The weights stay
    bf16 in memory. The vision tower and projector get the same treatment on such CPUs;
  - float32 weights (and bf16 ones where bf16 is native but no kernel is) are kept in oneDNN's
    prepacked blocked layout when oneDNN packs that dtype on this CPU (probed with a trial call),
    whose GEMM runs ~1.1-1.3x faster than `F.linear` on a row-major weight (within 1e-5 in float32);
- a tied LM head reads the embedding table in place (no copy); a quantized one gets its own
  quantized copy (the lookup keeps the float table: one row per token, never streamed), which costs
  that copy's memory but removes 21% (PaliGemma 1) of the bytes each decode step reads.

A weight copied into a new layout (fused, packed, quantized) has its pages in the checkpoint's
memory map handed back to the OS (safetensors_io.release_file_pages), so resident memory ends near
one copy of the weights.

The inference tensors are registered non-persistent buffers: `named_buffers()` lists them and
`.to(dtype)` converts them (a packed weight is unpacked, converted and repacked; quantized weights
stay quantized and their outputs follow the input's dtype); moving a quantized model off the CPU
raises before anything moves. Unquantized, `state_dict()` still yields the original HF-named,
unfused tensors, so `save_pretrained` writes an ordinary checkpoint; quantized, it yields the fused
quantized tensors in their portable layout (quantize.py), which `save_pretrained` writes as a quantized
checkpoint (quantized_checkpoint.py). The model cannot be trained or loaded into.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .gemma import GemmaAttention, GemmaMLP, attention
from .kernels import MAX_ROWS, matmul_by_row_blocks, native_bf16, ops
from .quantize import QuantizedLinear, check_available
from .safetensors_io import release_file_pages


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack a `dtype` weight on this CPU (bf16 needs AVX512-BF16 or AVX-NE-CONVERT)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 16, dtype=dtype), packed, None, "none", [], "")
        return True
    except (RuntimeError, NotImplementedError):
        return False


class InferenceLinear(nn.Module):
    """x @ W^T (+ b) for inference, over one weight or several fused by rows (see the module docstring).

    `tied`: the weight is owned by another module (the embedding table of a tied LM head): it is read
    in place and left out of the state dict.
    """

    def __init__(self, weights: list[torch.Tensor], bias: torch.Tensor | None = None, pack: bool = True,
                 tied: bool = False):
        super().__init__()
        weight = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.tied = tied
        self.saves_itself = len(weights) == 1 and not tied  # a fused layer is saved by its owner, part by part
        on_cpu = _for_cpu(weight.device)
        self.kernels = ops() if on_cpu and weight.dtype == torch.bfloat16 and bias is None else None
        # bf16 without native bf16 arithmetic: multiply in float32, a block of weight rows at a time.
        self.widen = on_cpu and weight.dtype == torch.bfloat16 and not native_bf16()
        self.packed = (pack and weight.device.type == "cpu" and self.kernels is None and not self.widen and not tied
                       and _packs(weight.dtype))
        # `_reorder_linear_weight` returns an opaque oneDNN tensor; `to_dense()` gives the weight back exactly.
        self.register_buffer("weight", self._pack(weight) if self.packed else weight.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @staticmethod
    def _pack(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dtype == torch.bfloat16 and x.numel() <= MAX_ROWS * self.in_features:
            return self.kernels.gemv_bf16(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], -1)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.widen and x.dtype == torch.bfloat16:
            return self._float32_matmul(x)
        return F.linear(x, self.weight, self.bias)

    def _float32_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) bf16 @ the bf16 weight^T in float32 arithmetic -> (..., N) bf16."""
        def widen_block(start: int, out: torch.Tensor) -> torch.Tensor:
            return out.copy_(self.weight[start:start + out.shape[0]])
        rows = x.reshape(-1, self.in_features).float()
        y = matmul_by_row_blocks(rows, self.out_features, self.in_features, widen_block)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The (N, K) weight in row-major layout."""
        return self.weight.to_dense() if self.packed else self.weight

    def _apply(self, fn, recurse=True):
        if self.packed:  # an opaque oneDNN tensor converts by way of its dense form
            self.weight, self.packed = self.dense_weight(), False
            super()._apply(fn, recurse)
            self.packed = self.weight.device.type == "cpu" and _packs(self.weight.dtype)
            if self.packed:
                self.weight = self._pack(self.weight)
            return self
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.saves_itself:
            destination[prefix + "weight"] = self.dense_weight().clone()
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias.clone()

    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("an inference-optimized model cannot be loaded into; load the checkpoint afresh")

    def extra_repr(self) -> str:
        kernel = self.kernels.isa() if self.kernels is not None else "none"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernels={kernel}, " \
               f"widen_to_float32={self.widen}, packed={self.packed}, tied={self.tied}"


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """Give `new` (an instance of a subclass of old's class) old's plain attributes: sizes, flags."""
    new.__dict__.update({name: value for name, value in vars(old).items() if not name.startswith("_")})


def _split_state(fused: nn.Module, names: list[str], sizes: list[int], destination, prefix: str) -> None:
    """Write a fused layer's weight under the HF names of the projections it fuses."""
    if isinstance(fused, QuantizedLinear):
        return  # saved by itself, fused and quantized (quantize.py, "Saved")
    for name, weight in zip(names, fused.dense_weight().split(sizes)):
        destination[f"{prefix}{name}.weight"] = weight.clone()


class FusedAttention(GemmaAttention):
    """Gemma attention whose q, k and v projections are one matrix `qkv`. With `widen` (bf16 on a CPU
    without native bf16) its two batched matmuls run in float32: torch's bf16 `bmm` takes its slow path
    there (~0.23 ms per call at PaliGemma 1's decode shapes, 8 ms of a 108 ms int4 step, emulated AVX2)."""

    def __init__(self, attn: GemmaAttention, make_linear, widen: bool = False):
        nn.Module.__init__(self)
        _adopt(self, attn)
        self.widen = widen
        self.split_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv = make_linear([("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj)])
        self.o_proj = make_linear([("o_proj", attn.o_proj)])

    def project_qkv(self, x: torch.Tensor):
        return self.qkv(x).split(self.split_sizes, dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not (self.widen and q.dtype == torch.bfloat16):
            return super().attend(q, k, v, mask)
        return attention(q.float(), k.float(), v.float(), mask.float(), self.scale, self.softcap).to(q.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _split_state(self.qkv, ["q_proj", "k_proj", "v_proj"], self.split_sizes, destination, prefix)

    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("an inference-optimized model cannot be loaded into; load the checkpoint afresh")


class FusedMLP(GemmaMLP):
    """GeGLU whose gate and up projections are one matrix `gate_up`."""

    def __init__(self, mlp: GemmaMLP, make_linear):
        nn.Module.__init__(self)
        _adopt(self, mlp)
        self.intermediate_size = mlp.gate_proj.out_features
        self.gate_up = make_linear([("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj)])
        self.down_proj = make_linear([("down_proj", mlp.down_proj)])

    def gate_and_up(self, x: torch.Tensor):
        return self.gate_up(x).chunk(2, dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _split_state(self.gate_up, ["gate_proj", "up_proj"], [self.intermediate_size] * 2, destination, prefix)

    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("an inference-optimized model cannot be loaded into; load the checkpoint afresh")


def _linear_factory(quantize: str | None, group_size: int | None, pack: bool):
    """make_linear([(hf_name, nn.Linear), ...]) -> the inference layer standing for those linears, fused."""
    def make_linear(parts: list[tuple[str, nn.Linear]]) -> nn.Module:
        weights = [linear.weight.detach() for _, linear in parts]
        if quantize:
            layer = QuantizedLinear(weights, quantize, group_size, [(n, lin.out_features) for n, lin in parts])
        else:
            bias = None if parts[0][1].bias is None else torch.cat([lin.bias.detach() for _, lin in parts])
            layer = InferenceLinear(weights, bias, pack)
        _release_copied(weights, layer)
        return layer
    return make_linear


def _release_copied(weights: list[torch.Tensor], layer: nn.Module) -> None:
    """A weight copied into the new layer (fused, packed, quantized) is done with: its mapped pages
    leave resident memory (the caller drops the tensor itself)."""
    still_used = {t.data_ptr() for t in layer.buffers() if t.layout == torch.strided}
    for weight in weights:
        if weight.data_ptr() not in still_used:
            release_file_pages(weight)


def _for_cpu(device: torch.device) -> bool:
    """The CPU, or the meta device: a model built there gets the CPU layout, to be filled from a quantized
    checkpoint (quantized_checkpoint.py)."""
    return device.type in ("cpu", "meta")


def is_optimized(model) -> bool:
    return any(isinstance(module, (InferenceLinear, QuantizedLinear)) for module in model.modules())


@torch.no_grad()
def optimize_for_inference(model, quantize: str | None = None, group_size: int | None = None,
                           pack: bool = True):
    """Fuse, prepack and optionally quantize `model` (a loaded `PaliGemma`) in place; returns it in eval mode."""
    if is_optimized(model):
        raise ValueError("model is already optimized for inference")
    if quantize is not None:
        check_available(quantize)
        if not _for_cpu(model.device):
            raise ValueError(f"quantize={quantize!r} runs on CPU only; the model is on {model.device}")
    model.eval()
    make_linear = _linear_factory(quantize, group_size, pack)
    keep_gate_up_apart = quantize is None and model.dtype == torch.bfloat16 and ops() is not None
    widen = model.dtype == torch.bfloat16 and _for_cpu(model.device) and not native_bf16()
    for layer in model.language_model.layers:
        layer.self_attn = FusedAttention(layer.self_attn, make_linear, widen)
        if keep_gate_up_apart:
            # Two kernel calls: large matrices stream as fast one by one, and the weights stay where loading
            # put them (a memory map) instead of being copied.
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, name, make_linear([(name, getattr(layer.mlp, name))]))
        else:
            layer.mlp = FusedMLP(layer.mlp, make_linear)
    _replace_head(model, quantize, group_size)
    if widen:
        _widen_vision(model)
    return model


def _replace_head(model, quantize: str | None, group_size: int | None) -> None:
    tied = not hasattr(model, "lm_head")
    weight = model.language_model.embed_tokens.weight if tied else model.lm_head.weight
    if quantize is None:
        model.lm_head = InferenceLinear([weight], tied=tied)
        return
    model.lm_head = QuantizedLinear(weight.detach(), quantize, group_size, [("lm_head", weight.shape[0])])
    release_file_pages(weight)  # a tied table stays the embedding lookup, which reads a few rows back in


def _widen_vision(model) -> None:
    """On a CPU without native bf16, the vision tower's and projector's bf16 linears multiply in float32."""
    for owner in [model.multi_modal_projector, *model.vision_tower.modules()]:
        for name, child in list(owner.named_children()):
            if type(child) is nn.Linear:
                setattr(owner, name, InferenceLinear([child.weight], child.bias, pack=False))
