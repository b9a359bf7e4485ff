"""Held-out evaluation: suffix loss over the whole set, and exact match of greedy answers."""

from __future__ import annotations

from typing import Sequence

import torch

from ..generation import generate_detailed
from ..model import PaliGemma
from .data import Collator, DataError, Example
from .step import autocast_context, count_targets

# Extra tokens allowed past the longest reference answer, so a too-long answer is seen as wrong
# rather than cut to the right length.
ANSWER_MARGIN = 8


@torch.no_grad()
def evaluate(model: PaliGemma, processor, dataset: Sequence[Example], batch_size: int = 8, bf16: bool = False,
             max_new_tokens: int | None = None, max_length: int | None = None) -> dict:
    """{"eval_loss", "exact_match", "num_examples", "examples"}: loss is the mean over all suffix tokens
    of the set (not a mean of batch means); exact match compares stripped greedy answers with the
    suffixes. `examples` holds the first few (prefix, target, answer) triples for eyeballing.

    `dataset` is anything with `len(dataset)` and `dataset[i]` -> `Example`: a `FinetuneDataset`, a
    list of `Example`s, `demo.train.SceneDataset`. Each example is read once and each image
    preprocessed once, for both the loss and the answer.
    """
    examples = [dataset[i] for i in range(len(dataset))]
    if not examples:
        raise DataError("the evaluation set has no examples")
    if max_new_tokens is None:
        longest = max(len(processor.encode_suffix(e.suffix)) for e in examples)
        max_new_tokens = longest + ANSWER_MARGIN
    was_training = model.training
    model.eval()
    collate = Collator(processor, max_length)
    loss_sum, tokens, correct, shown = 0.0, 0, 0, []
    try:
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            batch = collate(chunk)
            pixel_values = batch.pop("pixel_values")
            features = model.encode_images(pixel_values)  # (images, N, D), as generation would compute them
            with autocast_context(bf16):
                # Under bf16 the images are encoded under autocast for the loss, as in training.
                out = model(**batch, pixel_values=pixel_values) if bf16 else model(**batch, image_features=features)
            n = count_targets(batch["labels"])
            loss_sum += float(out.loss) * n if n else 0.0
            tokens += n
            results = generate_detailed(model, processor, [e.image for e in chunk], [e.prefix for e in chunk],
                                        max_new_tokens=max_new_tokens, image_features=features)
            for example, result in zip(chunk, results):
                correct += result.text.strip() == example.suffix.strip()
                if len(shown) < 3:
                    shown.append({"prefix": example.prefix, "target": example.suffix, "answer": result.text})
    finally:
        model.train(was_training)
    return {"eval_loss": loss_sum / max(tokens, 1), "exact_match": correct / len(examples),
            "num_examples": len(examples), "examples": shown}
