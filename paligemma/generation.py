"""Text generation: images + prompts -> answers, whole or streamed.

    encode images (once) -> prefill the prompt into a KV cache -> repeat: sample, decode one token

`DecodeSession` is the tensor-level loop (no tokenizer); `stream_generate` adds detokenization,
stop strings and finish reasons on top, and `generate` / `generate_detailed` collect the stream.
A row stops at `<eos>` (finish reason "eos"), when its text contains a stop string ("stop_string",
the stop string and what follows it cut off), or after `max_new_tokens` tokens ("length").

Every answer carries the log-probability of each of its tokens under the distribution it was drawn
from (`sampling.py` says which) and, with `top_logprobs=N`, the N best alternatives at each step.
`n` answers per prompt share the prompt's prefill (its cache rows are copied, not recomputed), each
with its own seed (`sampling.choice_seed`); `best_of` draws that many and keeps the `n` with the
highest total log-probability. `constrain` allows only well-formed detect/segment answers
(`constrained.py`); `num_beams` > 1 is beam search (`beam_search.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .constrained import AnswerGrammar, grammars_for
from .errors import UsageError
from .model import PaliGemma
from .sampling import Choice, SamplingParams, choice_seed, choose_next, make_generators
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

    def token_spans(self) -> list[TokenSpan]:
        """Each token's characters [start, end) of `text` and its log-prob: what `parse_detections`
        and `parse_segmentations` score objects with."""
        starts = [0] + self.text_offsets[:-1]
        return [TokenSpan(start, end, logprob) for start, end, logprob in zip(starts, self.text_offsets, self.logprobs)]


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    text: str  # new text since this row's previous event (may be "")
    finish_reason: str | None = None  # set on the row's last event
    result: GenerationResult | None = None  # set on the row's last event
    choice: int = 0  # which of the prompt's `n` answers


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


class _Row:
    """Detokenization, stop handling and log-probs for one decoded row."""

    def __init__(self, tokenizer, stop: list[str], max_new_tokens: int, top_logprobs: int = 0):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_new_tokens = max_new_tokens
        self.top_logprobs = top_logprobs
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.offsets: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None

    def add(self, token: int, logprob: float = 0.0, top: list[tuple[int, float]] | None = None) -> str:
        """Take one token; return newly safe text. Sets `finish_reason` when the row is done."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.top.append(top or [])
        if token == self.tokenizer.eos_id:
            self.finish_reason = "eos"
        else:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, keep_loc_seg=True)
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop_string"
            elif len(self.token_ids) == self.max_new_tokens:
                self.finish_reason = "length"
        self.offsets.append(len(self.text))
        safe = len(self.text) if self.finish_reason else len(self.text) - self._held_back()
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def result(self, prompt_tokens: int, timings: dict) -> GenerationResult:
        return GenerationResult(self.text, self.token_ids, self.finish_reason, prompt_tokens, timings,
                                logprobs=self.logprobs, top_logprobs=self.top if self.top_logprobs else None,
                                text_offsets=[min(o, len(self.text)) for o in self.offsets])  # a stop string cuts

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
                    image_features: torch.Tensor | None = None, n: int | Sequence[int] = 1,
                    top_logprobs: int | Sequence[int] = 0,
                    constrain: bool | Sequence[bool] = False) -> Iterator[StreamEvent]:
    """Yield `StreamEvent`s as text is decoded; each answer's last event carries its `GenerationResult`.

    images/prompts as for the processor: one image (or a list of images) per prompt.
    Every setting is one value for the batch or a list with one value per prompt; `stop` is a
    string, a list of strings for every row, or a list of such lists, one per row.
    `image_features` (num_images, N, D) may be passed instead of encoding `images` again; the
    images are then neither loaded nor resized, only counted.
    `n` answers per prompt: events say which prompt (`index`) and which of its answers (`choice`).
    `top_logprobs=N` adds the N most likely tokens of each step to the results. `constrain=True`
    (detect and segment prompts only) allows only answers that parse (see `constrained.py`).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    inputs = processor(images=images, prompts=prompts, with_pixels=image_features is None)
    batch = len(prompts)
    counts = _counts(n, batch, "n")
    rows = [prompt for prompt in range(batch) for _ in range(counts[prompt])]  # decoded row -> its prompt
    choices = [choice for prompt in range(batch) for choice in range(counts[prompt])]
    max_new = _per_row(max_new_tokens, batch, "max_new_tokens")
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t, p, k in zip(
        _per_row(temperature, batch, "temperature"), _per_row(top_p, batch, "top_p"), _per_row(top_k, batch, "top_k"))]
    if isinstance(seed, (list, tuple)) and len(seed) != batch:
        raise UsageError(f"got {len(seed)} seeds for a batch of {batch}: give one seed, or one per prompt")
    prompt_seeds = _per_row(seed, batch, "seed")
    seeds = [choice_seed(prompt_seeds[prompt], choice) for prompt, choice in zip(rows, choices)]
    tops = _counts(top_logprobs, batch, "top_logprobs", minimum=0)
    grammars = grammars_for(processor.tokenizer, prompts, _per_row(constrain, batch, "constrain"),
                            model.config.text.vocab_size)
    stops = _row_stops(stop, batch)
    session = DecodeSession(model, inputs, [max_new[p] for p in rows], [params[p] for p in rows], seeds,
                            image_features, rows=rows, grammars=[grammars[p] for p in rows], top_logprobs=max(tops))
    decoded = [_Row(processor.tokenizer, stops[p], max_new[p], tops[p]) for p in rows]
    pad = torch.tensor(processor.tokenizer.pad_id)
    for _ in range(max(max_new)):
        choice = session.sample()
        for r, row in enumerate(decoded):
            if row.finish_reason is not None:
                continue
            top = _alternatives(choice, r, row.top_logprobs)
            delta = row.add(int(choice.tokens[r]), float(choice.logprobs[r]), top)
            if row.finish_reason is None:
                if delta:
                    yield StreamEvent(rows[r], delta, choice=choices[r])
                continue
            result = row.result(session.prompt_tokens[r], dict(session.timings))  # a snapshot: the batch may run on
            yield StreamEvent(rows[r], delta, row.finish_reason, result, choice=choices[r])
        done = torch.tensor([row.finish_reason is not None for row in decoded])
        if bool(done.all()):
            return
        session.advance(torch.where(done.to(choice.tokens.device), pad, choice.tokens))


def _alternatives(choice: Choice, row: int, count: int) -> list[tuple[int, float]]:
    """Row `row`'s `count` best (token id, log-prob) of the step; tokens that could not be drawn are left out."""
    if not count:
        return []
    pairs = zip(choice.top_ids[row, :count].tolist(), choice.top_logprobs[row, :count].tolist())
    return [(token, logprob) for token, logprob in pairs if logprob != float("-inf")]


def _per_row(value, batch: int, name: str) -> list:
    """A setting as one value per row: a scalar is repeated, a sequence must have one value per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} values for a batch of {batch} prompts")
        return list(value)
    return [value] * batch


def _counts(value, batch: int, name: str, minimum: int = 1) -> list[int]:
    """An integer setting per row, each at least `minimum`."""
    values = _per_row(value, batch, name)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return values


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


# Settings that mean nothing to beam search (deterministic, whole answers only), with their "off" values.
_SAMPLING_ONLY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": None, "top_logprobs": 0}


def generate_detailed(model: PaliGemma, processor, images, prompts: str | Sequence[str],
                      n: int | Sequence[int] = 1, best_of: int | Sequence[int] | None = None, num_beams: int = 1,
                      length_penalty: float = 1.0, early_stopping: bool | str = False,
                      **kwargs) -> list[GenerationResult]:
    """Like `generate`, with the token ids, log-probs, finish reason and timings of each answer.

    Returns `n` results per prompt, prompt by prompt. With `best_of`, each prompt's `best_of`
    answers are drawn and its `n` best by `total_logprob` kept, most likely first. `num_beams` > 1
    runs beam search (`beam_search.beam_search`: `n` <= num_beams best beams; `length_penalty`,
    `early_stopping`); sampling settings (temperature, top_p, top_k, stop, top_logprobs) do not apply.
    Other keyword arguments are `stream_generate`'s.
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UsageError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if num_beams > 1:
        used = [name for name, off in _SAMPLING_ONLY.items() if name in kwargs and not _is_off(kwargs.pop(name), off)]
        if used or best_of is not None:
            raise UsageError(f"{', '.join(used + ['best_of'] * (best_of is not None))} cannot be used with beam search "
                             "(num_beams > 1): it is deterministic and returns whole answers")
        kwargs.pop("seed", None)  # nothing is drawn
        from .beam_search import beam_search

        return beam_search(model, processor, images, prompts, num_beams, n=n, length_penalty=length_penalty,
                           early_stopping=early_stopping, **kwargs)
    if length_penalty != 1.0 or early_stopping is not False:
        raise UsageError("length_penalty and early_stopping apply to beam search only: also set num_beams > 1")
    batch = 1 if isinstance(prompts, str) else len(prompts)
    wanted = _counts(n, batch, "n")
    drawn = wanted if best_of is None else _counts(best_of, batch, "best_of")
    if any(d < w for d, w in zip(drawn, wanted)):
        raise UsageError(f"best_of ({best_of}) must be at least n ({n})")
    results: dict[tuple[int, int], GenerationResult] = {}
    for event in stream_generate(model, processor, images, prompts, n=drawn, **kwargs):
        if event.result is not None:
            results[event.index, event.choice] = event.result
    answers = []
    for prompt in range(batch):
        candidates = [results[prompt, choice] for choice in range(drawn[prompt])]
        if best_of is not None:
            candidates.sort(key=lambda result: -result.total_logprob)
        answers += candidates[:wanted[prompt]]
    return answers


def _is_off(value, off) -> bool:
    """Whether a setting (one value, or one per row) is at its "off" value everywhere."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v == off or (off is None and not v) for v in values)


def generate(model: PaliGemma, processor, images, prompts: str | Sequence[str], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | list[int | None] | None = None, stop: str | Sequence[str] | None = None,
             n: int = 1, best_of: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, constrain: bool = False) -> list[str]:
    """Answer each prompt about its image(s); greedy by default. Returns `n` strings per prompt (one by default).

    Settings apply to every prompt, or give a list with one value per prompt (see `stream_generate`);
    `n`, `best_of` and beam search as in `generate_detailed`.
    """
    results = generate_detailed(model, processor, images, prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, n=n,
                                best_of=best_of, num_beams=num_beams, length_penalty=length_penalty,
                                early_stopping=early_stopping, constrain=constrain)
    return [r.text for r in results]
