"""Beam search: the most likely answers, as transformers' `generate(num_beams=K, do_sample=False)` finds them.

Each prompt keeps K running beams and a set of K finished answers. Every step:

1. each running beam's next-token log-probs (the log-softmax of its logits; under `constrain`, of
   the allowed ones) are added to the beam's score (the sum of its tokens' log-probs);
2. the best 2K (beam, token) candidates of the prompt are taken: 2K, so that K can go on even if
   the best K all end here;
3. a candidate ends with `<eos>` or at `max_new_tokens`. Those among the best K enter the finished
   set with the score `sum of log-probs / length ** length_penalty`, where length counts the
   generated tokens, `<eos>` included, the prompt not; the set keeps its best K;
4. the best K candidates that did not end are the next running beams: the KV cache rows are
   reordered to follow them (`KVCache.index_select`) and their new tokens decoded.

When a prompt is done (`early_stopping`, transformers' semantics, followed exactly):

- True: as soon as it has K finished answers;
- False (the default, as in transformers): when it has K finished answers and the best running
  beam's score divided by (tokens generated so far) ** length_penalty is no better than the worst
  finished answer. A heuristic: with length_penalty > 0 a longer answer could still score better;
- "never": as False, but dividing by max_new_tokens ** length_penalty when length_penalty > 0, the
  best a running beam could still reach, so the search is exact;
- in every case at `max_new_tokens`.

A done prompt's finished set no longer changes; the batch runs until every prompt is done. The
answer is the best finished one (the `n` best with `n` > 1). Each prompt is prefilled once; its
cache rows are then copied K times. Scores are float32 sums, as in transformers, and the "-1e9"
that rules a candidate out is transformers' too, so that ties break alike.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .constrained import grammars_for
from .decoding import DecodeSession, GenerationResult, row_counts, row_values
from .errors import UsageError
from .model import PaliGemma
from .sampling import SamplingParams

_OUT = -1.0e9  # transformers' score for "cannot be chosen"


class _Beams:
    """The running beams and finished answers of a batch of prompts: tensors (B, K, ...)."""

    def __init__(self, batch: int, beams: int, max_new_tokens: list[int], eos_id: int, length_penalty: float,
                 early_stopping: bool | str, device: torch.device):
        steps = max(max_new_tokens)
        self.eos_id, self.length_penalty, self.early_stopping = eos_id, length_penalty, early_stopping
        self.max_new_tokens = max_new_tokens
        self.limit = torch.tensor(max_new_tokens, device=device)[:, None]  # (B, 1)
        self.tokens = torch.zeros(batch, beams, steps, dtype=torch.long, device=device)  # running beams
        self.logprobs = torch.zeros(batch, beams, steps, device=device)  # each token's own log-prob
        self.scores = torch.zeros(batch, beams, device=device)
        self.scores[:, 1:] = _OUT  # all beams start equal: only the first one may be extended
        self.done_tokens = torch.zeros_like(self.tokens)  # finished answers
        self.done_logprobs = torch.zeros_like(self.logprobs)
        self.done_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
        self.done_scores = torch.full((batch, beams), _OUT, device=device)
        self.is_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        self.open = torch.ones(batch, 1, dtype=torch.bool, device=device)  # may the finished set still improve?
        self.first_k = torch.arange(2 * beams, device=device) < beams  # (2K,) the best K candidates

    def step(self, log_probs: torch.Tensor, step: int) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """Take the step's log-probs (B*K, V); return (go on?, source row of each new beam (B*K,), its token (B*K,))."""
        batch, beams = self.scores.shape
        vocab = log_probs.shape[-1]
        log_probs = log_probs.view(batch, beams * vocab)
        totals = (log_probs.view(batch, beams, vocab) + self.scores[:, :, None]).view(batch, beams * vocab)
        top_scores, top_index = torch.topk(totals, 2 * beams)  # (B, 2K)
        source, token = top_index // vocab, top_index % vocab
        tokens, logprobs = _gather(self.tokens, source), _gather(self.logprobs, source)
        tokens[:, :, step] = token
        logprobs[:, :, step] = log_probs.gather(1, top_index)
        ends = (token == self.eos_id) | (step + 1 >= self.limit)  # (B, 2K)

        # The best K candidates that go on are the next running beams.
        going_on = top_scores + ends.to(torch.float32) * _OUT
        keep = torch.topk(going_on, beams).indices
        self.tokens, self.logprobs = _gather(tokens, keep), _gather(logprobs, keep)
        self.scores, sources = _gather(going_on, keep), _gather(source, keep)

        # Those of the best K that ended compete for the finished set (while the prompt is open).
        ended = ends & self.first_k
        finished = top_scores / ((step + 1) ** self.length_penalty)
        finished += (self.is_done.all(-1, keepdim=True) & (self.early_stopping is True)).to(torch.float32) * _OUT
        finished += (~self.open).to(torch.float32) * _OUT
        finished += (~ended) * _OUT
        scores = torch.cat((self.done_scores, finished), dim=1)
        best = torch.topk(scores, beams).indices
        self.done_tokens = _gather(torch.cat((self.done_tokens, tokens), dim=1), best)
        self.done_logprobs = _gather(torch.cat((self.done_logprobs, logprobs), dim=1), best)
        lengths = torch.cat((self.done_lengths, torch.full_like(token, step + 1)), dim=1)
        self.done_lengths = _gather(lengths, best)
        self.done_scores = _gather(scores, best)
        self.is_done = _gather(torch.cat((self.is_done, ended), dim=1), best)

        self._update_open(step + 1)
        go_on = bool(self.open.any()) and not (bool(self.is_done.all()) and self.early_stopping is True) \
            and not bool(ends.all())
        rows = (torch.arange(batch, device=sources.device)[:, None] * beams + sources).view(-1)
        return go_on, rows, self.tokens[:, :, step].reshape(-1)

    def _update_open(self, generated: int) -> None:
        """Close each prompt whose finished answers no running beam can beat any more (see module docstring)."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            lengths = self.max_new_tokens
        else:
            lengths = [generated] * len(self.max_new_tokens)
        best_possible = torch.cat([self.scores[row:row + 1, :1] / (length ** self.length_penalty)
                                   for row, length in enumerate(lengths)])  # (B, 1)
        worst_done = torch.where(self.is_done, self.done_scores.min(dim=1, keepdim=True).values, _OUT)
        self.open &= (best_possible > worst_done).any(dim=-1, keepdim=True)
        self.open &= generated < self.limit  # at its max_new_tokens (transformers stops the batch there)

    def answers(self, row: int, count: int) -> list[tuple[list[int], list[float], float]]:
        """The `count` best finished answers of prompt `row`: (tokens, their log-probs, score)."""
        out = []
        for j in range(count):
            length = int(self.done_lengths[row, j])
            out.append((self.done_tokens[row, j, :length].tolist(), self.done_logprobs[row, j, :length].tolist(),
                        float(self.done_scores[row, j])))
        return out


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, M, ...) -> (B, J, ...) with the entries index (B, J) picks along dim 1."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(model: PaliGemma, processor, images, prompts: str | Sequence[str], num_beams: int,
                max_new_tokens: int | Sequence[int] = 64, length_penalty: float = 1.0,
                early_stopping: bool | str = False, n: int | Sequence[int] = 1,
                constrain: bool | Sequence[bool] = False,
                image_features: torch.Tensor | None = None) -> list[GenerationResult]:
    """The `n` best beams of each prompt (prompt by prompt), by beam search with `num_beams` beams.

    images, prompts, max_new_tokens, constrain and image_features as in `generation.stream_generate`
    (`max_new_tokens` and `constrain` may differ per prompt). Each result's `beam_score` is its
    length-normalised score, `logprobs` its tokens' log-probs (of the masked distribution under
    `constrain`); finish_reason is "eos" or "length".
    """
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UsageError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise UsageError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    length_penalty = float(length_penalty)
    if length_penalty != length_penalty or abs(length_penalty) == float("inf"):
        raise UsageError(f"length_penalty must be a finite number, got {length_penalty}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    inputs = processor(images=images, prompts=prompts, with_pixels=image_features is None)
    batch = len(prompts)
    answers = row_counts(n, batch, "n")
    if any(count > num_beams for count in answers):
        raise UsageError(f"n ({n}) cannot exceed num_beams ({num_beams}): beam search finds num_beams answers")
    max_new = row_values(max_new_tokens, batch, "max_new_tokens")
    grammars = grammars_for(processor.tokenizer, prompts, row_values(constrain, batch, "constrain"),
                            model.config.text.vocab_size)
    rows = [prompt for prompt in range(batch) for _ in range(num_beams)]
    session = DecodeSession(model, inputs, [max_new[p] for p in rows], SamplingParams(), None, image_features,
                            rows=rows, grammars=[grammars[p] for p in rows])
    beams = _Beams(batch, num_beams, max_new, processor.tokenizer.eos_id, length_penalty, early_stopping,
                   session.logits.device)
    for step in range(max(max_new)):
        logits = session.logits.float()
        allowed = session.allowed_tokens()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        go_on, sources, tokens = beams.step(logits.log_softmax(dim=-1), step)
        if not go_on:
            break
        session.reorder(sources)
        session.advance(tokens)

    results = []
    for prompt in range(batch):
        for tokens, logprobs, score in beams.answers(prompt, answers[prompt]):
            prompt_tokens = session.prompt_tokens[prompt * num_beams]
            results.append(_result(processor.tokenizer, tokens, logprobs, score, prompt_tokens, dict(session.timings)))
    return results


def _result(tokenizer, tokens: list[int], logprobs: list[float], score: float, prompt_tokens: int,
            timings: dict) -> GenerationResult:
    ended = bool(tokens) and tokens[-1] == tokenizer.eos_id
    offsets = [len(tokenizer.decode(tokens[:i + 1])) for i in range(len(tokens))]
    return GenerationResult(tokenizer.decode(tokens), tokens, "eos" if ended else "length", prompt_tokens, timings,
                            logprobs=logprobs, text_offsets=offsets, beam_score=score)
