"""The tensor-level decode loop shared by sampling and beam search, and the result of one answer.

`DecodeSession` prefills a batch of prompts once, then advances one token per row per step over a
preallocated KV cache; it knows no tokenizer. Several rows may continue one prompt (n answers, or
beams): the prompt is prefilled once and its cache rows copied (`KVCache.index_select`). Each row
may be constrained by an answer grammar (`constrained.py`), which masks its logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .constrained import AnswerGrammar
from .errors import UsageError
from .model import PaliGemma
from .sampling import Choice, SamplingParams, choose_next, make_generators
from .tasks import TokenSpan


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, the final <eos> included when there was one
    finish_reason: str  # "eos", "stop_string" or "length"
    prompt_tokens: int  # real (unpadded) prompt length, image tokens included
    timings: dict = field(default_factory=dict)  # seconds: encode_images, prefill, decode
    logprobs: list[float] = field(default_factory=list)  # per token of token_ids: its log-prob when drawn
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the N best (id, log-prob), if asked
    text_offsets: list[int] = field(default_factory=list)  # per token: end of the text it wrote, in characters
    beam_score: float | None = None  # beam search only: sum(logprobs) / len(token_ids) ** length_penalty

    @property
    def total_logprob(self) -> float:
        """Log-probability of the whole answer: the sum of its tokens' (what `best_of` ranks by)."""
        return sum(self.logprobs)

    def token_spans(self) -> list[TokenSpan] | None:
        """Each token's characters [start, end) of `text` and its log-prob: what `parse_detections`
        and `parse_segmentations` score objects with. None for a result without log-probs (made by hand)."""
        if not len(self.logprobs) == len(self.text_offsets) == len(self.token_ids):
            return None
        starts = [0] + self.text_offsets[:-1]
        return [TokenSpan(start, end, logprob) for start, end, logprob in zip(starts, self.text_offsets, self.logprobs)]


class DecodeSession:
    """Prefill once, then one token per step for a whole batch, over a preallocated KV cache.

    `rows` (one entry per decoded row: the prompt it continues) lets several rows share a prompt:
    the prompt is prefilled once and its cache rows copied. Every other per-row argument has one
    entry per decoded row. `grammars` (None for an unconstrained row) mask each row's logits.
    """

    def __init__(self, model: PaliGemma, inputs: dict, max_new_tokens: list[int],
                 params: SamplingParams | list[SamplingParams], seed: int | list[int | None] | None = None,
                 image_features: torch.Tensor | None = None, rows: list[int] | None = None,
                 grammars: list[AnswerGrammar | None] | None = None, top_logprobs: int = 0):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, prompt_len = input_ids.shape
        rows = list(range(batch)) if rows is None else list(rows)
        prompt_lengths = attention_mask.sum(-1).tolist()
        self.prompt_tokens = [prompt_lengths[row] for row in rows]
        context = model.config.text.max_position_embeddings
        for prompt_tokens, new_tokens in zip(self.prompt_tokens, max_new_tokens):
            if new_tokens < 1:
                raise UsageError(f"max_new_tokens must be >= 1, got {new_tokens}")
            if prompt_tokens + new_tokens > context:
                raise UsageError(f"prompt ({prompt_tokens} tokens, image tokens included) + max_new_tokens "
                                 f"({new_tokens}) exceeds the model's context of {context} tokens: shorten the "
                                 "prompt or ask for fewer new tokens")
        self.model = model
        self.params = params
        self.generators = make_generators(seed, len(rows))
        self.max_new_tokens = list(max_new_tokens)
        self.grammars = grammars or [None] * len(rows)
        self.states = [None if g is None else g.start() for g in self.grammars]
        self.top_logprobs = top_logprobs
        self.steps = 0  # tokens generated so far by every row
        self.timings = {}
        start = time.perf_counter()
        with torch.no_grad():
            if image_features is None and inputs.get("pixel_values") is not None:
                image_features = model.encode_images(inputs["pixel_values"].to(model.device))
            self.timings["encode_images"] = time.perf_counter() - start
            start = time.perf_counter()
            self.cache = model.new_cache(batch, prompt_len + max(max_new_tokens))
            self.logits = model.prefill(input_ids.to(model.device), attention_mask.to(model.device), self.cache,
                                        image_features=image_features)
        self.positions = attention_mask.long().sum(-1).to(model.device)  # last real position, counted from 1
        if rows != list(range(batch)):
            self._select(torch.tensor(rows, device=model.device))
        self.timings["prefill"] = time.perf_counter() - start
        self.timings["decode"] = 0.0

    def allowed_tokens(self) -> torch.Tensor | None:
        """(R, V) bool: what each row's grammar allows next, all True for unconstrained rows; None if none is."""
        if all(g is None for g in self.grammars):
            return None
        vocab = self.logits.shape[-1]
        masks = [torch.ones(vocab, dtype=torch.bool) if g is None else
                 g.allowed(state, max(budget - self.steps, 1))
                 for g, state, budget in zip(self.grammars, self.states, self.max_new_tokens)]
        return torch.stack(masks).to(self.logits.device)

    def sample(self) -> Choice:
        """The next token of every row (R,) from the latest logits, with its log-prob (and alternatives)."""
        return choose_next(self.logits, self.params, self.generators, self.allowed_tokens(), self.top_logprobs)

    def reorder(self, rows: torch.Tensor) -> None:
        """Continue rows `rows` (R,) of the current ones, in that order, repeats allowed (beam search)."""
        self._select(rows)
        self.states = [self.states[row] for row in rows.tolist()]

    def _select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.model.device)
        self.cache.index_select(rows)
        self.positions = self.positions.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (R,) and compute the logits after it."""
        start = time.perf_counter()
        self.states = [None if g is None else g.advance(state, token)
                       for g, state, token in zip(self.grammars, self.states, tokens.tolist())]
        self.steps += 1
        self.positions = self.positions + 1
        self.logits = self.model.decode_step(tokens.to(self.model.device), self.positions, self.cache)
        self.timings["decode"] += time.perf_counter() - start


def row_values(value, batch: int, name: str) -> list:
    """A setting as one value per row: a scalar is repeated, a sequence must have one value per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} values for a batch of {batch} prompts")
        return list(value)
    return [value] * batch


def row_counts(value, batch: int, name: str, minimum: int = 1) -> list[int]:
    """An integer setting per row, each at least `minimum`."""
    values = row_values(value, batch, name)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return values
