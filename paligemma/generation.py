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

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .beam_search import beam_search
from .constrained import grammars_for
from .decoding import DecodeSession, GenerationResult, row_counts, row_values
from .errors import UsageError
from .model import PaliGemma
from .sampling import Choice, SamplingParams, choice_seed


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    text: str  # new text since this row's previous event (may be "")
    finish_reason: str | None = None  # set on the row's last event
    result: GenerationResult | None = None  # set on the row's last event
    choice: int = 0  # which of the prompt's `n` answers


class DecodedRow:
    """Detokenization, stop handling and log-probs for one decoded row (`stream_generate`'s and the server's)."""

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
    answers = row_counts(n, batch, "n")
    rows = [prompt for prompt in range(batch) for _ in range(answers[prompt])]  # decoded row -> its prompt
    choices = [choice for prompt in range(batch) for choice in range(answers[prompt])]
    max_new = row_values(max_new_tokens, batch, "max_new_tokens")
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t, p, k in zip(
        row_values(temperature, batch, "temperature"), row_values(top_p, batch, "top_p"),
        row_values(top_k, batch, "top_k"))]
    if isinstance(seed, (list, tuple)) and len(seed) != batch:
        raise UsageError(f"got {len(seed)} seeds for a batch of {batch}: give one seed, or one per prompt")
    prompt_seeds = row_values(seed, batch, "seed")
    seeds = [choice_seed(prompt_seeds[prompt], choice) for prompt, choice in zip(rows, choices)]
    tops = row_counts(top_logprobs, batch, "top_logprobs", minimum=0)
    grammars = grammars_for(processor.tokenizer, prompts, row_values(constrain, batch, "constrain"),
                            model.config.text.vocab_size)
    stops = _row_stops(stop, batch)
    session = DecodeSession(model, inputs, [max_new[p] for p in rows], [params[p] for p in rows], seeds,
                            image_features, rows=rows, grammars=[grammars[p] for p in rows], top_logprobs=max(tops))
    decoded = [DecodedRow(processor.tokenizer, stops[p], max_new[p], tops[p]) for p in rows]
    pad = torch.tensor(processor.tokenizer.pad_id)
    for _ in range(max(max_new)):
        drawn = session.sample()
        tokens, logprobs = drawn.tokens.tolist(), drawn.logprobs.tolist()
        for r, row in enumerate(decoded):
            if row.finish_reason is not None:
                continue
            delta = row.add(tokens[r], logprobs[r], top_alternatives(drawn, r, row.top_logprobs))
            if row.finish_reason is None:
                if delta:
                    yield StreamEvent(rows[r], delta, choice=choices[r])
                continue
            result = row.result(session.prompt_tokens[r], dict(session.timings))  # a snapshot: the batch may run on
            yield StreamEvent(rows[r], delta, row.finish_reason, result, choice=choices[r])
        done = torch.tensor([row.finish_reason is not None for row in decoded])
        if bool(done.all()):
            return
        session.advance(torch.where(done.to(drawn.tokens.device), pad, drawn.tokens))


def top_alternatives(drawn: Choice, row: int, count: int) -> list[tuple[int, float]]:
    """Row `row`'s `count` best (token id, log-prob) of the step; tokens that could not be drawn are left out."""
    if not count:
        return []
    pairs = zip(drawn.top_ids[row, :count].tolist(), drawn.top_logprobs[row, :count].tolist())
    return [(token, logprob) for token, logprob in pairs if logprob != float("-inf")]


def _row_stops(stop, batch: int) -> list[list[str]]:
    """Stop strings per row from None, a string, a list of strings (every row) or a list of lists (per row)."""
    if stop is None or isinstance(stop, str):
        stop = [] if stop is None else [stop]
    per_row_given = any(s is None or isinstance(s, (list, tuple)) for s in stop)
    per_row = row_values(stop, batch, "stop") if per_row_given else [stop] * batch
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
        return beam_search(model, processor, images, prompts, num_beams, n=n, length_penalty=length_penalty,
                           early_stopping=early_stopping, **kwargs)
    if length_penalty != 1.0 or early_stopping is not False:
        raise UsageError("length_penalty and early_stopping apply to beam search only: also set num_beams > 1")
    batch = 1 if isinstance(prompts, str) else len(prompts)
    wanted = row_counts(n, batch, "n")
    drawn = wanted if best_of is None else row_counts(best_of, batch, "best_of")
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
