"""The running decode batch of continuous batching: rows join after their own prefill and leave when done.

Tensor-level and single-threaded (the engine's worker thread drives it; no tokenizer):

    batch.add(row, input_ids, attention_mask, features, params, seed, max_new_tokens)  # prefill alone, join
    choice = batch.sample()                     # the next token of every row, each from its own generator
    batch.advance(tokens, keep)                 # rows not kept leave; the others decode one token

or, to bound how long a joining row's prefill holds up the running rows, in pieces of a few
decoder layers (`PrefillInSteps`), one piece between two decode steps:

    joining = batch.begin(row, ..., layers_per_step=3)   # then, between decode steps:
    batch.prefill_step(joining)                          # True once the row has joined

Every row shares one KV cache, right-aligned: all rows write their next token at the same slot
(`KVCache.take_rows`). A joining row is prefilled alone in a cache of its own, exactly as
`generate` prefills it, then moved in; when rows leave, the cache is rebuilt from the rows that stay,
so its length is always the longest row's, not the batch's history. Rebuilding copies the cache
(rows x slots x layers), which costs little next to a prefill or a decode step.

A row's RoPE positions are its own (its real tokens counted from 1), so padding never shifts them,
and its sampling settings, `torch.Generator` and answer grammar (`constrained.AnswerGrammar`, None
when unconstrained) are its own, so its tokens are the ones it gets alone.
"""

from __future__ import annotations

import time

import torch

from ..attention_mask import prefix_lm_mask
from ..constrained import AnswerGrammar
from ..gemma import rotary_cos_sin
from ..kv_cache import KVCache
from ..model import PaliGemma
from ..sampling import Choice, SamplingParams, choose_next, make_generators


class PrefillInSteps:
    """`model.prefill` of one prompt, `layers_per_step` decoder layers per `step()`.

    A prefill cannot be cut by tokens: the prefix (image tokens and prompt) attends to itself in
    both directions, so the first token's output needs every later token's keys. Cut by layers it
    stays exact: each piece runs whole layers over the whole prompt, the same operations in the
    same order as `PaliGemma.run_decoder`, only spread over several steps, so the logits and the
    cache are bit for bit `model.prefill`'s (tests/test_continuous_batching.py checks it).
    """

    def __init__(self, model: PaliGemma, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_features: torch.Tensor | None, layers_per_step: int):
        device, decoder = model.device, model.language_model
        self.model, self.layers_per_step, self.next_layer = model, layers_per_step, 0
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        valid = attention_mask.bool()  # the whole prompt is the prefix, as in `model.prefill`
        self.cache = model.new_cache(1, input_ids.shape[1])
        with torch.no_grad():
            self.hidden = model.embed(input_ids, image_features)  # (1, T, D)
            self.slots = self.cache.reserve(input_ids.shape[1], valid, valid)
            self.masks = {window: prefix_lm_mask(self.slots, valid, self.cache.valid, self.cache.is_prefix, window,
                                                 self.hidden.dtype) for window in decoder.attention_windows}
            self.rotary = rotary_cos_sin(attention_mask.long().cumsum(-1), decoder.config.head_dim,
                                         decoder.config.rope_theta, self.hidden.dtype)
        self.logits: torch.Tensor | None = None  # (1, V) once every layer has run

    def step(self) -> bool:
        """Run the next `layers_per_step` layers; True once the prefill is complete."""
        decoder = self.model.language_model
        with torch.no_grad():
            for layer in decoder.layers[self.next_layer:self.next_layer + self.layers_per_step]:
                self.hidden = layer(self.hidden, self.rotary, self.masks, self.cache, self.slots)
            self.next_layer += self.layers_per_step
            if self.next_layer >= len(decoder.layers):
                self.logits = self.model.logits(decoder.norm(self.hidden)[:, -1])
        return self.logits is not None


class RunningBatch:
    def __init__(self, model: PaliGemma):
        self.model = model
        self.rows: list = []  # the caller's row objects, in cache order
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator | None] = []
        self.left: list[int] = []  # per row: tokens it may still sample
        self.top_logprobs: list[int] = []
        self.grammars: list[AnswerGrammar | None] = []
        self.states: list[tuple | None] = []  # per row: its grammar's state
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # (R, V): every row's next-token logits
        self.positions = torch.zeros(0, dtype=torch.long, device=model.device)  # (R,): position of each last token

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def context_length(self) -> int:
        return self.model.config.text.max_position_embeddings

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a row of `prompt_tokens` that may sample `max_new_tokens` can join now: the shared
        cache, aligned on its longest row, must hold every row's remaining tokens within the context."""
        length = max(self._span(), prompt_tokens)
        return length + max(self.left + [max_new_tokens]) <= self.context_length

    def add(self, row, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None,
            params: SamplingParams, seed: int | None, max_new_tokens: int, top_logprobs: int = 0,
            grammar: AnswerGrammar | None = None) -> float:
        """Prefill one prompt (1, T) alone and join it to the batch; returns the prefill's seconds."""
        start = time.perf_counter()
        device = self.model.device
        single = self.model.new_cache(1, input_ids.shape[1])
        logits = self.model.prefill(input_ids.to(device), attention_mask.to(device), single,
                                    image_features=image_features)
        seconds = time.perf_counter() - start
        self._join(_Joining(row, int(attention_mask.sum()), params, seed, max_new_tokens, top_logprobs, grammar),
                   single, logits)
        return seconds

    def begin(self, row, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None,
              params: SamplingParams, seed: int | None, max_new_tokens: int, top_logprobs: int = 0,
              grammar: AnswerGrammar | None = None, layers_per_step: int = 1) -> "_Joining":
        """Start a prefill in pieces of `layers_per_step` decoder layers; `prefill_step` runs them."""
        joining = _Joining(row, int(attention_mask.sum()), params, seed, max_new_tokens, top_logprobs, grammar)
        joining.prefill = PrefillInSteps(self.model, input_ids, attention_mask, image_features, layers_per_step)
        return joining

    def prefill_step(self, joining: "_Joining") -> bool:
        """Run `joining`'s next piece of prefill, and join it to the batch once its prefill is complete and
        the cache can hold it (else it waits for rows to leave); True once it has joined."""
        start = time.perf_counter()
        prefill = joining.prefill
        done = prefill.logits is not None or prefill.step()
        joining.seconds += time.perf_counter() - start
        if not done or (len(self) and not self.fits(joining.prompt_tokens, joining.max_new_tokens)):
            return False
        self._join(joining, prefill.cache, prefill.logits)
        joining.prefill = None
        return True

    def _join(self, joining: "_Joining", single: KVCache, logits: torch.Tensor) -> None:
        """Move a prefilled row (its cache `single`, next-token logits (1, V)) into the batch."""
        # Before its next sample, a row writes at most left - 1 more tokens: its last one is never fed back.
        self._rebuild([(self.cache, torch.arange(len(self.rows))), (single, torch.zeros(1, dtype=torch.long))],
                      max(self._span(), joining.prompt_tokens), max(self.left + [joining.max_new_tokens]) - 1)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.positions = torch.cat([self.positions, torch.tensor([joining.prompt_tokens], device=self.model.device)])
        self.rows.append(joining.row)
        self.params.append(joining.params)
        self.generators += make_generators(joining.seed, 1)
        self.left.append(joining.max_new_tokens)
        self.top_logprobs.append(joining.top_logprobs)
        self.grammars.append(joining.grammar)
        self.states.append(None if joining.grammar is None else joining.grammar.start())

    def sample(self) -> Choice:
        """The next token of every row (R,) from its latest logits, with log-probs (and alternatives)."""
        choice = choose_next(self.logits, self.params, self.generators, self._allowed(), max(self.top_logprobs))
        self.left = [left - 1 for left in self.left]
        return choice

    def _allowed(self) -> torch.Tensor | None:
        """(R, V) bool: the tokens each row's grammar allows next (all for an unconstrained row), as
        `DecodeSession.allowed_tokens` with a row's budget its `left` tokens; None when no row is constrained."""
        if all(g is None for g in self.grammars):
            return None
        vocab = self.logits.shape[-1]
        masks = [torch.ones(vocab, dtype=torch.bool) if g is None else g.allowed(state, max(left, 1))
                 for g, state, left in zip(self.grammars, self.states, self.left)]
        return torch.stack(masks).to(self.logits.device)

    def advance(self, tokens: torch.Tensor, keep: list[bool]) -> None:
        """Rows with `keep` False leave; the others take their token (R,) and compute their next logits."""
        if not all(keep):
            self.remove([i for i, kept in enumerate(keep) if not kept])
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
        if not self.rows:
            return
        if any(g is not None for g in self.grammars):
            self.states = [None if g is None else g.advance(state, token)
                           for g, state, token in zip(self.grammars, self.states, tokens.tolist())]
        self.positions = self.positions + 1
        self.logits = self.model.decode_step(tokens.to(self.model.device), self.positions, self.cache)

    def remove(self, indices: list[int]) -> None:
        """Drop rows `indices`; the cache is rebuilt from the rows that stay, as short as they allow."""
        gone = set(indices)
        stay = [i for i in range(len(self.rows)) if i not in gone]
        for name in ("rows", "params", "generators", "left", "top_logprobs", "grammars", "states"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in stay])
        if not stay:
            self.cache, self.logits = None, None
            self.positions = self.positions[:0]
            return
        kept = torch.tensor(stay, device=self.positions.device)
        self.positions = self.positions.index_select(0, kept)
        self.logits = self.logits.index_select(0, kept.to(self.logits.device))
        # Rows leave between a sample and the decode step that feeds it: each still writes `left` tokens.
        self._rebuild([(self.cache, kept)], self._span(), max(self.left))

    def clear(self) -> list:
        """Drop every row (after a failure); returns them."""
        rows = self.rows
        self.remove(list(range(len(rows))))
        return rows

    def _span(self) -> int:
        """Slots the longest row fills: its real tokens so far (0 for an empty batch)."""
        return int(self.positions.max()) if len(self.positions) else 0

    def _rebuild(self, parts: list[tuple[KVCache | None, torch.Tensor]], length: int, room: int) -> None:
        """A new cache of exactly the rows of `parts`, aligned on slot `length` - 1, with `room` free slots."""
        parts = [(cache, rows) for cache, rows in parts if cache is not None and len(rows)]
        cache = self.model.new_cache(sum(len(rows) for _, rows in parts), length + max(room, 0))
        cache.take_rows(parts, length)
        self.cache = cache


class _Joining:
    """A row on its way into the batch: its settings, and its prefill while it runs in pieces."""

    def __init__(self, row, prompt_tokens: int, params: SamplingParams, seed: int | None, max_new_tokens: int,
                 top_logprobs: int, grammar: AnswerGrammar | None = None):
        self.row, self.prompt_tokens, self.params, self.seed = row, prompt_tokens, params, seed
        self.max_new_tokens, self.top_logprobs, self.grammar = max_new_tokens, top_logprobs, grammar
        self.prefill: PrefillInSteps | None = None
        self.seconds = 0.0  # prefill time so far
