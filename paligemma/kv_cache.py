"""A preallocated key/value cache, written by slot index.

Generation fills it in two moves: `prefill` writes the whole prompt (slots 0..T-1) at once, then each
decode step writes one token at the next slot. Nothing is reallocated or concatenated on the way.

Slots are shared by the batch: with left padding every row's prompt ends at the same slot, so the
row-specific facts live beside the tensors: which slots hold a real token (`valid`) and which belong
to the bidirectional prefix (`is_prefix`). RoPE positions are per row and never stored: keys are
cached already rotated.
"""

from __future__ import annotations

import torch

from .config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of "
                             f"{config.max_position_embeddings} tokens")
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.is_prefix = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0  # slots 0..length-1 are filled
        self.max_len = max_len
        self.batch_size = batch_size

    def reserve(self, num_tokens: int, valid: torch.Tensor, is_prefix: torch.Tensor) -> torch.Tensor:
        """Claim the next `num_tokens` slots for tokens with the given (B, T) flags; returns the slots (T,)."""
        if self.length + num_tokens > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {num_tokens} tokens > {self.max_len} slots")
        slots = torch.arange(self.length, self.length + num_tokens, device=self.valid.device)
        self.valid[:, slots] = valid
        self.is_prefix[:, slots] = is_prefix
        self.length += num_tokens
        return slots

    def write(self, layer_idx: int, slots: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, KV, T, hd) keys/values at `slots`; return all filled slots (B, KV, length, hd)."""
        self.keys[layer_idx].index_copy_(2, slots, k)
        self.values[layer_idx].index_copy_(2, slots, v)
        return self.keys[layer_idx][:, :, :self.length], self.values[layer_idx][:, :, :self.length]

    def index_select(self, rows: torch.Tensor) -> None:
        """Keep the cache rows `rows` (R,), in that order, repeats allowed: the cache now holds R rows.

        Beam search and n > 1 prefill each prompt once, then copy its rows per beam or answer, and
        reorder them as beams are chosen.
        """
        rows = rows.to(self.valid.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)
        self.is_prefix = self.is_prefix.index_select(0, rows)
        self.batch_size = rows.shape[0]

    def take_rows(self, parts: list[tuple["KVCache", torch.Tensor]], length: int) -> None:
        """Fill this empty cache with rows of other caches, right-aligned on slot `length` - 1.

        `parts` are (source cache, its rows (R,)), stacked in that order; every source row's filled
        slots keep their order and end at slot `length` - 1, so rows from caches of different
        lengths share the next write slot. Continuous batching (server/running_batch.py) joins a
        row prefilled alone to a running batch, or drops finished rows, this way. A row's slots stay
        contiguous, so slot distances (the causal and sliding-window masks) are unchanged; RoPE
        positions are per row and were applied before caching.
        """
        if self.length:
            raise ValueError("take_rows needs an empty KV cache")
        if length > self.max_len or sum(rows.shape[0] for _, rows in parts) != self.batch_size:
            raise ValueError(f"{self.batch_size} rows of at most {self.max_len} slots cannot hold these parts")
        first = 0
        for source, rows in parts:
            rows = rows.to(self.valid.device)
            width = min(source.length, length)  # the source's last `width` slots move; nothing valid may be before
            if bool(source.valid.index_select(0, rows)[:, :source.length - width].any()):
                raise ValueError(f"a row fills more than {length} slots: it cannot end at slot {length - 1}")
            src, dst = slice(source.length - width, source.length), slice(length - width, length)
            end = first + len(rows)
            for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
                for layer, tensor in enumerate(theirs):
                    mine[layer][first:end, :, dst] = tensor[:, :, src].index_select(0, rows)
            self.valid[first:end, dst] = source.valid[:, src].index_select(0, rows)
            self.is_prefix[first:end, dst] = source.is_prefix[:, src].index_select(0, rows)
            first = end
        self.length = length
