"""Choosing the next token from logits: pure functions of (logits, settings, random generators).

Temperature 0 is greedy (argmax). Otherwise, in transformers' order: divide by temperature, keep the
top-k logits, keep the smallest set of tokens whose probability reaches top-p, then draw. Each row
draws from its own `torch.Generator`, so a row's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature == self.temperature):
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to float logits (B, V); removed tokens get -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams | list[SamplingParams],
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). `params` may differ per row; `generators[i]` drives row i."""
    rows = logits.shape[0]
    params = params if isinstance(params, list) else [params] * rows
    generators = generators or [None] * rows
    tokens = logits.argmax(dim=-1)
    for i, (row_params, generator) in enumerate(zip(params, generators)):
        if not row_params.greedy:
            probs = filter_logits(logits[i:i + 1], row_params).softmax(dim=-1)[0]
            tokens[i] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens


def make_generators(seed: int | list[int | None] | None, batch_size: int) -> list[torch.Generator | None]:
    """One generator per row: an int seeds every row alike, a list gives each row its own seed."""
    seeds = seed if isinstance(seed, list) else [seed] * batch_size
    if len(seeds) != batch_size:
        raise UsageError(f"got {len(seeds)} seeds for a batch of {batch_size}")
    return [None if s is None else torch.Generator().manual_seed(int(s)) for s in seeds]
