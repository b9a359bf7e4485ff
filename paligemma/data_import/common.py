"""What every importer shares: objects -> answers, problem reports, image placement, atomic JSONL.

An importer turns its format into `ImageEntry`s (a source image, its upright size and its objects
in upright image pixels) and hands them to `write_object_rows`, which builds each row's prompt and
answer with the library's own answer grammar (`tasks.format_detections`,
`segmentation.format_segmentations`). `Writer` places each image next to the JSONL (copied,
hard-linked, symlinked or referenced in place: never re-encoded) and writes the JSONL atomically
once every image is in place.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import UsageError
from ..images import ALLOWED_FORMATS, ImageError
from ..segmentation import format_segmentations
from ..tasks import check_label, format_detections
from ..vqvae import MaskCodec

ORDERS = ("random", "file", "raster")
LINK_MODES = ("copy", "hardlink", "symlink", "reference")
TASKS = ("detect", "segment")
EDGE_TOLERANCE = 1.0  # px a box may overshoot the image (float rounding in exported files); clipped


class DataImportError(UsageError):
    """An input file or option the importer cannot use at all (not a single bad annotation)."""


@dataclass
class ImportedObject:
    label: str
    box: list[float]  # [x0, y0, x1, y1] in upright image pixels
    mask: np.ndarray | None = None  # bool (height, width) of the upright image, for segment rows


@dataclass
class ImageEntry:
    source: Path  # the image file
    name: str  # its path under the images folder of the output (posix), and how problems name it
    size: tuple[int, int]  # upright (width, height)
    objects: list[ImportedObject] = field(default_factory=list)


@dataclass
class ImportResult:
    rows: int = 0
    images: int = 0  # images placed (rows of captions share them)
    skipped_images: int = 0
    problems: list[str] = field(default_factory=list)  # one line per bad annotation or image, naming file and id
    notes: list[str] = field(default_factory=list)  # what was left out on purpose (crowd regions, ...)


ON_BAD = ("image", "object")


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise DataImportError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")


def keep_image(bad: list[str], result: ImportResult, on_bad: str, what: str = "annotation") -> bool:
    """Report an image's bad annotations (one line each, saying what was skipped); whether the image
    still gets a row: on_bad "image" leaves it out (a row missing an object would teach the model to
    miss it), "object" leaves out only the bad annotations."""
    if not bad:
        return True
    result.problems.extend(f"{line}; {'image' if on_bad == 'image' else what} skipped" for line in bad)
    if on_bad == "image":
        result.skipped_images += 1
        return False
    return True


# ---------------------------------------------------------------------- geometry checks

def check_box(box: Sequence[float], size: tuple[int, int]) -> list[float]:
    """[x0, y0, x1, y1] clipped to the image when it overshoots by <= EDGE_TOLERANCE; ValueError otherwise."""
    width, height = size
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise ValueError(f"box {list(box)} has a non-finite coordinate")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"degenerate box {[x0, y0, x1, y1]} (no width or height)")
    if x0 < -EDGE_TOLERANCE or y0 < -EDGE_TOLERANCE or x1 > width + EDGE_TOLERANCE or y1 > height + EDGE_TOLERANCE:
        raise ValueError(f"box {[x0, y0, x1, y1]} extends past the {width}x{height} image")
    return [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]


def mask_box(mask: np.ndarray) -> list[float]:
    """The tight [x0, y0, x1, y1] pixel box of a bool mask's True pixels (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("empty mask")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def check_segment_box(box: list[float]) -> None:
    """`segmentation.mask_to_64` crops the box rounded to whole pixels: it must keep at least one."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box} covers no whole pixel (too small to segment)")


# ---------------------------------------------------------------------- images

def upright_size(path: Path) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """(stored (width, height), EXIF orientation 1..8, upright (width, height)), reading the header only."""
    try:
        with Image.open(path) as image:
            stored, kind = image.size, image.format
            orientation = int(image.getexif().get(0x0112, 1) or 1)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path} is not a readable image ({err})") from None
    if kind not in ALLOWED_FORMATS:
        raise ImageError(f"{path} is a {kind} image; the model's image loader reads {', '.join(ALLOWED_FORMATS)}")
    if orientation not in range(1, 9):
        orientation = 1
    upright = stored[::-1] if orientation >= 5 else stored  # 5..8 swap the axes
    return stored, orientation, upright


# PIL's ImageOps.exif_transpose for each EXIF orientation, on points (x, y) of a stored (W, H) image
# and on (H, W) arrays: the upright image's coordinates.
_POINT = {
    2: lambda x, y, w, h: (w - x, y), 3: lambda x, y, w, h: (w - x, h - y), 4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x), 6: lambda x, y, w, h: (h - y, x), 7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}
_ARRAY = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, 1),
}


def box_to_upright(box: Sequence[float], orientation: int, stored: tuple[int, int]) -> list[float]:
    """A [x0, y0, x1, y1] box of the stored pixels, in the upright image's pixels."""
    if orientation == 1:
        return [float(v) for v in box]
    x0, y0, x1, y1 = box
    corners = [_POINT[orientation](x, y, *stored) for x in (x0, x1) for y in (y0, y1)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]


def mask_to_upright(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A (H, W) mask of the stored pixels, in the upright image's pixels."""
    return mask if orientation == 1 else np.ascontiguousarray(_ARRAY[orientation](mask))


# ---------------------------------------------------------------------- answers

def ordered(objects: list[ImportedObject], order: str, key: str, seed: int) -> list[ImportedObject]:
    """The objects in answer order: "random" (seeded per image by `key`, so reruns agree), "file"
    (as the annotations list them) or "raster" (top to bottom, then left to right, by box corner)."""
    if order == "file":
        return list(objects)
    if order == "raster":
        return sorted(objects, key=lambda o: (o.box[1], o.box[0]))
    shuffled = list(objects)
    random.Random(seed * 1_000_003 + zlib.crc32(key.encode())).shuffle(shuffled)
    return shuffled


def task_prompt(task: str, labels: Iterable[str]) -> str:
    """"detect a ; b" / "segment a ; b", labels in the given order without repeats."""
    unique = list(dict.fromkeys(labels))
    return f"{task} {' ; '.join(unique)}".rstrip()


def answer(task: str, objects: list[ImportedObject], size: tuple[int, int], codec: MaskCodec | None) -> str:
    if task == "detect":
        return format_detections([(o.label, o.box) for o in objects], size)
    return format_segmentations([(o.label, o.box, o.mask) for o in objects], size, codec)


def check_class_name(name: str, where: str) -> str:
    """A class name usable as a label: stripped, non-empty, no ';' or <loc>/<seg> tokens."""
    if not isinstance(name, str) or not name.strip():
        raise DataImportError(f"{where}: class name {name!r} is empty or not text")
    label = " ".join(name.split())
    try:
        check_label(label)
    except ValueError as err:
        raise DataImportError(f"{where}: {err}") from None
    return label


# ---------------------------------------------------------------------- output

class Writer:
    """Places images and collects rows; `finish` writes the JSONL atomically (after every image is placed)."""

    def __init__(self, out: str | os.PathLike, images_dir: str | os.PathLike | None = None, link: str = "copy",
                 overwrite: bool = False):
        self.out = Path(out)
        if link not in LINK_MODES:
            raise DataImportError(f"link must be one of {LINK_MODES}, got {link!r}")
        if self.out.suffix != ".jsonl":
            raise DataImportError(f"--out {self.out}: the output is a .jsonl file")
        if self.out.exists() and not overwrite:
            raise DataImportError(f"{self.out} exists; pass --overwrite to replace it, or choose another --out")
        if not self.out.parent.is_dir():
            raise DataImportError(f"the folder of --out ({self.out.parent}) does not exist")
        self.images_dir = Path(images_dir) if images_dir is not None else self.out.parent / "images"
        self.link, self.overwrite = link, overwrite
        self.rows: list[dict] = []
        self.placed: dict[str, str] = {}  # image name -> path written in the rows

    def place(self, entry: ImageEntry) -> str:
        """Put `entry.source` under the images folder (once per image); the path to write in its rows."""
        if entry.name in self.placed:
            return self.placed[entry.name]
        if self.link == "reference":
            target = entry.source.resolve()
        else:
            target = self.images_dir / entry.name
            self._put(entry.source, target)
        relative = Path(os.path.relpath(target, self.out.parent.resolve() if self.link == "reference"
                                        else self.out.parent)).as_posix()
        self.placed[entry.name] = relative
        return relative

    def _put(self, source: Path, target: Path) -> None:
        if target.exists() or target.is_symlink():
            if target.resolve() == source.resolve() or filecmp.cmp(source, target, shallow=False):
                return  # the same image from an earlier run
            if not self.overwrite:
                raise DataImportError(f"{target} exists with other content than {source}; pass --overwrite to "
                                      "replace it, or choose another --images-dir")
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            if self.link == "copy":
                shutil.copyfile(source, tmp)
            elif self.link == "hardlink":
                os.link(source, tmp)
            else:
                os.symlink(source.resolve(), tmp)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            hint = " (hard links need one file system: use --link copy or symlink)" if self.link == "hardlink" else ""
            raise OSError(f"cannot {self.link} {source} to {target}: {err.strerror or err}{hint}") from None

    def add(self, image: str, prefix: str, suffix: str | list[str]) -> None:
        self.rows.append({"image": image, "prefix": prefix, "suffix": suffix})

    def finish(self) -> int:
        """Write the JSONL (temporary file renamed into place); returns the number of rows."""
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in self.rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, self.out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(self.rows)


PROMPT_CLASSES = ("all", "present", "each")


def write_object_rows(entries: Iterable[ImageEntry], writer: Writer, result: ImportResult, task: str,
                      classes: list[str], prompt_classes: str, order: str, seed: int,
                      codec: MaskCodec | None) -> ImportResult:
    """detect/segment rows, objects in `order`. prompt_classes: "all", one row per image asking for
    every class (an image without objects is a negative example with an empty answer); "present",
    one row per image asking for the classes in it; "each", one row per class in the image asking
    for it alone ("detect cat"). Images that would ask for nothing are left out (noted)."""
    if task not in TASKS:
        raise DataImportError(f"task must be one of {TASKS}, got {task!r}")
    if task == "segment" and codec is None:
        raise DataImportError("segment rows need a mask codec with an encoder (--mask-codec, e.g. vae-oid.npz)")
    if prompt_classes not in PROMPT_CLASSES:
        raise DataImportError(f"prompt classes must be one of {PROMPT_CLASSES}, got {prompt_classes!r}")
    if order not in ORDERS:
        raise DataImportError(f"order must be one of {ORDERS}, got {order!r}")
    for entry in entries:
        present = {o.label for o in entry.objects}
        asked = classes if prompt_classes == "all" else [c for c in classes if c in present]
        if not asked:
            result.notes.append(f"{entry.name}: no objects, not written (prompt classes '{prompt_classes}')")
            continue
        objects = ordered(entry.objects, order, entry.name, seed)
        prompts = [asked] if prompt_classes != "each" else [[label] for label in asked]
        try:
            suffixes = [answer(task, [o for o in objects if o.label in labels], entry.size, codec)
                        for labels in prompts]
        except ValueError as err:  # a label or box the answer grammar cannot hold
            result.problems.append(f"{entry.name}: {err}; image skipped")
            result.skipped_images += 1
            continue
        for labels, suffix in zip(prompts, suffixes):
            writer.add(writer.place(entry), task_prompt(task, labels), suffix)
    return finish(writer, result)


def finish(writer: Writer, result: ImportResult) -> ImportResult:
    """Write the rows (refusing to write none) and fill in the counts."""
    if not writer.rows:
        shown = "; ".join(result.problems[:3] or result.notes[:3])
        raise DataImportError(f"nothing to write: no image gave a row ({shown or 'no images found'})")
    result.images = len(writer.placed)
    result.rows = writer.finish()
    return result
