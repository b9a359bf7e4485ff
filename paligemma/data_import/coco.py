"""COCO files -> training rows: instances (detect / segment) and captions.

Instances (`instances_*.json`): one row per image. `bbox` is [x, y, width, height] in pixels; the
label is the category's `name`. Segment rows take each object's mask from its `segmentation`:
polygons ([[x1, y1, x2, y2, ...], ...]: the pixels whose centres are inside) or RLE
({"size": [h, w], "counts": [...] or "compressed string"}, column-major, decoded here: pycocotools
is not needed). Crowd regions (`iscrowd: 1`) are group outlines, not objects: they are left out and
counted in the notes.

A file's `width`/`height` must be the image's. When the image carries an EXIF rotation, they say
which frame the annotations use: the stored pixels (then boxes and masks are turned upright, as the
model sees the image) or the upright image (kept). When both frames have the same size (mirrored or
180-degree orientations) the frame cannot be told and the image is reported and skipped.

Captions (`captions_*.json`): one row per caption, or one row per image with every caption in a
list (`group=True`, the references an evaluation wants).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import read_json
from ..images import ImageError
from ..vqvae import MaskCodec
from .common import (
    DataImportError,
    ImageEntry,
    ImportedObject,
    ImportResult,
    Writer,
    box_to_upright,
    check_box,
    check_class_name,
    check_on_bad,
    check_segment_box,
    finish,
    keep_image,
    mask_to_upright,
    upright_size,
    write_object_rows,
)


def read_coco_json(path: str | os.PathLike) -> dict:
    """A COCO annotations file (any kind: it has an 'images' list); DataImportError if it is not one."""
    data = read_json(path, DataImportError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataImportError(f"{path} is not a COCO file: no 'images' list")
    return data


def import_coco(annotations: str | os.PathLike, images_dir: str | os.PathLike, writer: Writer, task: str = "detect",
                prompt_classes: str = "all", order: str = "random", seed: int = 0, codec: MaskCodec | None = None,
                on_bad: str = "image") -> ImportResult:
    """Rows for every image of a COCO instances file; problems are reported in the result, not raised.
    on_bad: what a bad annotation leaves out, its "image" or only the "object" (common.keep_image)."""
    path = Path(annotations)
    data = read_coco_json(path)
    if not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations"), list):
        raise DataImportError(f"{path} has no 'categories' and 'annotations' lists: not a COCO instances file "
                              "(captions files go through --format coco-captions)")
    check_on_bad(on_bad)
    categories = {}
    for category in data["categories"]:
        where = f"{path}: category {category.get('id')}"
        categories[category.get("id")] = check_class_name(category.get("name"), where)
    classes = list(dict.fromkeys(categories.values()))  # the file's category order (COCO's: by id)
    result = ImportResult()
    by_image: dict = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation.get("image_id"), []).append(annotation)

    def entries():
        for image in data["images"]:
            found = _image_entry(path, image, Path(images_dir), result)
            if found is None:
                continue
            entry, frame = found
            bad = []
            for annotation in by_image.get(image.get("id"), []):
                where = f"{path}: annotation {annotation.get('id')} (image {image.get('id')} {entry.name!r})"
                if annotation.get("iscrowd"):
                    result.notes.append(f"{where}: crowd region left out")
                    continue
                try:
                    entry.objects.append(_object(annotation, categories, entry.size, frame, task))
                except ValueError as err:
                    bad.append(f"{where}: {err}")
            if keep_image(bad, result, on_bad):
                yield entry

    return write_object_rows(entries(), writer, result, task, classes, prompt_classes, order, seed, codec)


def import_coco_captions(annotations: str | os.PathLike, images_dir: str | os.PathLike, writer: Writer,
                         prompt: str = "caption en", group: bool = False) -> ImportResult:
    """Rows for every caption of a COCO captions file (or one row per image with all of them, `group`)."""
    path = Path(annotations)
    data = read_coco_json(path)
    if not isinstance(data.get("annotations"), list):
        raise DataImportError(f"{path} has no 'annotations' list: not a COCO captions file")
    result = ImportResult()
    captions: dict = {}
    for annotation in data["annotations"]:
        text = annotation.get("caption")
        if not isinstance(text, str) or not text.strip():
            result.problems.append(f"{path}: annotation {annotation.get('id')}: no caption text; skipped")
            continue
        captions.setdefault(annotation.get("image_id"), []).append(" ".join(text.split()))
    for image in data["images"]:
        texts = captions.get(image.get("id"), [])
        if not texts:
            result.notes.append(f"{path}: image {image.get('id')}: no captions, not written")
            continue
        found = _image_entry(path, image, Path(images_dir), result)
        if found is None:
            continue
        name = writer.place(found[0])
        for text in [texts] if group else texts:
            writer.add(name, prompt, text)
    return finish(writer, result)


# ---------------------------------------------------------------------- pieces

def _image_entry(path: Path, image: dict, images_dir: Path, result: ImportResult):
    """(ImageEntry, (EXIF orientation to apply to the annotations (1 = none), stored size)), or None
    after reporting why not."""
    where = f"{path}: image {image.get('id')} {image.get('file_name')!r}"
    name = image.get("file_name")
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        result.problems.append(f"{where}: file_name must be a relative path inside the images folder; image skipped")
        result.skipped_images += 1
        return None
    source = images_dir / name
    try:
        stored, orientation, upright = upright_size(source)
    except (FileNotFoundError, ImageError) as err:
        reason = "image file not found" if isinstance(err, FileNotFoundError) else str(err)
        result.problems.append(f"{where}: {reason} ({source}); image skipped")
        result.skipped_images += 1
        return None
    declared = (image.get("width"), image.get("height"))
    problem = None
    if declared not in (stored, upright):
        problem = f"the file says {declared[0]}x{declared[1]} but the image is {upright[0]}x{upright[1]}"
    elif orientation != 1 and stored == upright:
        problem = (f"EXIF orientation {orientation} keeps the image's size, so whether the annotations are on the "
                   "stored or the upright pixels cannot be told")
    if problem:
        result.problems.append(f"{where}: {problem}; image skipped")
        result.skipped_images += 1
        return None
    frame = 1 if declared == upright else orientation  # on the stored pixels: turned upright
    return ImageEntry(source, Path(name).as_posix(), upright), (frame, stored)


def _object(annotation: dict, categories: dict, size: tuple[int, int], frame, task: str) -> ImportedObject:
    """The annotation as an object in upright pixels; ValueError saying what is wrong with it."""
    orientation, stored = frame
    if annotation.get("category_id") not in categories:
        raise ValueError(f"unknown category_id {annotation.get('category_id')!r}")
    label = categories[annotation["category_id"]]
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ValueError(f"bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = bbox
    box = check_box(box_to_upright([x, y, x + w, y + h], orientation, stored), size)
    if task == "detect":
        return ImportedObject(label, box)
    mask = mask_to_upright(segmentation_mask(annotation.get("segmentation"), stored), orientation)
    if not mask.any():
        raise ValueError("segmentation covers no pixel")
    check_segment_box(box)
    return ImportedObject(label, box, mask)


def segmentation_mask(segmentation, size: tuple[int, int]) -> np.ndarray:
    """A COCO `segmentation` (polygons or RLE) as a bool (height, width) mask of a (width, height) image."""
    width, height = size
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, size)
    if isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(f"RLE size {segmentation.get('size')} is not the image's [{height}, {width}]")
        counts = segmentation.get("counts")
        if isinstance(counts, str):
            counts = rle_counts_from_string(counts)
        if not isinstance(counts, list) or sum(counts) != width * height or min(counts, default=0) < 0:
            raise ValueError(f"RLE counts do not cover the {width}x{height} image")
        values = np.zeros(len(counts), dtype=bool)
        values[1::2] = True
        return np.repeat(values, counts).reshape((height, width), order="F")  # COCO runs go down the columns
    raise ValueError(f"segmentation must be polygons or RLE, got {type(segmentation).__name__}")


def polygons_to_mask(polygons: list, size: tuple[int, int]) -> np.ndarray:
    """COCO polygons ([[x1, y1, x2, y2, ...], ...]) as a bool (height, width) mask: a pixel is inside
    when its centre is (even-odd rule within a polygon; several polygons are united, as COCO's parts
    of one object). pycocotools rasterises on a 5x grid instead; the two differ on edge pixels only."""
    if not polygons:
        raise ValueError("no polygons")
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in polygon)):
            raise ValueError(f"degenerate polygon ({len(polygon) if isinstance(polygon, list) else polygon!r} "
                             "values; needs x, y pairs for at least 3 points)")
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        x, y = points[:, 0], points[:, 1]
        if np.dot(x, np.roll(y, 1)) == np.dot(y, np.roll(x, 1)):  # shoelace: zero area
            raise ValueError("degenerate polygon (zero area)")
        _fill_centres(x, y, mask)
    return mask


def _fill_centres(x0: np.ndarray, y0: np.ndarray, mask: np.ndarray) -> None:
    """Set the pixels of `mask` whose centres lie inside the polygon (x0, y0): one scanline per row."""
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    centres = np.arange(mask.shape[1]) + 0.5
    first, last = max(int(np.floor(y0.min())), 0), min(int(np.ceil(y0.max())), mask.shape[0])
    for row in range(first, last):
        yc = row + 0.5
        crossing = (y0 <= yc) != (y1 <= yc)  # edges spanning the row's centre line
        if crossing.any():
            xs = np.sort(x0[crossing] + (yc - y0[crossing]) * (x1[crossing] - x0[crossing])
                         / (y1[crossing] - y0[crossing]))
            mask[row] |= np.searchsorted(xs, centres, side="right") % 2 == 1


def rle_counts_from_string(text: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString: 5-bit groups, '0'-offset
    characters, a continuation bit, sign-extended, each run after the second stored as a difference)."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError("truncated RLE string")
            chunk = ord(text[position]) - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position += 1
            shift += 1
            if not more and chunk & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
