"""Scoring given answers instead of generating them: log P(answer <eos> | image, prompt).

    score(model, processor, images, prompts, answers)    -> one log-probability per answer
    classify(model, processor, images, prompt, choices)  -> per image, the choices ranked

Each answer is laid out as a training suffix (`processor(..., suffixes=answers)`: the prompt is the
bidirectional prefix, the answer and its `<eos>` the causal suffix, the labels on it), and one
forward pass per batch gives every answer token's log-probability at once: no generation, no
sampling. The sum over an answer's tokens (`<eos>` included) is its score; `normalize="mean"`
divides by its token count, which is minus transformers' loss on the same single row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UsageError
from .model import IGNORE_INDEX, PaliGemma

NORMALIZATIONS = ("sum", "mean")


@dataclass
class Classification:
    label: str  # the most likely choice
    scores: dict[str, float]  # choice -> its answer's log-probability (summed or averaged, as asked)
    probabilities: dict[str, float]  # choice -> softmax of the scores over the choices


def score(model: PaliGemma, processor, images, prompts: str | Sequence[str], answers: str | Sequence[str],
          normalize: str = "sum", batch_size: int = 16) -> list[float]:
    """The log-probability of each answer (with its `<eos>`) given its image and prompt.

    images: one image per answer, or one image for every answer; prompts: one per answer, or one
    string for every answer. `normalize="mean"` divides each sum by the answer's token count.
    Runs one forward pass per `batch_size` answers.
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    prompts = [prompts] * len(answers) if isinstance(prompts, str) else list(prompts)
    images = list(images) if isinstance(images, (list, tuple)) else [images] * len(answers)
    if not len(images) == len(prompts) == len(answers):
        raise UsageError(f"got {len(images)} images, {len(prompts)} prompts and {len(answers)} answers: give one "
                         "image and one prompt per answer (or a single one for all)")
    _check(normalize, batch_size)
    scores = []
    for start in range(0, len(answers), batch_size):
        chunk = slice(start, start + batch_size)
        inputs = processor(images=images[chunk], prompts=prompts[chunk], suffixes=answers[chunk])
        with torch.no_grad():
            features = model.encode_images(inputs["pixel_values"].to(model.device))
        scores += _answer_scores(model, inputs, features, normalize)
    return scores


def classify(model: PaliGemma, processor, images, prompt: str | Sequence[str], choices: Sequence[str],
             normalize: str = "sum", batch_size: int = 16) -> list[Classification]:
    """Zero-shot classification / multiple choice: score every choice as the answer to `prompt`.

    images: one image or a list (one `Classification` each); prompt: one string for every image or
    one per image. Each image goes through the vision tower once, whatever the number of choices.
    """
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    choices = list(choices)
    if len(prompts) != len(images):
        raise UsageError(f"got {len(prompts)} prompts for {len(images)} images: give one, or one per image")
    if not choices or len(set(choices)) != len(choices):
        raise UsageError(f"choices must be distinct answers, at least one, got {choices}")
    _check(normalize, batch_size)
    with torch.no_grad():
        features = model.encode_images(processor.image_processor(images).pixel_values.to(model.device))
    pairs = [(image, c) for image in range(len(images)) for c in choices]  # (image index, choice) per row
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs = processor(images=[images[i] for i, _ in chunk], prompts=[prompts[i] for i, _ in chunk],
                           suffixes=[c for _, c in chunk], with_pixels=False)  # images only counted
        rows = torch.tensor([i for i, _ in chunk], device=features.device)
        scores += _answer_scores(model, inputs, features.index_select(0, rows), normalize)
    results = []
    for i in range(len(images)):
        row = torch.tensor(scores[i * len(choices):(i + 1) * len(choices)], dtype=torch.float64)
        probabilities = row.softmax(0).tolist()
        results.append(Classification(choices[int(row.argmax())], dict(zip(choices, row.tolist())),
                                      dict(zip(choices, probabilities))))
    return results


@torch.no_grad()
def _answer_scores(model: PaliGemma, inputs: dict, image_features: torch.Tensor, normalize: str) -> list[float]:
    """Summed (or mean) log-probs of each row's labelled tokens, from one pass of the decoder.

    The decoder runs on every position, but the LM head only on the positions that predict a
    label: the full (B, T, V) logits of a 257k vocabulary would take gigabytes.
    """
    device = model.device
    input_ids, attention_mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    valid = attention_mask.bool()
    is_prefix = (inputs["token_type_ids"].to(device) == 0) & valid
    embeds = model.embed(input_ids, image_features)
    hidden = model.run_decoder(embeds, attention_mask.long().cumsum(-1), valid, is_prefix)  # (B, T, D)
    labels = inputs["labels"].to(device)[:, 1:]  # position t predicts token t + 1
    targets = labels != IGNORE_INDEX  # (B, T - 1)
    logprobs = model.logits(hidden[:, :-1][targets]).float().log_softmax(-1)  # (N, V), N answer tokens in all
    picked = logprobs.gather(1, labels[targets][:, None])[:, 0]
    row_of = targets.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=device).index_add_(0, row_of, picked)
    if normalize == "mean":
        sums = sums / targets.sum(-1)
    return sums.tolist()


def _check(normalize: str, batch_size: int) -> None:
    if normalize not in NORMALIZATIONS:
        raise UsageError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
