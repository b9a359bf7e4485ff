"""Fine-tuning data: JSONL rows (or Python lists) of image + prefix + suffix, and the batch collator.

A JSONL file holds one JSON object per line; image paths are relative to the file's directory:

    {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

Rows that cannot be used (bad JSON, a missing or non-string field, a missing or unreadable image)
are reported with their line number and skipped, or raise `DataError` with `strict=True`. Images are
checked cheaply up front (the header is parsed) but decoded only when their batch is collated, so
a dataset of any size costs memory for its paths and texts only.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from ..errors import PaliGemmaError
from ..images import ImageError

FIELDS = ("image", "prefix", "suffix")


class DataError(PaliGemmaError, ValueError):
    """A fine-tuning data row is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training example. `image` is a path, PIL image, bytes or array; `where` names its origin."""

    image: Any
    prefix: str
    suffix: str
    where: str = ""


class FinetuneDataset(torch.utils.data.Dataset):
    """A list of `Example`s with the torch Dataset API (`len`, indexing).

    Build with `FinetuneDataset.from_jsonl(path)` or `FinetuneDataset(rows)` where rows are dicts
    with image/prefix/suffix keys, (image, prefix, suffix) tuples, or `Example`s. `problems` lists
    the rows that were skipped, each message starting with its file:line (or row index).
    """

    def __init__(self, rows: Iterable, strict: bool = False, check_images: bool = True, source: str = "row"):
        self.examples: list[Example] = []
        self.problems: list[str] = []
        for index, row in enumerate(rows):
            where = f"{source} {index}"
            try:
                self.examples.append(_to_example(row, where, base=None, check_images=check_images))
            except DataError as err:
                self._skip(str(err), strict)
        self._report()

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, strict: bool = False, check_images: bool = True) -> "FinetuneDataset":
        """Read a JSONL file; image paths are resolved against the file's directory."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read data file {str(path)!r}: {err}") from None
        dataset = cls.__new__(cls)
        dataset.examples, dataset.problems = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                dataset.examples.append(_to_example(row, where, base=path.parent, check_images=check_images))
            except DataError as err:
                dataset._skip(str(err), strict)
        dataset._report()
        return dataset

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def _skip(self, message: str, strict: bool) -> None:
        if strict:
            raise DataError(message)
        self.problems.append(message)

    def _report(self) -> None:
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... ({len(self.problems)} in all)" if len(self.problems) > 20 else ""
            warnings.warn(f"skipped {len(self.problems)} bad row(s):\n  {shown}{more}", stacklevel=3)


def as_dataset(data, strict: bool = False) -> FinetuneDataset:
    """A `FinetuneDataset` from a dataset, a JSONL path, or a list of rows."""
    if isinstance(data, FinetuneDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return FinetuneDataset.from_jsonl(data, strict=strict)
    return FinetuneDataset(data, strict=strict)


def _to_example(row, where: str, base: Path | None, check_images: bool) -> Example:
    if isinstance(row, Example):
        row = {"image": row.image, "prefix": row.prefix, "suffix": row.suffix}
    elif isinstance(row, (tuple, list)):
        if len(row) != 3:
            raise DataError(f"{where}: a tuple row needs 3 items (image, prefix, suffix), got {len(row)}")
        row = dict(zip(FIELDS, row))
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with keys {list(FIELDS)}, got {type(row).__name__}")
    missing = [key for key in FIELDS if row.get(key) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    for key in ("prefix", "suffix"):
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    image = row["image"]
    if isinstance(image, (str, os.PathLike)):
        image = Path(image) if base is None or Path(image).is_absolute() else base / image
        if check_images:
            _check_image_file(image, where)
        image = str(image)
    return Example(image, row["prefix"], row["suffix"], where)


def _check_image_file(path: Path, where: str) -> None:
    """Parse the header only: catches missing files and non-images without decoding pixels."""
    if not path.is_file():
        raise DataError(f"{where}: image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header has been parsed if this works
    except Exception as err:  # PIL raises several unrelated types for bad files
        raise DataError(f"{where}: image {str(path)!r} is not a readable image ({err})") from None


class Collator:
    """Examples -> one processor batch (input_ids, attention_mask, token_type_ids, pixel_values, labels).

    Images are decoded here, per batch. Picklable, so it works in DataLoader worker processes.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        try:
            batch = self.processor(images=[e.image for e in examples], prompts=[e.prefix for e in examples],
                                   suffixes=[e.suffix for e in examples], max_length=self.max_length)
        except (ImageError, ValueError) as err:
            where = ", ".join(e.where for e in examples if e.where)
            raise DataError(f"cannot build a batch from {where}: {err}") from err
        return dict(batch)


class MicroBatchSampler:
    """Index lists of this rank's share of global micro-batches `start`, `start + 1`, ..., `stop - 1`.

    The data is an endless stream of global micro-batches of `batch_size` examples: epoch e is a
    permutation of the dataset drawn from `seed + e` (the identity without shuffling), cut into
    `len(dataset) // batch_size` micro-batches (an incomplete last one is dropped). Micro-batch m
    therefore depends only on (seed, m), never on how many processes read it or where a run
    resumed; each rank takes the [lo, hi) slice of it.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool, start: int, stop: int,
                 lo: int = 0, hi: int | None = None):
        if num_examples < batch_size:
            raise DataError(f"the dataset has {num_examples} usable example(s), fewer than one batch of "
                            f"{batch_size}: lower the batch size or add data")
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.start, self.stop = start, stop
        self.lo, self.hi = lo, batch_size if hi is None else hi

    @property
    def per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        return torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        epoch, order = None, None
        for m in range(self.start, self.stop):
            e, j = divmod(m, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.order(e)
            first = j * self.batch_size
            yield order[first + self.lo:first + self.hi].tolist()
