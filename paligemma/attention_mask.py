"""The prefix-LM attention mask.

PaliGemma's input is `[image tokens] <bos> prefix \\n | suffix <eos>`. The part before `|` (the
prefix) attends bidirectionally within itself ("full block attention"); the suffix is causal:
each suffix token sees the whole prefix, earlier suffix tokens and itself. Padding is never seen.
Gemma 2's local layers add a sliding window, but only to causal attention: like transformers,
a prefix token sees the entire prefix even where it is longer than the window.

    allowed(q, k) = valid[k] and ((prefix[q] and prefix[k]) or (k <= q and q - k < window))
"""

from __future__ import annotations

import torch


def prefix_lm_mask(query_slots: torch.Tensor, query_is_prefix: torch.Tensor, key_valid: torch.Tensor,
                   key_is_prefix: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, T, S): 0 where allowed, `masked_value(dtype)` elsewhere.

    query_slots (T,) sequence indices of the queries; query_is_prefix (B, T); key_valid and
    key_is_prefix (B, S) for keys at sequence indices 0..S-1.
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    distance = query_slots[:, None] - key_slots[None, :]  # (T, S): how far back the key is
    causal = distance >= 0
    if window is not None:
        causal = causal & (distance < window)
    both_prefix = query_is_prefix[:, :, None] & key_is_prefix[:, None, :]  # (B, T, S)
    allowed = key_valid[:, None, :] & (both_prefix | causal[None])
    # A large finite value rather than -inf: a fully masked row (a padding query) then gives a uniform
    # softmax instead of NaNs that would leak into gradients. Not float32's minimum, which rounds to -inf
    # when bf16 autocast casts the mask for attention (CUDA's SDPA then returns NaN rows): the larger of
    # the dtype's and bfloat16's minimum, finite in both.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, masked_value(dtype))[:, None]


def masked_value(dtype: torch.dtype) -> float:
    """The additive mask's value for a forbidden key: finite in `dtype` and in bfloat16."""
    return max(torch.finfo(dtype).min, torch.finfo(torch.bfloat16).min)
