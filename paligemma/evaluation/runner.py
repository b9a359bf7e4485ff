"""Evaluate a model on rows: greedy answers in batches, then the task's metrics (`scoring.py`).

    examples = read_eval_jsonl("val.jsonl", "caption")   # paligemma.evaluation.data
    result = evaluate_examples(model, processor, examples, "caption", batch_size=8)
    result.metrics  # {"cider": ..., "exact_match": ...}; result.records: one dict per row

Each image is decoded once (upright RGB, its size kept for boxes and masks) and handed to generation
as pixels. Answers are greedy and at most `max_new_tokens` long: by default the longest reference
plus `ANSWER_MARGIN` tokens, so an answer that runs on is seen as wrong rather than cut to fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..generation import generate_detailed
from ..images import load_image
from ..progress import progress_bar
from .scoring import check_references, score_answers

# Extra tokens allowed past the longest reference answer, so a too-long answer is seen as wrong
# rather than cut to the right length.
ANSWER_MARGIN = 8


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]
    records: list[dict]  # per row: where, prefix, references, prediction, finish_reason, its own scores


def default_max_new_tokens(processor, references: Sequence[Sequence[str]]) -> int:
    """The longest reference answer in tokens (its <eos> included) plus ANSWER_MARGIN."""
    return max(len(processor.encode_suffix(r)) for refs in references for r in refs) + ANSWER_MARGIN


def evaluate_examples(model, processor, examples: Sequence, task: str, batch_size: int = 8,
                      max_new_tokens: int | None = None, codec=None, progress: bool = False) -> EvalResult:
    """Answer every row's prefix about its image and score the answers for `task` (see scoring.py).
    examples: `data.EvalExample`s (`.example` with image and prefix, `.references`, `.where`).
    progress: show a tqdm bar (when tqdm is installed)."""
    references = [e.references for e in examples]
    wheres = [e.where for e in examples]
    check_references(task, references, wheres, codec)  # a bad reference fails now, not after generating
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(processor, references)
    max_pixels = processor.image_processor.max_pixels
    bar = progress_bar(progress, len(examples), "row", "answering")
    answers, finish_reasons, sizes, spans = [], [], [], []
    try:
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            images = [load_image(e.example.image, max_pixels) for e in chunk]  # (H, W, 3) uint8, upright
            sizes += [(image.shape[1], image.shape[0]) for image in images]
            results = generate_detailed(model, processor, images, [e.example.prefix for e in chunk],
                                        max_new_tokens=max_new_tokens)
            answers += [r.text for r in results]
            finish_reasons += [r.finish_reason for r in results]
            spans += [r.token_spans() for r in results]  # each box's probability: its score for mAP
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    scores = score_answers(task, answers, references, sizes, codec, wheres, spans)
    records = [{"row": e.where, "image": str(e.example.image), "prefix": e.example.prefix,
                "references": list(e.references), "prediction": answer, "finish_reason": reason, **own}
               for e, answer, reason, own in zip(examples, answers, finish_reasons, scores.per_example)]
    return EvalResult(task, scores.metrics, records)


