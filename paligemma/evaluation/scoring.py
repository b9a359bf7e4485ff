"""Answers -> a task's metrics: each answer (and each reference) read as the task reads it, then
scored by `paligemma.metrics`. The one place `paligemma eval` and fine-tuning's --eval-task share.

| task | answers are | metrics (the first is the headline) |
|---|---|---|
| caption | text | cider (CIDEr-D, COCO tokenization), exact_match |
| vqa | text | vqa_accuracy (VQAv2: normalised, min(#humans / 3, 1) over leave-one-out subsets), exact_match |
| ocr | text | anls (threshold 0.5), exact_match |
| detect | `<loc>` boxes + labels | map (COCO mAP@[.5:.95]), map50, map75, recall50, precision50, malformed_answers |
| refer | one box (the first of the answer) | box_accuracy (IoU >= 0.5), malformed_answers |
| segment | boxes + `<seg>` masks + labels | miou (mean mask IoU per true object), malformed_answers |

exact_match: the stripped answer equals one of the stripped references. Detections and masks are
matched within their label. A reference answer that does not parse is the data's fault:
ReferenceAnswerError naming its row. Boxes and masks are read in pixels of the original image, so
those tasks need each image's (width, height); masks need the mask codec that wrote the references'
`<seg>` codes, and the ground-truth masks are the references' codes decoded by it (a perfect answer
scores 1).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Sequence

from .. import metrics
from ..errors import PaliGemmaError, UsageError
from ..segmentation import parse_segmentations
from ..tasks import parse_detections

TASKS = ("caption", "vqa", "ocr", "detect", "refer", "segment")
METRICS = {
    "caption": ("cider", "exact_match"),
    "vqa": ("vqa_accuracy", "exact_match"),
    "ocr": ("anls", "exact_match"),
    "detect": ("map", "map50", "map75", "recall50", "precision50", "malformed_answers"),
    "refer": ("box_accuracy", "malformed_answers"),
    "segment": ("miou", "malformed_answers"),
}
NEEDS_IMAGE_SIZE = ("detect", "refer", "segment")
NOMINAL_SIZE = (1024, 1024)  # image size for checking a reference's grammar before the images are read


class ReferenceAnswerError(PaliGemmaError, ValueError):
    """A row's reference answer cannot be read as an answer of the task; the message names the row."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UsageError(f"unknown evaluation task {task!r}: choose one of {', '.join(TASKS)}")
    return task


@dataclass
class TaskScores:
    metrics: dict[str, float]  # METRICS[task], in that order; NaN where undefined (e.g. no true object)
    per_example: list[dict]  # per answer: what was read from it and its own score


def check_references(task: str, references: Sequence[Sequence[str]], wheres: Sequence[str], codec=None) -> None:
    """Everything that would stop scoring, found before anything is generated: an unknown task, a
    missing package or mask codec (UsageError), a reference answer the task cannot read
    (ReferenceAnswerError)."""
    check_task(task)
    if task == "detect" and importlib.util.find_spec("pycocotools") is None:
        raise UsageError("detect answers are scored with COCO mAP by pycocotools: pip install 'paligemma[eval]' "
                         "(or pip install pycocotools)")
    if task in NEEDS_IMAGE_SIZE:
        for refs, where in zip(references, wheres):
            _reference_objects(task, refs[0], NOMINAL_SIZE, codec, where)


def score_answers(task: str, answers: Sequence[str], references: Sequence[Sequence[str]],
                  image_sizes: Sequence[tuple[int, int]] | None = None, codec=None,
                  wheres: Sequence[str] | None = None, token_spans: Sequence | None = None) -> TaskScores:
    """Score `answers[i]` against `references[i]` (a list of reference answers; one for detect, refer
    and segment). `image_sizes[i]` is image i's (width, height), needed by detect, refer and segment;
    `codec` (a `MaskCodec`) by segment; `wheres` names the rows in errors. `token_spans[i]` (answer i's
    `GenerationResult.token_spans()`, or None) gives each box its score, the probability the model wrote
    it with, which ranks the boxes for COCO mAP; without it every box scores 1 (ties, in answer order)."""
    check_task(task)
    if len(answers) != len(references):
        raise UsageError(f"got {len(answers)} answers for {len(references)} reference sets")
    if not answers:
        raise UsageError("no answers to score")
    wheres = list(wheres) if wheres is not None else [f"example {i}" for i in range(len(answers))]
    if task in NEEDS_IMAGE_SIZE and (image_sizes is None or len(image_sizes) != len(answers)):
        raise UsageError(f"scoring {task} answers needs each image's (width, height)")
    if task == "caption":
        scores = metrics.cider_scores(answers, references)
        return _text_scores("cider", scores, answers, references)
    if task == "vqa":
        return _text_scores("vqa_accuracy", [metrics.vqa_score(a, r) for a, r in zip(answers, references)],
                            answers, references)
    if task == "ocr":
        return _text_scores("anls", [metrics.anls_score(a, r) for a, r in zip(answers, references)],
                            answers, references)
    truth = [_reference_objects(task, refs[0], size, codec, where)
             for refs, size, where in zip(references, image_sizes, wheres)]
    spans = token_spans if token_spans is not None else [None] * len(answers)
    parsed = [_parse(task, answer, size, codec, answer_spans)
              for answer, size, answer_spans in zip(answers, image_sizes, spans)]
    malformed = sum(bool(result.errors) for result in parsed)
    predicted = [result.objects for result in parsed]
    if task == "detect":
        return _detect_scores(predicted, truth, parsed, malformed)
    if task == "refer":
        return _refer_scores(predicted, truth, parsed, malformed)
    per_example = [{"objects": [_box_record(o) for o in result.objects], "errors": result.errors,
                    "miou": _finite_or_none(metrics.mask_miou([p], [t]))}
                   for result, p, t in zip(parsed, predicted, truth)]
    return TaskScores({"miou": metrics.mask_miou(predicted, truth), "malformed_answers": malformed}, per_example)


def _text_scores(name: str, scores: list[float], answers: Sequence[str], references) -> TaskScores:
    exact = [answer.strip() in {r.strip() for r in refs} for answer, refs in zip(answers, references)]
    per_example = [{name: score, "exact_match": match} for score, match in zip(scores, exact)]
    return TaskScores({name: sum(scores) / len(scores), "exact_match": sum(exact) / len(exact)}, per_example)


def _detect_scores(predicted, truth, parsed, malformed: int) -> TaskScores:
    coco = metrics.detection_map(predicted, truth)
    counts = metrics.detection_matches(predicted, truth, iou=0.5)
    scores = {**coco, "recall50": counts.recall, "precision50": counts.precision, "malformed_answers": malformed}
    per_example = [{"objects": [_box_record(o) for o in result.objects], "errors": result.errors,
                    "matched50": metrics.detection_matches([p], [t]).matched}
                   for result, p, t in zip(parsed, predicted, truth)]
    return TaskScores(scores, per_example)


def _refer_scores(predicted, truth, parsed, malformed: int) -> TaskScores:
    boxes = [objects[0].box if objects else None for objects in predicted]
    true_boxes = [objects[0].box for objects in truth]
    per_example = [{"box": box, "iou": metrics.box_iou(box, true_box) if box is not None else 0.0,
                    "errors": result.errors} for box, true_box, result in zip(boxes, true_boxes, parsed)]
    return TaskScores({"box_accuracy": metrics.box_accuracy(boxes, true_boxes), "malformed_answers": malformed},
                      per_example)


def _parse(task: str, answer: str, image_size, codec, token_spans=None):
    if task == "segment":
        if codec is None:
            raise UsageError("scoring segment answers needs the mask codec that decodes their <seg> codes: pass "
                             "--mask-codec (or use a checkpoint with a mask_codec.safetensors)")
        return parse_segmentations(answer, image_size, codec, token_spans)
    return parse_detections(answer, image_size, token_spans)


def _reference_objects(task: str, reference: str, image_size, codec, where: str) -> list:
    result = _parse(task, reference, image_size, codec)
    if result.errors:
        raise ReferenceAnswerError(f"{where}: the reference is not a valid {task} answer ({result.errors[0]})")
    if task == "refer" and len(result.objects) != 1:
        raise ReferenceAnswerError(f"{where}: a refer reference holds exactly one box, got {len(result.objects)}")
    return result.objects


def _box_record(obj) -> dict:
    record = {"label": obj.label, "box": obj.box}
    if getattr(obj, "score", None) is not None:
        record["score"] = obj.score
    return record


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value
