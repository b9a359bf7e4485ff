"""Text generation: images + prompts -> answers, whole or streamed.

    encode images (once) -> prefill the prompt into a KV cache -> repeat: sample, decode one token

`DecodeSession` is the tensor-level loop (no tokenizer); `stream_generate` adds detokenization,
stop strings and finish reasons on top, and `generate` / `generate_detailed` collect the stream.
A row stops at `<eos>` (finish reason "eos"), when its text contains a stop string ("stop_string",
the stop string and what follows it cut off), or after `max_new_tokens` tokens ("length").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import UsageError
from .model import PaliGemma
from .sampling import SamplingParams, make_generators, sample_next


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, the final <eos> included when there was one
    finish_reason: str  # "eos", "stop_string" or "length"
    prompt_tokens: int  # real (unpadded) prompt length, image tokens included
    timings: dict = field(default_factory=dict)  # seconds: encode_images, prefill, decode


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    text: str  # new text since this row's previous event (may be "")
    finish_reason: str | None = None  # set on the row's last event
    result: GenerationResult | None = None  # set on the row's last event


class DecodeSession:
    """Prefill once, then one token per step for a whole batch, over a preallocated KV cache."""

    def __init__(self, model: PaliGemma, inputs: dict, max_new_tokens: list[int],
                 params: SamplingParams | list[SamplingParams], seed: int | list[int | None] | None = None,
                 image_features: torch.Tensor | None = None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, prompt_len = input_ids.shape
        context = model.config.text.max_position_embeddings
        for prompt_tokens, new_tokens in zip(attention_mask.sum(-1).tolist(), max_new_tokens):
            if new_tokens < 1:
                raise UsageError(f"max_new_tokens must be >= 1, got {new_tokens}")
            if prompt_tokens + new_tokens > context:
                raise UsageError(f"prompt ({prompt_tokens} tokens, image tokens included) + max_new_tokens "
                                 f"({new_tokens}) exceeds the model's context of {context} tokens: shorten the "
                                 "prompt or ask for fewer new tokens")
        self.model = model
        self.params = params
        self.generators = make_generators(seed, batch)
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
        self.timings["prefill"] = time.perf_counter() - start
        self.timings["decode"] = 0.0
        self.positions = attention_mask.long().sum(-1).to(model.device)  # last real position, counted from 1
        self.prompt_tokens = attention_mask.sum(-1).tolist()

    def sample(self) -> torch.Tensor:
        """The next token of every row (B,), from the latest logits."""
        return sample_next(self.logits, self.params, self.generators)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (B,) and compute the logits after it."""
        start = time.perf_counter()
        self.positions = self.positions + 1
        self.logits = self.model.decode_step(tokens.to(self.model.device), self.positions, self.cache)
        self.timings["decode"] += time.perf_counter() - start


class _Row:
    """Detokenization and stop handling for one prompt of the batch."""

    def __init__(self, tokenizer, stop: list[str], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        """Take one token; return newly safe text. Sets `finish_reason` when the row is done."""
        self.token_ids.append(token)
        if token == self.tokenizer.eos_id:
            self.finish_reason = "eos"
        else:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, keep_loc_seg=True)
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop_string"
            elif len(self.token_ids) == self.max_new_tokens:
                self.finish_reason = "length"
        safe = len(self.text) if self.finish_reason else len(self.text) - self._held_back()
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def _held_back(self) -> int:
        """Characters at the end that may still change: a partial UTF-8 character, or the start of a stop string."""
        text = self.text
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    return n
        return 0


def stream_generate(model: PaliGemma, processor, images, prompts: str | Sequence[str],
                    max_new_tokens: int | Sequence[int] = 64, temperature: float | Sequence[float] = 0.0,
                    top_p: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                    seed: int | list[int | None] | None = None, stop=None,
                    image_features: torch.Tensor | None = None) -> Iterator[StreamEvent]:
    """Yield `StreamEvent`s as text is decoded; each row's last event carries its `GenerationResult`.

    images/prompts as for the processor: one image (or a list of images) per prompt.
    Every setting is one value for the batch or a list with one value per prompt; `stop` is a
    string, a list of strings for every row, or a list of such lists, one per row.
    `image_features` (num_images, N, D) may be passed instead of encoding `images` again; the
    images are then neither loaded nor resized, only counted.
    """
    inputs = processor(images=images, prompts=prompts, with_pixels=image_features is None)
    batch = inputs["input_ids"].shape[0]
    max_new = _per_row(max_new_tokens, batch, "max_new_tokens")
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t, p, k in zip(
        _per_row(temperature, batch, "temperature"), _per_row(top_p, batch, "top_p"), _per_row(top_k, batch, "top_k"))]
    stops = _row_stops(stop, batch)
    session = DecodeSession(model, inputs, max_new, params, seed, image_features)
    rows = [_Row(processor.tokenizer, row_stop, row_max) for row_stop, row_max in zip(stops, max_new)]
    pad = torch.tensor(processor.tokenizer.pad_id)
    for _ in range(max(max_new)):
        tokens = session.sample()
        for index, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            delta = row.add(int(tokens[index]))
            if row.finish_reason is None:
                if delta:
                    yield StreamEvent(index, delta)
                continue
            result = GenerationResult(row.text, row.token_ids, row.finish_reason, session.prompt_tokens[index],
                                      dict(session.timings))  # a snapshot: the batch may run on
            yield StreamEvent(index, delta, row.finish_reason, result)
        done = torch.tensor([row.finish_reason is not None for row in rows])
        if bool(done.all()):
            return
        session.advance(torch.where(done.to(tokens.device), pad, tokens))


def _per_row(value, batch: int, name: str) -> list:
    """A setting as one value per row: a scalar is repeated, a sequence must have one value per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} values for a batch of {batch} prompts")
        return list(value)
    return [value] * batch


def _row_stops(stop, batch: int) -> list[list[str]]:
    """Stop strings per row from None, a string, a list of strings (every row) or a list of lists (per row)."""
    if stop is None or isinstance(stop, str):
        stop = [] if stop is None else [stop]
    per_row_given = any(s is None or isinstance(s, (list, tuple)) for s in stop)
    per_row = _per_row(stop, batch, "stop") if per_row_given else [stop] * batch
    rows = [[] if row is None else [row] if isinstance(row, str) else list(row) for row in per_row]
    if any(not isinstance(s, str) or not s for row in rows for s in row):
        raise UsageError("stop strings must be non-empty strings")
    return rows


def generate_detailed(model: PaliGemma, processor, images, prompts: str | Sequence[str],
                      **kwargs) -> list[GenerationResult]:
    """Like `generate`, with the token ids, finish reason and timings of each answer."""
    results: dict[int, GenerationResult] = {}
    for event in stream_generate(model, processor, images, prompts, **kwargs):
        if event.result is not None:
            results[event.index] = event.result
    return [results[i] for i in sorted(results)]


def generate(model: PaliGemma, processor, images, prompts: str | Sequence[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | list[int | None] | None = None, stop: str | Sequence[str] | None = None) -> list[str]:
    """Answer each prompt about its image(s); greedy by default. Returns one string per prompt.

    Settings apply to every prompt, or give a list with one value per prompt (see `stream_generate`).
    """
    results = generate_detailed(model, processor, images, prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
    return [r.text for r in results]
