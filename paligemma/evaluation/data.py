"""Evaluation data: fine-tuning's JSONL rows, with several references allowed per row.

    {"image": "images/1.jpg", "prefix": "caption en", "suffix": ["a cat on a mat", "a cat lying on a rug"]}
    {"image": "images/2.jpg", "prefix": "answer en what color is the cat?", "answers": ["black", "black", ...]}
    {"image": "images/3.jpg", "prefix": "detect cat ; dog", "suffix": "<loc0102><loc0040><loc0300><loc0251> cat"}

A row is a fine-tuning row (`finetune/data.py` checks its image and prefix) whose
`suffix` may also be a list of reference answers; VQA rows may give the human answers as `answers`
instead (VQAv2 has ten). Detection, referring-expression and segmentation rows take one reference:
the answer whose objects are the ground truth. Unlike fine-tuning, which skips a bad row with a
warning, evaluation stops at the first one (a score over a silently smaller set would mislead).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..finetune.data import DataError, Example, FinetuneDataset
from .scoring import NEEDS_IMAGE_SIZE, check_task

SINGLE_REFERENCE_TASKS = NEEDS_IMAGE_SIZE  # the reference is parsed into objects


@dataclass(frozen=True)
class EvalExample:
    """One evaluated row: the example (image, prefix, first reference as suffix) and all its references."""

    example: Example
    references: tuple[str, ...]

    @property
    def where(self) -> str:
        return self.example.where


def read_eval_jsonl(path: str | os.PathLike, task: str, check_images: bool = True) -> list[EvalExample]:
    """The rows of a JSONL file as `EvalExample`s; DataError naming file:line at the first bad row."""
    check_task(task)
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {str(path)!r}: {err}") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        examples.append(eval_example(row, task, where, base=path.parent, check_images=check_images))
    if not examples:
        raise DataError(f"{path} holds no rows to evaluate")
    return examples


def eval_example(row, task: str, where: str, base: Path | None = None, check_images: bool = True) -> EvalExample:
    """One row (a dict, or a fine-tuning `Example`) as an `EvalExample`; DataError saying what is wrong."""
    if isinstance(row, Example):
        return EvalExample(row, (row.suffix,))
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with image, prefix and suffix (or answers), "
                        f"got {type(row).__name__}")
    references = _references(row, task, where)
    image = row.get("image")
    if isinstance(image, str) and base is not None and not Path(image).is_absolute():
        row = {**row, "image": str(base / image)}  # relative to the data file, as fine-tuning reads it
    try:
        # Fine-tuning's own checks of the image and prefix, with the first reference as the suffix.
        example = FinetuneDataset([{**row, "suffix": references[0]}], strict=True, check_images=check_images,
                                  source=where)[0]
    except DataError as err:  # the dataset names the row "{source} {index}"; this is row 0 of one
        raise DataError(str(err).replace(f"{where} 0: ", f"{where}: ", 1)) from None
    return EvalExample(dataclasses.replace(example, where=where), references)


def _references(row: dict, task: str, where: str) -> tuple[str, ...]:
    key = "answers" if task == "vqa" and row.get("answers") is not None else "suffix"
    value = row.get(key)
    if value is None:
        wanted = "'suffix' (or 'answers')" if task == "vqa" else "'suffix'"
        raise DataError(f"{where}: missing field {wanted}: the reference answer(s)")
    references = (value,) if isinstance(value, str) else value
    if not isinstance(references, (list, tuple)) or not references or not all(isinstance(r, str) for r in references):
        raise DataError(f"{where}: field {key!r} must be a string or a non-empty list of strings, got {value!r}")
    if task in SINGLE_REFERENCE_TASKS and len(references) != 1:
        raise DataError(f"{where}: a {task} row takes one reference answer (its objects are the ground truth), "
                        f"got {len(references)}")
    return tuple(references)
