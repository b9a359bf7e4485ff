"""Constrained decoding: only well-formed `detect` / `segment` answers, as a state machine over token ids.

The grammar is the answer format of `tasks.py` (detect) and `segmentation.py` (segment):

    answer := <eos> | object (" ;" object)* <eos>
    object := <loc y0> <loc x0> <loc y1> <loc x1> [16 x <seg>] label

- detect: y0 <= y1 and x0 <= x1, as `parse_detections` requires;
- segment: y0 < y1 and x0 < x1 (`parse_segmentations` rejects a box of zero width or height), and
  the 16 `<seg>` codes below the mask codec's number of codes;
- the label is one of the labels the prompt asked for ("detect triangle ; circle").

Labels are matched as the tokenizer writes them in an answer, not as text: encoding a template
answer gives each label's tokens (and those of " ; " after it), so a label of several pieces
("red circle" -> "▁red", "▁circle") is followed piece by piece through a trie.

`allowed(state, budget)` is the (V,) mask of the tokens that may come next when `budget` tokens
are left (this one included): a token is allowed only if the answer can still be finished within
the budget after it, so an answer cut short by `max_new_tokens` still parses; it just holds fewer
objects. `advance(state, token)` is the next state. States are small tuples, so beams copy them
freely. A token the grammar does not allow (fed only to rows that already ended) ends the answer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import UsageError
from .tasks import check_label, prompt_labels, prompt_task
from .tokenizer import NUM_LOC_TOKENS, NUM_SEG_TOKENS, Tokenizer

START = ("start",)  # nothing written yet: <eos> (nothing found) or a first object
DONE = ("done",)  # <eos> written
_BOX_VALUES = 4
_MASK_CODES = 16
TASKS = ("detect", "segment")


class AnswerGrammar:
    """The well-formed answers to one `detect` or `segment` prompt."""

    def __init__(self, tokenizer: Tokenizer, labels: Sequence[str], segment: bool = False,
                 vocab_size: int | None = None, num_codes: int = NUM_SEG_TOKENS):
        if not labels:
            raise UsageError("constrained decoding needs the labels to look for, e.g. 'detect cat ; dog'")
        for label in labels:
            try:
                check_label(label)
            except ValueError as err:
                raise UsageError(str(err)) from None
        self.eos = tokenizer.eos_id
        self.loc0 = tokenizer.loc_id(0)
        self.seg0 = tokenizer.seg_id(0)
        self.vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
        self.segment = segment
        self.num_codes = num_codes
        self.strict = int(segment)  # segment boxes need min < max, detect boxes min <= max
        self._children: list[dict[int, int]] = [{}]  # trie over label tokens; node 0 is the root
        self._ends: list[bool] = [False]  # <eos> may follow this node
        self._next_object: list[bool] = [False]  # " ; " is complete: the next object's loc tokens follow
        for label in dict.fromkeys(labels):
            last, then_more = self._label_tokens(tokenizer, label)
            self._ends[self._insert(last)] = True
            self._next_object[self._insert(then_more)] = True
        # Every label can end the answer, so the cheapest finish from the root never writes " ; ".
        self._label_cost = self._finish_costs(float("inf"))[0]
        self._finish = self._finish_costs(self._cost(("loc", 0)))

    @classmethod
    def for_prompt(cls, tokenizer: Tokenizer, prompt: str, vocab_size: int | None = None) -> "AnswerGrammar":
        """The grammar of a "detect a ; b" or "segment a ; b" prompt."""
        task = prompt_task(prompt)
        if task not in TASKS:
            raise UsageError(f"constrained decoding applies to detect and segment prompts, not {prompt!r}")
        return cls(tokenizer, prompt_labels(prompt), segment=task == "segment", vocab_size=vocab_size)

    # ------------------------------------------------------------------ the state machine

    def start(self) -> tuple:
        return START

    def allowed(self, state: tuple, budget: int) -> torch.Tensor:
        """Bool mask (V,) of the tokens allowed after `state` with `budget` tokens left, this one included."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        kind = state[0]
        if kind in ("start", "done"):
            mask[self.eos] = True
        if kind in ("start", "loc"):
            index = 0 if kind == "start" else state[1]
            if self._cost(("loc", index)) <= budget:
                low, high = self._loc_range(state)
                mask[self.loc0 + low:self.loc0 + high + 1] = True
        elif kind == "seg":
            if self._cost(state) <= budget:
                mask[self.seg0:self.seg0 + self.num_codes] = True
        elif kind == "label":
            node = state[1]
            mask[self.eos] = self._ends[node]
            for token, child in self._children[node].items():
                mask[token] = 1 + self._finish[child] <= budget
        return mask

    def advance(self, state: tuple, token: int) -> tuple:
        """The state after `token`."""
        kind = state[0]
        if kind in ("start", "loc"):
            index = 0 if kind == "start" else state[1]
            low, high = self._loc_range(state)
            value = token - self.loc0
            if not low <= value <= high:
                return DONE
            y0 = value if index == 0 else state[2]
            x0 = value if index == 1 else (state[3] if index > 1 else None)
            if index < _BOX_VALUES - 1:
                return ("loc", index + 1, y0, x0)
            return ("seg", 0) if self.segment else ("label", 0)
        if kind == "seg":
            if not 0 <= token - self.seg0 < self.num_codes:
                return DONE
            return ("seg", state[1] + 1) if state[1] < _MASK_CODES - 1 else ("label", 0)
        if kind == "label":
            child = self._children[state[1]].get(token)
            if child is None:
                return DONE
            return ("loc", 0, None, None) if self._next_object[child] else ("label", child)
        return DONE

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` is a complete answer of this grammar, <eos> included."""
        state = START
        for i, token in enumerate(tokens):
            if state == DONE or not self.allowed(state, len(tokens) - i)[token]:
                return False
            state = self.advance(state, token)
        return state == DONE

    # ------------------------------------------------------------------ helpers

    def _loc_range(self, state: tuple) -> tuple[int, int]:
        """Allowed values (inclusive) of the next loc token: a max is at least its min (+1 for segment)."""
        index = 0 if state[0] == "start" else state[1]
        last = NUM_LOC_TOKENS - 1
        if index < 2:
            return 0, last - self.strict
        return state[index] + self.strict, last  # state[2] is y0, state[3] is x0

    def _cost(self, state: tuple) -> int:
        """Tokens needed to finish the answer from `state`, <eos> included."""
        kind = state[0]
        if kind == "loc":
            return _BOX_VALUES - state[1] + _MASK_CODES * self.segment + self._label_cost
        if kind == "seg":
            return _MASK_CODES - state[1] + self._label_cost
        if kind == "label":
            return self._finish[state[1]]
        return 1 if kind == "start" else 0

    def _label_tokens(self, tokenizer: Tokenizer, label: str) -> tuple[list[int], list[int]]:
        """(tokens of `label` ending an answer, tokens of `label` + " ; " before another object), as the
        tokenizer writes them after an object's loc (and seg) tokens."""
        head = "".join(f"<loc{v:04d}>" for v in (0, 0, 1, 1)) + "<seg000>" * (_MASK_CODES * self.segment)
        head_ids = tokenizer.encode(head)
        one = tokenizer.encode(f"{head} {label}")
        two = tokenizer.encode(f"{head} {label} ; {head} {label}")
        last = one[len(head_ids):]
        then_more = two[len(head_ids):len(two) - len(head_ids) - len(last)]
        if (one[:len(head_ids)] != head_ids or two[:len(head_ids)] != head_ids or not last or not then_more
                or two[len(two) - len(head_ids) - len(last):] != head_ids + last):
            raise UsageError(f"label {label!r} is not written with the same tokens in every place of an answer, "
                             "so it cannot be constrained; generate without constrain")
        return last, then_more

    def _insert(self, tokens: list[int]) -> int:
        node = 0
        for token in tokens:
            if token not in self._children[node]:
                self._children.append({})
                self._ends.append(False)
                self._next_object.append(False)
                self._children[node][token] = len(self._children) - 1
            node = self._children[node][token]
        return node

    def _finish_costs(self, object_cost: float) -> list[float]:
        """Per trie node, the fewest tokens that end the answer once its token is written (<eos>
        included); a node that completes " ; " costs `object_cost`, a whole next object."""
        costs = [0.0] * len(self._children)
        for node in reversed(range(len(self._children))):  # children always come after their parent
            if self._next_object[node]:
                costs[node] = object_cost
                continue
            options = [1] if self._ends[node] else []
            options += [1 + costs[child] for child in self._children[node].values()]
            costs[node] = min(options, default=float("inf"))
        return costs


def grammars_for(tokenizer: Tokenizer, prompts: Sequence[str], constrain: Sequence[bool],
                 vocab_size: int) -> list[AnswerGrammar | None]:
    """One grammar per prompt where `constrain` asks for it (built once per distinct prompt), else None."""
    built: dict[str, AnswerGrammar] = {}
    grammars = []
    for prompt, wanted in zip(prompts, constrain):
        if wanted and prompt not in built:
            built[prompt] = AnswerGrammar.for_prompt(tokenizer, prompt, vocab_size)
        grammars.append(built[prompt] if wanted else None)
    return grammars
