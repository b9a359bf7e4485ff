"""Pictures of answers: boxes with labels, segmentation masks, or a text answer under the image. Pillow only."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

# Well-separated colours (Tableau 10); a label keeps its colour, assigned in order of first appearance.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def draw_detections(image: Image.Image, detections: Iterable[tuple[str, Sequence[float]]],
                    out_path: str | os.PathLike | None = None) -> Image.Image:
    """Draw (label, [x0, y0, x1, y1]) boxes (e.g. `Detection`s) on an RGB copy of `image`.

    Line width and font size grow with the image. Saves to `out_path` when given (format from its
    extension) and returns the drawn image.
    """
    canvas = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    width = max(1, round(short_side / 200))
    font = _font(short_side)
    colours: dict[str, str] = {}
    for label, box in detections:
        colour = colours.setdefault(label, _PALETTE[len(colours) % len(_PALETTE)])
        x0, y0, x1, y1 = box
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        if label:
            _label(draw, label, (x0, y0), colour, font, canvas.size)
    if out_path is not None:
        canvas.save(out_path)
    return canvas


def draw_caption(image: Image.Image, text: str, out_path: str | os.PathLike | None = None) -> Image.Image:
    """The image with `text` written in a white band below it (for answers that are not boxes)."""
    source = image.convert("RGB")
    font = _font(min(source.size))
    margin = max(2, min(source.size) // 75)
    lines = _wrap(text or "(empty answer)", font, source.width - 2 * margin)
    line_height = font.getbbox("Ag")[3] + margin
    canvas = Image.new("RGB", (source.width, source.height + len(lines) * line_height + margin), "white")
    canvas.paste(source, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((margin, source.height + margin + i * line_height), line, fill="black", font=font)
    if out_path is not None:
        canvas.save(out_path)
    return canvas


def draw_masks(image: Image.Image, segmentations: Iterable, out_path: str | os.PathLike | None = None,
               opacity: float = 0.45) -> Image.Image:
    """Draw segmentations (objects with `label`, `box` [x0, y0, x1, y1] and `mask`, a bool (height, width)
    array, e.g. `segmentation.Segmentation`s) on an RGB copy of `image`: each mask as a translucent fill
    in its label's colour, then the boxes and labels as `draw_detections` draws them."""
    canvas = image.convert("RGB")
    segmentations = list(segmentations)
    colours: dict[str, str] = {}
    for segmentation in segmentations:
        colour = colours.setdefault(segmentation.label, _PALETTE[len(colours) % len(_PALETTE)])
        mask = Image.fromarray(segmentation.mask).convert("L")
        if mask.size != canvas.size:
            raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, the image {canvas.size[0]}x{canvas.size[1]}")
        tinted = Image.blend(canvas, Image.new("RGB", canvas.size, colour), opacity)
        canvas = Image.composite(tinted, canvas, mask)
    return draw_detections(canvas, [(s.label, s.box) for s in segmentations], out_path)


def _font(short_side: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled default font, about 1/25 of the image's short side (at least 10 px)."""
    return ImageFont.load_default(size=max(10, short_side // 25))


def _label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[float, float], colour: str, font,
           canvas_size: tuple[int, int]) -> None:
    """Text on a filled tag at the box's top-left corner: above the box when there is room, else inside."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, corner[0]), max(0.0, canvas_size[0] - tag_w))
    y = corner[1] - tag_h if corner[1] - tag_h >= 0 else max(0.0, corner[1])
    draw.rectangle([x, y, x + tag_w, y + tag_h], fill=colour)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(colour), font=font)


def _text_colour(hex_colour: str) -> str:
    """Black on light tags, white on dark ones (perceived luminance)."""
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def _wrap(text: str, font, max_width: int) -> list[str]:
    """Greedy word wrap to `max_width` pixels; explicit newlines kept; a too-long word gets a line of its own."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines
