"""Held-out evaluation: suffix loss over the whole set, and exact match of greedy answers."""

from __future__ import annotations

import contextlib

import torch

from ..generation import generate
from ..model import IGNORE_INDEX, PaliGemma
from .data import Collator, FinetuneDataset

# Extra tokens allowed past the longest reference answer, so a too-long answer is seen as wrong
# rather than cut to the right length.
ANSWER_MARGIN = 8


def autocast_context(bf16: bool):
    """bfloat16 autocast on CPU when asked; a no-op otherwise."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that the next-token loss is computed over (labels shifted by one, -100 excluded)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model: PaliGemma, processor, dataset: FinetuneDataset, batch_size: int = 8, bf16: bool = False,
             max_new_tokens: int | None = None, max_length: int | None = None) -> dict:
    """{"eval_loss", "exact_match", "num_examples", "examples"}: loss is the mean over all suffix tokens
    of the set (not a mean of batch means); exact match compares stripped greedy answers with the
    suffixes. `examples` holds the first few (prefix, target, answer) triples for eyeballing."""
    was_training = model.training
    model.eval()
    collate = Collator(processor, max_length)
    if max_new_tokens is None:
        longest = max(len(processor.encode_suffix(e.suffix)) for e in dataset.examples)
        max_new_tokens = longest + ANSWER_MARGIN
    loss_sum, tokens, correct, shown = 0.0, 0, 0, []
    try:
        for first in range(0, len(dataset), batch_size):
            examples = dataset.examples[first:first + batch_size]
            batch = collate(examples)
            with autocast_context(bf16):
                out = model(**batch)
            n = count_targets(batch["labels"])
            loss_sum += float(out.loss) * n if n else 0.0
            tokens += n
            answers = generate(model, processor, [e.image for e in examples], [e.prefix for e in examples],
                               max_new_tokens=max_new_tokens)
            for example, answer in zip(examples, answers):
                correct += answer.strip() == example.suffix.strip()
                if len(shown) < 3:
                    shown.append({"prefix": example.prefix, "target": example.suffix, "answer": answer})
    finally:
        model.train(was_training)
    return {"eval_loss": loss_sum / max(tokens, 1), "exact_match": correct / len(dataset),
            "num_examples": len(dataset), "examples": shown}
