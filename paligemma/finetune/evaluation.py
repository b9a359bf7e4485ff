"""Held-out evaluation: suffix loss over the whole set, exact match of greedy answers and, given a
task, that task's own metrics (CIDEr, VQA accuracy, ANLS, mAP, box accuracy, mIoU: the same code as
`paligemma eval`, `paligemma.evaluation.scoring`)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..evaluation.runner import default_max_new_tokens
from ..evaluation.scoring import NEEDS_IMAGE_SIZE, check_references, score_answers
from ..generation import generate_detailed
from ..images import load_image
from ..model import PaliGemma
from .data import Collator, DataError, Example
from .step import autocast_context, count_targets, to_device


def check_eval_task(dataset: Sequence[Example], task: str, codec=None) -> None:
    """Raise now, not at the first evaluation, if `task` cannot score `dataset`: an unknown task, a
    missing package or mask codec, a suffix that is not a valid answer of the task."""
    examples = [dataset[i] for i in range(len(dataset))]
    check_references(task, [[e.suffix] for e in examples], [e.where for e in examples], codec)


@torch.no_grad()
def evaluate(model: PaliGemma, processor, dataset: Sequence[Example], batch_size: int = 8, bf16: bool = False,
             max_new_tokens: int | None = None, max_length: int | None = None, task: str | None = None,
             codec=None) -> dict:
    """{"eval_loss", "exact_match", "num_examples", ...task metrics, "examples"}: loss is the mean over all
    suffix tokens of the set (not a mean of batch means); exact match compares stripped greedy answers
    with the suffixes; `task` (one of `paligemma.evaluation.TASKS`) adds its metrics, each suffix
    being the reference (`codec`: the mask codec, for segment). `examples` holds the first few
    (prefix, target, answer) triples for eyeballing.

    `dataset` is anything with `len(dataset)` and `dataset[i]` -> `Example`: a `FinetuneDataset`, a
    list of `Example`s, `demo.train.SceneDataset`. Each example is read once and each image
    preprocessed once, for both the loss and the answer (and decoded once more for its size, for the
    tasks that read boxes or masks).
    """
    examples = [dataset[i] for i in range(len(dataset))]
    if not examples:
        raise DataError("the evaluation set has no examples")
    references = [[e.suffix] for e in examples]
    if task is not None:
        check_references(task, references, [e.where for e in examples], codec)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(processor, references)
    was_training = model.training
    model.eval()
    collate = Collator(processor, max_length)
    loss_sum, tokens, correct, shown, answers, spans = 0.0, 0, 0, [], [], []
    try:
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            batch = to_device(collate(chunk), model.device)
            pixel_values = batch.pop("pixel_values")
            features = model.encode_images(pixel_values)  # (images, N, D), as generation would compute them
            with autocast_context(bf16, model.device):
                # Under bf16 the images are encoded under autocast for the loss, as in training.
                out = (model(**batch, pixel_values=pixel_values, loss_only=True) if bf16
                       else model(**batch, image_features=features, loss_only=True))
            n = count_targets(batch["labels"])
            loss_sum += float(out.loss) * n if n else 0.0
            tokens += n
            results = generate_detailed(model, processor, [e.image for e in chunk], [e.prefix for e in chunk],
                                        max_new_tokens=max_new_tokens, image_features=features)
            for example, result in zip(chunk, results):
                answers.append(result.text)
                spans.append(result.token_spans())
                correct += result.text.strip() == example.suffix.strip()
                if len(shown) < 3:
                    shown.append({"prefix": example.prefix, "target": example.suffix, "answer": result.text})
    finally:
        model.train(was_training)
    scores = {}
    if task is not None:
        sizes = None
        if task in NEEDS_IMAGE_SIZE:
            max_pixels = processor.image_processor.max_pixels
            sizes = [load_image(e.image, max_pixels).shape[1::-1] for e in examples]  # (width, height)
        scores = score_answers(task, answers, references, sizes, codec, [e.where for e in examples], spans).metrics
    return {"eval_loss": loss_sum / max(tokens, 1), "exact_match": correct / len(examples),
            "num_examples": len(examples), **scores, "examples": shown}
