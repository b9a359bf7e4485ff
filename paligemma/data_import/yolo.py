"""YOLO (Ultralytics) datasets -> training rows.

    dataset/data.yaml       path: (optional root), train: images/train, val: images/val, names: {0: cat, 1: dog}
    dataset/images/train/0001.jpg
    dataset/labels/train/0001.txt    one object per line: "class cx cy w h" (detection) or
                                     "class x1 y1 x2 y2 x3 y3 ..." (a polygon: segmentation)

As Ultralytics reads them: coordinates are fractions of the upright image (EXIF orientation applied),
a label file sits where the image is with the last "/images/" replaced by "/labels/" and a .txt
extension, an image without a label file has no objects, and a split is a folder, a list of folders
or a .txt file listing images (relative to the dataset root). A polygon line gives a detect row its
bounding box and a segment row its mask; a box line cannot make a segment row and is reported.

data.yaml is read with PyYAML when it is installed, else with a small reader for the keys used here
(`path`, `train`, `val`, `test`: a string or a [list]; `names`: a [list], a block list or an
index: name mapping).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np

from ..images import ImageError
from ..vqvae import MaskCodec
from .coco import polygons_to_mask
from .common import (
    DataImportError,
    ImageEntry,
    ImportedObject,
    ImportResult,
    Writer,
    check_box,
    check_class_name,
    check_on_bad,
    check_segment_box,
    keep_image,
    upright_size,
    write_object_rows,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}  # images.ALLOWED_FORMATS


def read_data_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataImportError(f"{path} does not exist") from None
    try:
        import yaml
    except ImportError:
        data = parse_simple_yaml(text, path)
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataImportError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataImportError(f"{path} has no 'names': not a YOLO data.yaml")
    return data


def parse_simple_yaml(text: str, path: Path | str = "data.yaml") -> dict:
    """The subset of YAML a YOLO data.yaml uses: top-level `key: scalar | [list]`, and block lists or
    `index: name` mappings under a key. Raises DataImportError on anything else."""
    data: dict = {}
    current = None  # the key whose block we are in
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not line.strip() or line.strip() == "---":
            continue
        indented = line[0] in " \t"
        content = line.strip()
        if indented and current is not None:
            if content.startswith("- "):
                block = data[current] if isinstance(data[current], list) else []
                data[current] = block + [_scalar(content[2:])]
                continue
            key, sep, value = content.partition(":")
            if sep and value.strip():
                block = data[current] if isinstance(data[current], dict) else {}
                block[_scalar(key)] = _scalar(value)
                data[current] = block
                continue
        elif not indented:
            key, sep, value = content.partition(":")
            if sep and key.strip():
                current = key.strip()
                data[current] = _scalar(value) if value.strip() else None
                continue
        raise DataImportError(f"{path}:{number}: cannot read {raw.strip()!r} (install PyYAML for full YAML)")
    return data


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _scalar(text: str):
    text = text.strip()
    if text.startswith("["):
        inner = text.strip("[]").strip()
        return [_scalar(part) for part in _split_commas(inner)] if inner else []
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return ast.literal_eval(text) if text[0] == '"' else text[1:-1].replace("''", "'")
    if text.lstrip("-").isdigit():
        return int(text)
    return {"null": None, "~": None, "true": True, "false": False}.get(text.lower(), text)


def _split_commas(text: str) -> list[str]:
    parts, quote, start = [], None, 0
    for i, char in enumerate(text):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "," and quote is None:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def class_names(data: dict, where: str) -> list[str]:
    names = data["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataImportError(f"{where}: names must map the indices 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataImportError(f"{where}: names must be a list or an index: name mapping")
    return [check_class_name(str(name), f"{where}: class {i}") for i, name in enumerate(names)]


def split_images(data: dict, yaml_path: Path, split: str) -> tuple[Path, list[Path]]:
    """(dataset root, the split's image files, sorted)."""
    root = Path(data.get("path") or yaml_path.parent)
    if not root.is_absolute():
        root = (yaml_path.parent / root).resolve()
    entries = data.get(split)
    if not entries:
        raise DataImportError(f"{yaml_path} has no {split!r} split (keys: {sorted(k for k in data if k != 'names')})")
    images = []
    for entry in entries if isinstance(entries, list) else [entries]:
        where = (root / str(entry)).resolve()
        if where.is_dir():
            images += [p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif where.suffix == ".txt" and where.is_file():
            lines = [line.strip() for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
            images += [(root / line).resolve() for line in lines]
        else:
            raise DataImportError(f"{yaml_path}: {split} entry {entry!r} is neither a folder nor a .txt list ({where})")
    return root, sorted(set(images))


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ in the path becomes /labels/, the extension .txt."""
    parts = list(image.parts)
    if "images" not in parts:
        return image.with_suffix(".txt")
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def import_yolo(data_yaml: str | os.PathLike, writer: Writer, split: str = "train", task: str = "detect",
                prompt_classes: str = "all", order: str = "random", seed: int = 0, codec: MaskCodec | None = None,
                on_bad: str = "image") -> ImportResult:
    """Rows for every image of a YOLO split; bad lines are reported in the result (see import_coco's on_bad)."""
    check_on_bad(on_bad)
    yaml_path = Path(data_yaml)
    data = read_data_yaml(yaml_path)
    names = class_names(data, str(yaml_path))
    root, images = split_images(data, yaml_path, split)
    result = ImportResult()

    def entries():
        for image in images:
            name = image.relative_to(root).as_posix() if image.is_relative_to(root) else image.name
            try:
                _, _, size = upright_size(image)
            except (FileNotFoundError, ImageError) as err:
                result.problems.append(f"{image}: {err if isinstance(err, ImageError) else 'not found'}; image skipped")
                result.skipped_images += 1
                continue
            entry = ImageEntry(image, name, size)
            labels = label_path(image)
            lines = labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else []
            bad = []
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    entry.objects.append(_object(line, names, size, task))
                except ValueError as err:
                    bad.append(f"{labels}:{number}: {err}")
            if keep_image(bad, result, on_bad, "object"):
                yield entry

    return write_object_rows(entries(), writer, result, task, names, prompt_classes, order, seed, codec)


def _object(line: str, names: list[str], size: tuple[int, int], task: str) -> ImportedObject:
    fields = line.split()
    try:
        index, values = int(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        raise ValueError(f"not 'class x y ...' numbers: {line.strip()!r}") from None
    if not 0 <= index < len(names):
        raise ValueError(f"unknown class {index} (data.yaml names {len(names)} classes)")
    width, height = size
    if len(values) == 4:
        if task == "segment":
            raise ValueError("a box line has no polygon to segment")
        cx, cy, w, h = values
        box = check_box([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height],
                        size)
        return ImportedObject(names[index], box)
    if len(values) < 6 or len(values) % 2:
        raise ValueError(f"degenerate polygon ({len(values)} values; needs x, y pairs for at least 3 points)")
    points = np.asarray(values).reshape(-1, 2) * [width, height]
    box = check_box([points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()], size)
    if task == "detect":
        return ImportedObject(names[index], box)
    mask = polygons_to_mask([points.ravel().tolist()], size)
    if not mask.any():
        raise ValueError("polygon covers no pixel")
    check_segment_box(box)
    return ImportedObject(names[index], box, mask)
