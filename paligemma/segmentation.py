"""PaliGemma `segment` answers as data: labelled boxes with full-resolution masks, and back.

A segment answer lists objects separated by " ; ", each as 4 location tokens (the box, as in detect
answers: y_min, x_min, y_max, x_max in 1024 bins), 16 segmentation tokens (the codes of a 4x4 grid for
the VQ-VAE mask codec, see `vqvae.py`) and a label:

    "<loc0100><loc0050><loc0700><loc0600><seg012><seg101>...(16 in all) cat ; <loc...>x4<seg...>x16 dog"

Each object's codes decode to a 64x64 mask covering its box; following big_vision's segmentation
evaluator (big_vision/evaluators/proj/paligemma/transfers/segmentation.py) the box is taken in whole
pixels of the original image (`int(value / 1023 * size)`), the 64x64 mask is resized bilinearly (PIL,
float) to the box's pixel size and thresholded at 0, and pasted into an all-False image-sized mask.

Parsing is strict like `parse_detections`: an object that is not exactly "4 loc + 16 seg tokens +
label", with values out of range or a box of zero width or height (big_vision counts those invalid) is
reported in `errors` with its text, never repaired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .tasks import (
    TOKEN_RE,
    TokenSpan,
    check_image_size,
    check_label,
    encode_box,
    leading_tokens,
    object_spans,
    parse_loc_box,
    span_score,
)
from .vqvae import MASK_SIZE, NUM_TOKENS, MaskCodec


@dataclass(eq=False)
class Segmentation:
    """One segmented object."""

    label: str
    box: list[float]  # [x0, y0, x1, y1] in original image pixels
    mask: np.ndarray  # bool (height, width) of the original image, True inside the object
    codes: list[int]  # the 16 codes of the answer, row-major over the 4x4 grid
    score: float | None = None  # in [0, 1] when the answer's token log-probs were given (as for detections)

    def as_json(self) -> dict:
        """{"label", "box", "mask_rle"} (and "score" when known): what the CLI's --json and the server return
        (see `mask_to_rle`)."""
        record = {"label": self.label, "box": self.box, "mask_rle": mask_to_rle(self.mask)}
        if self.score is not None:
            record["score"] = self.score
        return record


@dataclass
class SegmentationResult:
    objects: list[Segmentation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one message per malformed object, quoting it


def parse_segmentations(answer: str, image_size: tuple[int, int], codec: MaskCodec,
                        token_spans: Sequence[TokenSpan] | None = None) -> SegmentationResult:
    """Parse a `segment ...` answer into labelled boxes and masks for the ORIGINAL (width, height) image.

    A blank answer gives no objects and no errors; each malformed object is left out of `objects` and
    reported in `errors`, the others kept. All masks are decoded in one batch by `codec`. With
    `token_spans` (`GenerationResult.token_spans()`) each object gets a `score`: the product of the
    probabilities of its 4 loc, 16 seg and label tokens, as `tasks.parse_detections` scores boxes.
    """
    check_image_size(image_size)
    result = SegmentationResult()
    parsed: list[tuple[str, list[float], list[int], float | None]] = []
    for start, end in object_spans(answer):
        segment = answer[start:end]
        try:
            parsed.append((*_parse_object(segment, image_size, codec.config.num_codes),
                           span_score(token_spans, start, end)))
        except ValueError as err:
            result.errors.append(f"{err}: {segment!r}")
    if parsed:
        with torch.no_grad():
            masks64 = codec.decode([codes for _, _, codes, _ in parsed]).float().cpu().numpy()
        for (label, box, codes, score), mask64 in zip(parsed, masks64):
            result.objects.append(Segmentation(label, box, mask_in_box(mask64, box, image_size), codes, score))
    return result


def _parse_object(segment: str, image_size: tuple[int, int], num_codes: int) -> tuple[str, list[float], list[int]]:
    """(label, box in pixels, codes) of "4 loc + 16 seg tokens + label"; ValueError saying what is wrong."""
    if not segment:
        raise ValueError("empty object (stray ';')")
    tokens, label = leading_tokens(segment)
    if not tokens:
        raise ValueError("text before the location tokens" if TOKEN_RE.search(segment)
                         else "text without location or segmentation tokens")
    if TOKEN_RE.search(label):
        raise ValueError("location or segmentation tokens inside the label")
    kinds = [kind for kind, _ in tokens]
    locs = [v for kind, v in tokens if kind == "loc"]
    segs = [v for kind, v in tokens if kind == "seg"]
    if "seg" in kinds and "loc" in kinds[kinds.index("seg"):]:
        raise ValueError("location tokens after segmentation tokens")
    box = parse_loc_box(locs, image_size)  # checks the count, range and order of the loc values
    if locs[0] == locs[2] or locs[1] == locs[3]:
        raise ValueError(f"box has zero width or height ({locs})")
    if len(segs) != NUM_TOKENS:
        raise ValueError(f"expected {NUM_TOKENS} segmentation tokens, found {len(segs)}")
    if any(not 0 <= v < num_codes for v in segs):
        raise ValueError(f"segmentation values must be 0..{num_codes - 1}, got {segs}")
    return label, box, segs


def pixel_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] float pixels -> whole pixels, truncated as big_vision's evaluator does."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return x0, y0, x1, y1


def mask_in_box(mask64: np.ndarray, box: Sequence[float], image_size: tuple[int, int]) -> np.ndarray:
    """A decoded (64, 64) mask (> 0 inside) placed in `box` -> bool (height, width) image mask.

    A box narrower or shorter than one whole pixel gives an all-False mask.
    """
    width, height = image_size
    x0, y0, x1, y1 = pixel_box(box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    full = np.zeros((height, width), dtype=bool)
    if x1 > x0 and y1 > y0:
        resized = Image.fromarray(np.asarray(mask64, dtype=np.float32)).resize((x1 - x0, y1 - y0),
                                                                               Image.Resampling.BILINEAR)
        full[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return full


# ---------------------------------------------------------------------- answers from masks (training targets)

def mask_to_64(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The part of an image-sized mask inside `box` ([x0, y0, x1, y1] pixels, rounded), as (64, 64)
    float32 in [0, 1]: bilinear with antialiasing, like big_vision's `refcoco_mask2str` (TF there, PIL here)."""
    mask = np.asarray(mask)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    crop = mask[max(y0, 0):y1, max(x0, 0):x1].astype(np.float32)
    if crop.size == 0:
        raise ValueError(f"box {list(box)} covers no whole pixel of the {mask.shape[1]}x{mask.shape[0]} mask")
    resized = Image.fromarray(crop).resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def format_segmentations(objects: Iterable[tuple[str, Sequence[float], np.ndarray]], image_size: tuple[int, int],
                         codec: MaskCodec) -> str:
    """The segment answer for (label, [x0, y0, x1, y1], image-sized bool mask) triples: box tokens, the
    codes `codec` encodes the in-box mask to, label. The inverse of `parse_segmentations` up to the
    codec's reconstruction error."""
    check_image_size(image_size)
    objects = list(objects)
    for label, _, mask in objects:
        check_label(label)
        if np.shape(mask) != (image_size[1], image_size[0]):
            raise ValueError(f"mask shape {np.shape(mask)} is not (height, width) = {image_size[::-1]}")
    if not objects:
        return ""
    with torch.no_grad():
        codes = codec.encode(np.stack([mask_to_64(mask, box) for _, box, mask in objects])).tolist()
    return " ; ".join(
        f"{encode_box(box, image_size)}{''.join(f'<seg{c:03d}>' for c in object_codes)} {label}".rstrip()
        for (label, box, _), object_codes in zip(objects, codes))


def mask_to_rle(mask: np.ndarray) -> dict:
    """A bool (H, W) mask as uncompressed run-length encoding: {"size": [H, W], "counts": [...]}.

    Runs alternate False/True over the pixels in row-major order, starting with a (possibly empty)
    run of False. Unlike COCO's RLE (column-major), this reads in the same order as the image rows.
    """
    flat = np.asarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of `mask_to_rle`."""
    height, width = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    return np.repeat(values, rle["counts"]).reshape(height, width)

