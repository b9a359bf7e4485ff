"""Inference-only layout of a loaded model: fused projections, prepacked or quantized matrices.

`optimize_for_inference(model, quantize=None)` rewrites a model in place, once, after loading:

- q/k/v projections become one `qkv` matrix (one weight stream and kernel call instead of three
  small ones) and gate/up one `gate_up` module per decoder layer;
- in bf16 on a CPU with AVX512-BF16, the decoder's matrices and the tied LM head stay plain
  row-major tensors and inputs of <= 8 rows (decode steps) go through the C++ kernel of kernels.py,
  which streams them ~1.5-2x faster than `F.linear` (same result up to fp32 summation order); larger
  inputs (prefill) use `F.linear`. gate and up stay two matrices there (two kernel calls): large
  matrices stream as fast one by one, and the weights stay in the checkpoint's memory map
  (weights.py) instead of being copied, which keeps resident memory at one copy of the weights;
- otherwise (float32, or no kernel) the decoder's weights are concatenated and kept in oneDNN's
  prepacked blocked layout, whose matmul runs ~1.1-1.3x faster than `F.linear` on a row-major
  weight (measured on the benchmark CPU; within 1e-5 in float32). The vision tower is left as it is:
  its large matmuls are compute-bound and packing it would copy 0.8 GB out of the memory map;
- with `quantize="int8" | "int4"` the decoder's matrices and the LM head become `QuantizedLinear`
  (see quantize.py). The vision tower stays in the model's dtype: it runs once per image and its
  large-batch matmuls are compute-bound, where the 4-bit kernel is slower than bf16. The LM head
  gets its own quantized copy of the tied embedding table (the lookup keeps the float table: one
  row per token, never streamed), which costs that copy's memory but removes 21% (PaliGemma 1) of
  the bytes each decode step reads. Each float weight's pages in the checkpoint's memory map are
  handed back to the OS once it is quantized (weights.release_file_pages), so resident memory ends
  near the quantized model's size instead of the float model's plus the quantized one's; the same
  holds for the q/k/v weights copied into one fused matrix when not quantizing.

Unquantized, the optimized model's `state_dict()` still yields the original HF-named, unfused
tensors (so `save_pretrained` writes an ordinary checkpoint); it cannot be trained or loaded into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import MAX_ROWS, gemv_bf16
from .quantize import QuantizedLinear, check_available
from .safetensors_io import release_file_pages


def _packing_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _small_rows(x: torch.Tensor) -> bool:
    return x.numel() <= MAX_ROWS * x.shape[-1]


class FastLinear(nn.Module):
    """Linear layer(s) for inference: the decode kernel on a plain bf16 weight, else a prepacked weight.

    `parts` [(name, linear)] are the original projections, concatenated along the output dimension
    and named relative to the parent module; the state dict is written under those names.
    """

    def __init__(self, parts: list[tuple[str, nn.Linear]], pack: bool = True, concat: bool = True):
        super().__init__()
        weights = [linear.weight.detach() for _, linear in parts]
        biases = [linear.bias for _, linear in parts]
        self.part_names = [name for name, _ in parts]
        self.split_sizes = [w.shape[0] for w in weights]
        self.in_features, self.out_features = weights[0].shape[1], sum(self.split_sizes)
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.kernel = gemv_bf16() if (weights[0].dtype == torch.bfloat16 and weights[0].device.type == "cpu"
                                      and self.bias is None) else None
        if self.kernel is not None and not concat:
            # Kept apart (one kernel call each, outputs concatenated): large matrices stream as fast one by
            # one, and the weights stay where loading put them (a memory map) instead of being copied.
            self.weights = [w.contiguous() for w in weights]
            self.packed = False
            return
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.packed = pack and self.kernel is None and _packing_available(weight)
        # `_reorder_linear_weight` returns an opaque oneDNN tensor; `to_dense()` gives the weight back exactly.
        self.weights = [torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight.contiguous()]

    def inference_tensors(self):
        return self.weights + ([] if self.bias is None else [self.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and _small_rows(x) and x.dtype == torch.bfloat16:
            rows = x.reshape(-1, self.in_features)
            out = [self.kernel(rows, w) for w in self.weights]
            return (out[0] if len(out) == 1 else torch.cat(out, -1)).view(*x.shape[:-1], self.out_features)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weights[0], self.bias, "none", [], "")
        if len(self.weights) == 1:
            return F.linear(x, self.weights[0], self.bias)
        return torch.cat([F.linear(x, w) for w in self.weights], -1)

    def dense_weight(self) -> torch.Tensor:
        if self.packed:
            return self.weights[0].to_dense()
        return self.weights[0] if len(self.weights) == 1 else torch.cat(self.weights)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        parent = prefix[:prefix.rstrip(".").rfind(".") + 1]  # "a.b.qkv." -> "a.b."
        weights = self.dense_weight().split(self.split_sizes)
        biases = self.bias.split(self.split_sizes) if self.bias is not None else [None] * len(weights)
        for name, weight, bias in zip(self.part_names, weights, biases):
            destination[f"{parent}{name}.weight"] = weight.clone()
            if bias is not None:
                destination[f"{parent}{name}.bias"] = bias.clone()

    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("an inference-optimized model cannot be loaded into; load the checkpoint afresh")

    def extra_repr(self) -> str:
        return f"parts={self.part_names}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"kernel={self.kernel is not None}, packed={self.packed}"


class TiedHead(nn.Module):
    """The LM head over a weight owned elsewhere (the tied embedding): no copy, nothing in the state dict."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight.detach()  # the owner's tensor, shared (a plain attribute, not a parameter)
        self.kernel = gemv_bf16() if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and _small_rows(x) and x.dtype == torch.bfloat16:
            return self.kernel(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)

    def inference_tensors(self):
        return []  # counted with its owner

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass


def _replace(owner: nn.Module, new_name: str, old_names: list[str], quantize: str | None, group_size: int | None,
             pack: bool, concat: bool = True) -> None:
    parts = [(name, getattr(owner, name)) for name in old_names]
    if quantize:
        weights = [linear.weight.detach() for _, linear in parts]  # fused while quantizing, not concatenated
        module = QuantizedLinear(weights, quantize, group_size, [(n, lin.out_features) for n, lin in parts])
    else:
        module = FastLinear(parts, pack, concat)
    still_used = {t.data_ptr() for t in module.inference_tensors() if t.layout == torch.strided}
    for _, linear in parts:  # a weight copied (fused, packed, quantized) is done with: its mapped pages
        if linear.weight.data_ptr() not in still_used:  # leave resident memory
            release_file_pages(linear.weight)
    for name in old_names:
        delattr(owner, name)  # drops the float weights as soon as the new module holds its copy
    setattr(owner, new_name, module)


@torch.no_grad()
def optimize_for_inference(model, quantize: str | None = None, group_size: int | None = None,
                           pack: bool = True):
    """Fuse, prepack and optionally quantize `model` (a loaded `PaliGemma`) in place; returns it in eval mode."""
    if getattr(model, "inference_layout", None) is not None:
        raise ValueError(f"model is already optimized for inference ({model.inference_layout})")
    if quantize is not None:
        check_available(quantize)
        if model.device.type != "cpu":
            raise ValueError(f"quantize={quantize!r} runs on CPU only; the model is on {model.device}")
    model.eval()
    for layer in model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _replace(attn, "qkv", ["q_proj", "k_proj", "v_proj"], quantize, group_size, pack)
        _replace(attn, "o_proj", ["o_proj"], quantize, group_size, pack)
        _replace(mlp, "gate_up", ["gate_proj", "up_proj"], quantize, group_size, pack, concat=False)
        _replace(mlp, "down_proj", ["down_proj"], quantize, group_size, pack)
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.language_model.embed_tokens.weight
    if quantize is None:
        model.inference_head = TiedHead(head)
    else:
        model.inference_head = QuantizedLinear(head.detach(), quantize, group_size, [("lm_head", head.shape[0])])
        release_file_pages(head)  # a tied table stays the embedding lookup, which reads a few rows back in
        if hasattr(model, "lm_head"):
            del model.lm_head
    model.inference_layout = f"quantized-{quantize}" if quantize else "optimized"
    return model
