"""A folder of images and a folder of binary masks -> segment (or detect) rows.

    images/0001.jpg
    masks/0001.png            one object: pixels > 0 are the object (any single-channel or RGB PNG)
    masks/0001_tail.png       more objects of 0001: "<image stem>_<anything>.png"
  or, with one folder per class (the folder name is the label):
    masks/cat/0001.png  masks/dog/0001_a.png

Each mask file is one object (its pixels need not be connected); its box is the tight box of its
pixels; an all-zero mask is no object. A mask must have the image's upright size (EXIF orientation
is applied to both). Images without a mask are negative examples (empty answer) when every class is
asked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..images import ImageError
from ..vqvae import MaskCodec
from .common import (
    DataImportError,
    ImageEntry,
    ImportedObject,
    ImportResult,
    Writer,
    check_class_name,
    check_on_bad,
    check_segment_box,
    keep_image,
    mask_box,
    upright_size,
    write_object_rows,
)
from .yolo import IMAGE_SUFFIXES


def import_masks(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, writer: Writer, task: str = "segment",
                 label: str | None = None, prompt_classes: str = "all", order: str = "random", seed: int = 0,
                 codec: MaskCodec | None = None, on_bad: str = "image") -> ImportResult:
    """Rows for every image of `images_dir`, objects from the masks of `masks_dir` (module docstring)."""
    check_on_bad(on_bad)
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for folder, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise DataImportError(f"the {what} folder {folder} does not exist")
    class_dirs = sorted(p for p in masks_dir.iterdir() if p.is_dir())
    if class_dirs:
        if label is not None:
            raise DataImportError(f"{masks_dir} has one folder per class: --label is not used with it")
        sources = [(check_class_name(d.name, str(d)), d) for d in class_dirs]
    elif label is None:
        raise DataImportError(f"{masks_dir} holds mask files directly: say what they show with --label NAME "
                              "(or put them in one folder per class)")
    else:
        sources = [(check_class_name(label, "--label"), masks_dir)]
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = {p.relative_to(images_dir).with_suffix("").as_posix(): p for p in images}
    masks: dict[str, list[tuple[str, Path]]] = {stem: [] for stem in stems}
    result = ImportResult()
    for name, folder in sources:
        for mask in sorted(p for p in folder.rglob("*.png") if p.is_file()):
            stem = _owner(mask.relative_to(folder).with_suffix("").as_posix(), stems)
            if stem is None:
                result.problems.append(f"{mask}: no image named like it in {images_dir}; mask skipped")
            else:
                masks[stem].append((name, mask))

    def entries():
        for stem, image in stems.items():
            try:
                _, _, size = upright_size(image)
            except ImageError as err:
                result.problems.append(f"{image}: {err}; image skipped")
                result.skipped_images += 1
                continue
            entry = ImageEntry(image, image.relative_to(images_dir).as_posix(), size)
            bad = []
            for name, path in masks[stem]:
                try:
                    mask = read_mask(path, size)
                    if not mask.any():
                        result.notes.append(f"{path}: empty mask, no object")
                        continue
                    box = mask_box(mask)
                    check_segment_box(box)
                    entry.objects.append(ImportedObject(name, box, mask if task == "segment" else None))
                except ValueError as err:
                    bad.append(f"{path}: {err}")
            if keep_image(bad, result, on_bad, "mask"):
                yield entry

    classes = [name for name, _ in sources]
    return write_object_rows(entries(), writer, result, task, classes, prompt_classes, order, seed, codec)


def _owner(mask_stem: str, stems: dict) -> str | None:
    """The image stem a mask belongs to: the same stem, or the longest stem followed by "_"."""
    if mask_stem in stems:
        return mask_stem
    owners = [stem for stem in stems if mask_stem.startswith(stem + "_")]
    return max(owners, key=len) if owners else None


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask file as bool (height, width), upright; ValueError when unreadable or of another size."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            array = np.asarray(image.convert("L") if image.mode not in ("1", "L", "I", "I;16") else image)
    except OSError as err:
        raise ValueError(f"not a readable mask ({err})") from None
    if array.shape[:2] != (size[1], size[0]):
        raise ValueError(f"mask is {array.shape[1]}x{array.shape[0]} but the image is {size[0]}x{size[1]}")
    return array > 0
