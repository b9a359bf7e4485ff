"""Gemma 1 and Gemma 2 decoder: embeddings (B, T, D) -> final-normed hidden states (B, T, D).

One implementation covers both families; the differences are switched by `TextConfig`:

| | Gemma 1 (PaliGemma 1) | Gemma 2 (PaliGemma 2) |
|---|---|---|
| norms per layer | 2 (pre-attention, pre-MLP) | 4 (pre and post around both) |
| attention scale | head_dim^-0.5 | query_pre_attn_scalar^-0.5 |
| attention logits | plain | soft-capped 50·tanh(s/50) before masking |
| attention span | global | sliding window on even layers |

Parameter names follow transformers' GemmaModel / Gemma2Model. The token embedding lives here
but its sqrt(D) scaling is applied by the caller, which knows which positions hold text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .embedding import new_embedding
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in float32 (bf16 squares overflow the mantissa), cast back after."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero-initialised: (1 + w) starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (B, 1, T, head_dim) for integer positions (B, T), computed in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (head_dim/2,)
    angles = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # "rotate_half" layout: first half pairs with second half
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position: pairs (x[i], x[i + hd/2]) turn by angle position * freq[i]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): smoothly bounds values to (-cap, cap). No-op when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class GemmaAttention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads  # 1 = MQA (PaliGemma 1), < num_heads = GQA
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.rope_theta = config.rope_theta
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer_idx, slots, k, v)  # now every filled slot: (B, KV, S, hd)
        out = self.attend(q, k, v, mask)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`attention` with this layer's scale and soft-cap; a method so that inference.py can change
        the arithmetic it runs in."""
        return attention(q, k, v, mask, self.scale, self.softcap)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> q (B, T, H*hd), k and v (B, T, KV*hd). A method of its own so that inference.py
        can compute all three with one fused matrix."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float | None) -> torch.Tensor:
    """Grouped-query attention. q (B, H, T, hd); k, v (B, KV, S, hd); mask additive (B, 1, T, S)."""
    if softcap is None and q.shape[2] > 1:
        # SDPA knows no soft-capping, so it only serves Gemma 1. For one query (a decode step) the plain
        # path below is faster: CPU SDPA took ~1.4 ms per call there, 4% of a 3B model's decode step.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    b, h, t, hd = q.shape
    kv, s = k.shape[1], k.shape[2]
    # Group query heads by the KV head they share, as rows of one matrix per KV head: K and V are used
    # in place (a broadcast over a group dimension would copy them H/KV times).
    q = q.reshape(b, kv, h // kv * t, hd)  # (B, KV, G*T, hd)
    scores = (q @ k.transpose(-1, -2)).view(b, kv, h // kv, t, s) * scale  # (B, KV, G, T, S)
    scores = soft_cap(scores, softcap) + mask.unsqueeze(1)  # Gemma 2 caps before masking
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs.view(b, kv, h // kv * t, s) @ v).view(b, h, t, hd)


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> two (B, T, intermediate); a method of its own so that inference.py can fuse them."""
        return self.gate_proj(x), self.up_proj(x)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.is_gemma2 = config.is_gemma2
        self.sliding_window = config.layer_sliding_window(layer_idx)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_idx)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        # Same name, different place: in Gemma 1 `post_attention_layernorm` is the norm *before the MLP*;
        # in Gemma 2 it normalises the attention output and the MLP gets its own pre/post pair.
        self.post_attention_layernorm = RMSNorm(d, eps)
        if self.is_gemma2:
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
            self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, rotary, masks: dict, cache: KVCache | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        mask = masks[self.sliding_window]
        attn_out = self.self_attn(self.input_layernorm(x), rotary, mask, cache, slots)
        if self.is_gemma2:
            x = x + self.post_attention_layernorm(attn_out)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaDecoder(nn.Module):
    """Token embedding table + decoder layers + final norm (the LM head is tied to the embedding)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = new_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    @property
    def attention_windows(self) -> set[int | None]:
        """The distinct attention spans used by the layers (None = global); one mask is built per span."""
        return {layer.sliding_window for layer in self.layers}

    def forward(self, x: torch.Tensor, positions: torch.Tensor, masks: dict, cache: KVCache | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) embeddings; positions (B, T) RoPE positions; masks {window: (B, 1, T, S)};
        with a cache, `slots` (T,) are the cache slots the T new keys/values are written to."""
        rotary = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, rotary, masks, use_reentrant=False)
            else:
                x = layer(x, rotary, masks, cache, slots)
        return self.norm(x)
