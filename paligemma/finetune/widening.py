"""Training with bf16 weights on a CPU without native bf16: the weights stay bf16, the arithmetic is float32.

There (no AVX512-BF16, or capped by PALIGEMMA_ISA: kernels.native_bf16() is False) torch runs bf16
matmuls, the backward's included, on its reference GEMM: a LoRA step on a bf16 PaliGemma 3B did not
finish in 25 minutes where the float32 model takes 43 s (issue 23). `widen_bf16(model)` rewrites a
bf16 model in place, as inference.py does for prefill:

- every bf16 `nn.Linear` becomes a `WidenedLinear` (an nn.Linear with the same parameters, so names,
  state dict and peft's wrapping are unchanged) whose product is float32: its weight is widened a
  block of rows at a time into a reused buffer (`kernels.matmul_by_row_blocks`), never whole, and its
  backward computes grad_x = grad_y @ W the same way (grad_W = grad_y^T x only if the weight trains);
- the token embedding returns float32 rows, and a tied LM head multiplies by the table like a
  `WidenedLinear`, so the activations are float32 from the first layer on (attention included);
- the small parameters (norms, the patch embedding, position embeddings) become float32: the
  float32 activations meet them, and LayerNorm refuses a bf16 weight with a float32 input.

The token table and the matrices, nearly all of the weights, stay bf16 in memory. Merged checkpoints
are written in the table's dtype again (lora.merged_state_dict), so the float32 norms go back to the
bf16 values they came from.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..kernels import BLOCK_BUFFER_BYTES, matmul_by_row_blocks, native_bf16, scratch
from ..kv_cache import KVCache


def needs_widening(model: nn.Module) -> bool:
    """Whether `model` holds bf16 weights on a CPU that multiplies bf16 slowly."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return on_cpu and not native_bf16() and any(p.dtype == torch.bfloat16 for p in model.parameters())


class _WidenedMatmul(torch.autograd.Function):
    """y (..., N) float32 = x @ W^T + b with W (N, K) bf16 widened a block of rows at a time."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, weight.shape[1]).float()
        ctx.save_for_backward(rows if weight.requires_grad else None, weight)
        ctx.input_dtype, ctx.input_shape, ctx.has_bias = x.dtype, x.shape, bias is not None
        y = matmul_by_row_blocks(rows, weight.shape[0], weight.shape[1],
                                 lambda start, out: out.copy_(weight[start:start + out.shape[0]]))
        if bias is not None:
            y += bias.float()
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_y: torch.Tensor):
        rows, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, weight.shape[0]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(g.shape[0], weight.shape[1])
            block = 64 * max(1, BLOCK_BUFFER_BYTES // (4 * weight.shape[1]) // 64)
            for start in range(0, weight.shape[0], block):
                w = weight[start:start + block]
                grad_x.addmm_(g[:, start:start + w.shape[0]], scratch(tuple(w.shape), torch.float32).copy_(w))
            grad_x = grad_x.to(ctx.input_dtype).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g.T @ rows).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


class WidenedLinear(nn.Linear):
    """An nn.Linear with a bf16 weight whose products are float32 (module docstring); returns float32."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> WidenedLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WidenedMatmul.apply(x, self.weight, self.bias)


class WidenedEmbedding(nn.Embedding):
    """An nn.Embedding with a bf16 table that returns float32 rows."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> WidenedEmbedding:
        new = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        new.weight = embedding.weight
        return new

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).float()


class TiedHead(nn.Module):
    """The LM head of a tied model: logits (..., V) = hidden @ table^T in float32. The table stays the
    embedding's parameter (not registered here: the state dict is unchanged)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # a reference, not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _WidenedMatmul.apply(hidden, self.embedding.weight, None)


def widen_bf16(model: nn.Module) -> nn.Module:
    """Rewrite a PaliGemma's bf16 weights to compute in float32 (module docstring), in place; a model
    without bf16 weights is left as it is."""
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(owner, name, WidenedLinear.from_linear(child))
            elif type(child) is nn.Embedding and child.weight.dtype == torch.bfloat16:
                if child is model.language_model.embed_tokens:
                    setattr(owner, name, WidenedEmbedding.from_embedding(child))
                else:  # position embeddings: small
                    child.weight.data = child.weight.data.float()
            elif isinstance(child, (nn.LayerNorm, nn.Conv2d)) or type(child).__name__ == "RMSNorm":
                for param in child.parameters(recurse=False):
                    param.data = param.data.float()
    table = model.language_model.embed_tokens
    if not hasattr(model, "lm_head") and table.weight.dtype == torch.bfloat16:
        model.lm_head = TiedHead(table)
    # Generation (evaluation during training) caches float32 keys and values, the activations' dtype.
    model.new_cache = functools.partial(_float32_cache, model)
    return model


def _float32_cache(model: nn.Module, batch_size: int, max_len: int) -> KVCache:
    return KVCache(model.config.text, batch_size, max_len, torch.float32, model.device)
