"""Choosing the next token from logits: pure functions of (logits, settings, random generators).

Temperature 0 is greedy (argmax). Otherwise, in transformers' order: divide by temperature, keep the
top-k logits, keep the smallest set of tokens whose probability reaches top-p, then draw. Each row
draws from its own `torch.Generator`, so a row's tokens do not depend on what else is in the batch.

Every chosen token comes with its log-probability under the distribution it was drawn from (the
log-softmax after temperature, top-k and top-p; for greedy rows the plain log-softmax), which is
what transformers' `compute_transition_scores(..., normalize_logits=True)` gives on greedy output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

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


class Choice(NamedTuple):
    """The tokens chosen for a batch and what they were chosen from."""

    tokens: torch.Tensor  # (B,) token ids
    logprobs: torch.Tensor  # (B,) float32: log-prob of each token under the distribution it was drawn from
    top_ids: torch.Tensor | None  # (B, N): the N most likely tokens of that distribution, most likely first
    top_logprobs: torch.Tensor | None  # (B, N) float32, -inf where the distribution has fewer than N tokens


def choose_next(logits: torch.Tensor, params: SamplingParams | list[SamplingParams],
                generators: list[torch.Generator | None] | None = None, allowed: torch.Tensor | None = None,
                top_logprobs: int = 0) -> Choice:
    """Next token ids from logits (B, V), with their log-probabilities.

    `params` may differ per row; `generators[i]` drives row i. `allowed` (B, V) bool, when given,
    removes the other tokens first (constrained decoding). A greedy row's distribution is the
    softmax of its (allowed) logits; a sampled row's is the one it was drawn from, after
    temperature, top-k and top-p. `top_logprobs` > 0 also returns that many best alternatives.
    """
    rows = logits.shape[0]
    params = params if isinstance(params, list) else [params] * rows
    generators = generators or [None] * rows
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    tokens = logits.argmax(dim=-1)
    distributions = logits.float().log_softmax(dim=-1)  # (B, V)
    for i, (row_params, generator) in enumerate(zip(params, generators)):
        if not row_params.greedy:
            filtered = filter_logits(logits[i:i + 1], row_params)
            tokens[i] = torch.multinomial(filtered.softmax(dim=-1)[0], 1, generator=generator)[0]
            distributions[i] = filtered[0].log_softmax(dim=-1)
    chosen = distributions.gather(1, tokens[:, None])[:, 0]
    if not top_logprobs:
        return Choice(tokens, chosen, None, None)
    top = torch.topk(distributions, min(top_logprobs, distributions.shape[-1]), dim=-1)
    return Choice(tokens, chosen, top.indices, top.values)


def make_generators(seed: int | list[int | None] | None, batch_size: int) -> list[torch.Generator | None]:
    """One generator per row: an int seeds every row alike, a list gives each row its own seed."""
    seeds = seed if isinstance(seed, list) else [seed] * batch_size
    if len(seeds) != batch_size:
        raise UsageError(f"got {len(seeds)} seeds for a batch of {batch_size}")
    return [None if s is None else torch.Generator().manual_seed(int(s)) for s in seeds]


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of a prompt's `choice`-th answer when it asks for several (n > 1): its own seed for
    the first, a fixed hash of (seed, choice) for the others, so every answer is reproducible alone."""
    if seed is None or choice == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{int(seed)}/{choice}".encode()).digest()[:8], "little") >> 1
