"""Fine-tuning data: JSONL rows (or Python lists) of image + prefix + suffix, and the batch collators.

A JSONL file holds one JSON object per line; image paths are relative to the file's directory:

    {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

A row that cannot be used is skipped and reported (`file:line: reason`), wherever that is found:
- when the file is read (bad JSON, a missing or non-string field, `<image>` in a text, an image path
  that is missing, not an image or over the pixel limit: the header is parsed, no pixels decoded);
- when its batch is built (an image that fails to decode, such as a truncated file; a sample over
  `max_length`). `TrainingCollator` then puts the next usable row of the dataset in its place, so
  batches keep their size and stay a function of (seed, micro-batch) alone.
`strict=True` raises `DataError` at the first bad row instead. Images are decoded only when their
batch is collated, so a dataset of any size costs memory for its paths and texts only.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import PaliGemmaError
from ..images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageError
from ..tokenizer import IMAGE_TOKEN

FIELDS = ("image", "prefix", "suffix")
# What an `image` can be in a Python row (load_image's inputs); in a JSONL row it is a path string.
_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, io.IOBase)


class DataError(PaliGemmaError, ValueError):
    """A fine-tuning data row is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One training example. `image` is a path, PIL image, bytes or array; `where` names its origin."""

    image: Any
    prefix: str
    suffix: str
    where: str = ""


@dataclass(frozen=True)
class SkippedRow:
    """A row that cannot be used: `where` it is (file:line, row N) and why; `index` in the dataset
    for rows found when their batch was built (None for rows dropped when the data was read)."""

    where: str
    reason: str
    index: int | None = None


class _Unusable(Exception):
    """Why a row cannot be used (the caller knows where the row is)."""


class FinetuneDataset(torch.utils.data.Dataset):
    """A list of `Example`s with the torch Dataset API (`len`, indexing).

    Build with `FinetuneDataset.from_jsonl(path)` or `FinetuneDataset(rows)` where rows are dicts
    with image/prefix/suffix keys, (image, prefix, suffix) tuples, or `Example`s. `skipped` lists
    the rows dropped as unusable (`problems`: the same as "where: reason" lines); `max_pixels` is
    the image size limit checked from each image's header.
    """

    def __init__(self, rows: Iterable, strict: bool = False, check_images: bool = True, source: str = "row",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.examples: list[Example] = []
        self.skipped: list[SkippedRow] = []
        for index, row in enumerate(rows):
            self._add(row, f"{source} {index}", None, check_images, max_pixels, strict, _IMAGE_TYPES)
        self._report()

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, strict: bool = False, check_images: bool = True,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> "FinetuneDataset":
        """Read a JSONL file; image paths are resolved against the file's directory."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read data file {str(path)!r}: {err}") from None
        dataset = cls.__new__(cls)
        dataset.examples, dataset.skipped = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row = _Unusable(f"not valid JSON ({err.msg} at column {err.colno})")
            dataset._add(row, f"{path}:{number}", path.parent, check_images, max_pixels, strict, image_types=(str,))
        dataset._report()
        return dataset

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def problems(self) -> list[str]:
        """The skipped rows as "where: reason" lines."""
        return [f"{row.where}: {row.reason}" for row in self.skipped]

    @property
    def num_rows(self) -> int:
        """Rows read, usable or not: what the fraction of bad rows is measured against."""
        return len(self) + len(self.skipped)

    def _add(self, row, where: str, base: Path | None, check_images: bool, max_pixels: int, strict: bool,
             image_types: tuple[type, ...]) -> None:
        try:
            if isinstance(row, _Unusable):
                raise row
            self.examples.append(_to_example(row, where, base, check_images, max_pixels, image_types))
        except _Unusable as err:
            if strict:
                raise DataError(f"{where}: {err}") from None
            self.skipped.append(SkippedRow(where, str(err)))

    def _report(self) -> None:
        if self.skipped:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... ({len(self.skipped)} in all)" if len(self.skipped) > 20 else ""
            warnings.warn(f"skipped {len(self.skipped)} bad row(s):\n  {shown}{more}", stacklevel=3)


def as_dataset(data, strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> FinetuneDataset:
    """A `FinetuneDataset` from a dataset, a JSONL path, or a list of rows."""
    if isinstance(data, FinetuneDataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return FinetuneDataset.from_jsonl(data, strict=strict, max_pixels=max_pixels)
    return FinetuneDataset(data, strict=strict, max_pixels=max_pixels)


def _to_example(row, where: str, base: Path | None, check_images: bool, max_pixels: int,
                image_types: tuple[type, ...]) -> Example:
    if isinstance(row, Example):
        row = {"image": row.image, "prefix": row.prefix, "suffix": row.suffix}
    elif isinstance(row, (tuple, list)):
        if len(row) != 3:
            raise _Unusable(f"a tuple row needs 3 items (image, prefix, suffix), got {len(row)}")
        row = dict(zip(FIELDS, row))
    if not isinstance(row, dict):
        raise _Unusable(f"expected an object with keys {list(FIELDS)}, got {type(row).__name__}")
    missing = [key for key in FIELDS if row.get(key) is None]
    if missing:
        raise _Unusable(f"missing field(s) {missing}")
    for key in ("prefix", "suffix"):
        if not isinstance(row[key], str):
            raise _Unusable(f"field {key!r} must be a string, got {type(row[key]).__name__}")
        if IMAGE_TOKEN in row[key]:
            raise _Unusable(f"field {key!r} contains {IMAGE_TOKEN!r}: the processor inserts the image tokens "
                            "itself; remove it from the text")
    image = row["image"]
    if not isinstance(image, image_types):
        kinds = "a file path" if image_types == (str,) else "a path, PIL image, bytes or array"
        raise _Unusable(f"field 'image' must be {kinds}, got {type(image).__name__}")
    if isinstance(image, (str, os.PathLike)):
        image = Path(image) if base is None or Path(image).is_absolute() else base / image
        if check_images:
            _check_image_file(image, max_pixels)
        image = str(image)
    elif isinstance(image, Image.Image) and check_images:
        _check_pixels(image.size, max_pixels)
    return Example(image, row["prefix"], row["suffix"], where)


def _check_image_file(path: Path, max_pixels: int) -> None:
    """Parse the header only: catches missing files, non-images and oversized images without decoding pixels."""
    if not path.is_file():
        raise _Unusable(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            size = image.size  # the header has been parsed if this works
    except Exception as err:  # PIL raises several unrelated types for bad files
        raise _Unusable(f"image {str(path)!r} is not a readable image ({err})") from None
    _check_pixels(size, max_pixels, f"image {str(path)!r}")


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str = "image") -> None:
    width, height = size
    if width * height > max_pixels:
        raise _Unusable(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}: "
                        "downscale it")


class Collator:
    """Examples -> one processor batch (input_ids, attention_mask, token_type_ids, pixel_values, labels).

    Images are decoded here, per batch; any unusable example raises `DataError` naming it (training
    uses `TrainingCollator`, which skips such rows instead). Picklable, so it works in DataLoader
    worker processes.
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


class TrainingCollator:
    """Global micro-batch index lists -> (this process's batch, rows found unusable while building it).

    Each example is built on its own first (image decoded, text tokenized and length-checked); one
    that fails is reported as a `SkippedRow` and replaced by the first usable row after it in dataset
    order (wrapping around) that the global micro-batch does not already hold. The replacement depends
    only on the row, the micro-batch and which rows are unusable, never on earlier batches, the
    process count or where a run resumed, so batches stay deterministic. `known_bad` (index -> reason)
    skips rows already found unusable without decoding them again. Picklable, for DataLoader workers.
    """

    def __init__(self, dataset, processor, max_length: int | None = None, lo: int = 0, hi: int | None = None,
                 strict: bool = False, known_bad: dict[int, str] | None = None):
        self.dataset, self.processor, self.max_length = dataset, processor, max_length
        self.lo, self.hi, self.strict = lo, hi, strict
        self.bad: dict[int, str] = dict(known_bad or {})

    def __call__(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], list[SkippedRow]]:
        found: list[SkippedRow] = []
        in_batch = set(indices)
        examples, pixels = [], []
        for index in list(indices)[self.lo:self.hi]:
            example, pixel_values = self._first_usable(index, in_batch, found)
            examples.append(example)
            pixels.append(pixel_values)
        batch = self.processor(images=[e.image for e in examples], prompts=[e.prefix for e in examples],
                               suffixes=[e.suffix for e in examples], max_length=self.max_length, with_pixels=False)
        batch = dict(batch, pixel_values=torch.cat(pixels))
        return batch, found

    def _first_usable(self, index: int, in_batch: set[int], found: list[SkippedRow]) -> tuple[Example, torch.Tensor]:
        size = len(self.dataset)
        for step in range(size):
            candidate = (index + step) % size
            if candidate in self.bad or (step and candidate in in_batch):
                continue
            example = self.dataset[candidate]
            try:
                return example, _build(self.processor, example, self.max_length)
            except _Unusable as err:
                if self.strict:
                    raise DataError(f"{example.where}: {err}") from None
                self.bad[candidate] = str(err)
                found.append(SkippedRow(example.where, str(err), candidate))
        raise DataError(f"no row of the training data can be used in place of {self.dataset[index].where} "
                        f"({len(self.bad)} rows are unusable; see the skipped rows reported)")


def _build(processor, example: Example, max_length: int | None) -> torch.Tensor:
    """(1, 3, H, W) pixel values of one example, after checking its text; raises `_Unusable`."""
    try:
        processor(images=[example.image], prompts=[example.prefix], suffixes=[example.suffix],
                  max_length=max_length, with_pixels=False)
        return processor.image_processor([example.image]).pixel_values
    except (PaliGemmaError, ValueError) as err:  # ImageError; UsageError (too long, <image> in a text)
        raise _Unusable(str(err)) from None


def usable_examples(dataset, processor, max_length: int | None = None,
                    strict: bool = False) -> tuple[list[Example], list[SkippedRow]]:
    """Every example of `dataset` built once (images decoded, texts checked): (the usable ones, the rest).

    For evaluation sets, read whole at every evaluation: a bad row is dropped before training starts
    rather than failing an evaluation hours in.
    """
    usable, skipped = [], []
    for index in range(len(dataset)):
        example = dataset[index]
        try:
            _build(processor, example, max_length)
            usable.append(example)
        except _Unusable as err:
            if strict:
                raise DataError(f"{example.where}: {err}") from None
            skipped.append(SkippedRow(example.where, str(err), index))
    return usable, skipped


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
