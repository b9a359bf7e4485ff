"""PaliGemma task answers as data: `detect` answers <-> labelled boxes in image pixels.

A detect answer lists objects separated by " ; ", each as four location tokens and a label:

    "<loc0102><loc0040><loc0300><loc0251> red circle ; <loc0511><loc0600><loc0730><loc0822> square"

The four values are y_min, x_min, y_max, x_max in 1024 bins over the image (0..1023), whatever its
aspect ratio: the model sees the image squashed to a square, so x bins cover the width and y bins
the height of the ORIGINAL image.

Bins <-> pixels: big_vision encodes `round(coord / size * 1023)` and decodes `value / 1023 * size`;
the Hugging Face blog decodes `value / 1024 * size`. We follow big_vision, the code the models were
trained with, so encode -> decode is exact up to rounding (and 1023 maps back to the image edge);
the /1024 reading shrinks every box towards the top-left by up to 0.1% of the image.

Answers are parsed strictly: a segment that is not exactly "4 loc tokens + label" is reported in
`DetectionResult.errors` with its text, never repaired or silently dropped.

Scores: given the log-probabilities of the answer's tokens (`TokenSpan`s, from
`GenerationResult.token_spans()`), each detection gets `score` = the product of the probabilities
of the tokens that wrote it: its four loc tokens and its label tokens (not the " ;" separator nor
<eos>), in [0, 1]. Each probability is the one the token was drawn with (see `sampling.py`: after
temperature, top-k, top-p and any constraint), so a greedy, unconstrained answer scores the model's
own confidence. `filter_detections` thresholds on it and runs per-label non-maximum suppression.

This module is the one home of the answer grammar: the token-level helpers (`TOKEN_RE`,
`object_spans`, `leading_tokens`, `parse_loc_box`, `encode_box`, `check_label`, `check_image_size`,
`span_score`) are what `segmentation.py` builds the `segment` answer format (4 loc tokens, 16 seg
tokens, label) on, and `constrained.py` turns into a state machine over token ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

from .metrics import box_iou
from .tokenizer import NUM_LOC_TOKENS

_LOC_SCALE = NUM_LOC_TOKENS - 1  # big_vision's x1023 / /1023 (see module docstring)

# Any digits, so that malformed values (<loc1500>, <loc12>) are seen and reported, not taken as text.
_LOC_RE = re.compile(r"<loc(\d+)>")
_SEG_RE = re.compile(r"<seg(\d+)>")
TOKEN_RE = re.compile(r"<(loc|seg)(\d+)>")  # a <loc>/<seg> token: groups (kind, digits)
_SEPARATOR_RE = re.compile(r"\s*;\s*")


@dataclass
class Detection:
    """One detected object; unpacks as `label, box` (so code written for (label, box) pairs works)."""

    label: str
    box: list[float]  # [x0, y0, x1, y1] in original image pixels
    score: float | None = None  # in [0, 1] when the answer's token log-probabilities were given

    def __iter__(self) -> Iterator:
        return iter((self.label, self.box))

    def as_json(self) -> dict:
        """{"label", "box"} and "score" when known: what the CLI's --json and the server return."""
        record = {"label": self.label, "box": self.box}
        if self.score is not None:
            record["score"] = self.score
        return record


class TokenSpan(NamedTuple):
    """One generated token: the characters [start, end) of the answer text it wrote, and its log-prob."""

    start: int
    end: int
    logprob: float


@dataclass
class DetectionResult:
    objects: list[Detection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one message per malformed segment, quoting it


def prompt_task(prompt: str) -> str:
    """The task word of a prompt ("detect", "segment", "caption", "answer", ...), lower-cased; "" if blank."""
    words = prompt.split(maxsplit=1)
    return words[0].lower() if words else ""


# ---------------------------------------------------------------------- token-level helpers

def prompt_labels(prompt: str) -> list[str]:
    """The labels a `detect` / `segment` prompt asks for: "detect triangle ; circle" -> ["triangle", "circle"]."""
    words = prompt.split(maxsplit=1)
    return [label for label in split_objects(words[1]) if label] if len(words) == 2 else []


def split_objects(answer: str) -> list[str]:
    """The object segments of an answer, split on ";" with any spacing; [] for a blank answer."""
    return [answer[start:end] for start, end in object_spans(answer)]


def object_spans(answer: str) -> list[tuple[int, int]]:
    """(start, end) characters of each object segment of an answer, spacing stripped; [] for a blank answer."""
    if not answer.strip():
        return []
    bounds, start = [], 0
    for separator in _SEPARATOR_RE.finditer(answer):
        bounds.append((start, separator.start()))
        start = separator.end()
    bounds.append((start, len(answer)))
    spans = []
    for start, end in bounds:
        while start < end and answer[start].isspace():
            start += 1
        while end > start and answer[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return spans


def span_score(token_spans: Sequence[TokenSpan] | None, start: int, end: int) -> float | None:
    """exp(sum of the log-probs of the tokens that wrote characters [start, end) of the answer), or None."""
    if token_spans is None:
        return None
    return math.exp(sum(t.logprob for t in token_spans if t.start < end and t.end > start and t.end > t.start))


def leading_tokens(segment: str) -> tuple[list[tuple[str, int]], str]:
    """Split a segment into its leading <loc>/<seg> tokens [(kind, value)] and the rest (the label), stripped."""
    tokens = []
    position = 0
    while match := TOKEN_RE.match(segment, position):
        tokens.append((match.group(1), int(match.group(2))))
        position = match.end()
    return tokens, segment[position:].strip()


def parse_loc_box(values: Sequence[int], image_size: tuple[int, int]) -> list[float]:
    """Four loc values (y_min, x_min, y_max, x_max) -> [x0, y0, x1, y1] in pixels of a (width, height) image.

    Raises ValueError (saying why) for a wrong count, a value past 1023 or a min above its max.
    """
    if len(values) != 4:
        raise ValueError(f"expected 4 location tokens, found {len(values)}")
    if any(not 0 <= v < NUM_LOC_TOKENS for v in values):
        raise ValueError(f"location values must be 0..{NUM_LOC_TOKENS - 1}, got {list(values)}")
    y0, x0, y1, x1 = values
    if y0 > y1 or x0 > x1:
        raise ValueError(f"box has min > max (y_min={y0}, x_min={x0}, y_max={y1}, x_max={x1})")
    width, height = image_size
    return [x0 / _LOC_SCALE * width, y0 / _LOC_SCALE * height, x1 / _LOC_SCALE * width, y1 / _LOC_SCALE * height]


# ---------------------------------------------------------------------- detect

def parse_detections(answer: str, image_size: tuple[int, int],
                     token_spans: Sequence[TokenSpan] | None = None) -> DetectionResult:
    """Parse a `detect ...` answer into labelled boxes in pixels of the ORIGINAL (width, height) image.

    A blank answer (the model found nothing) gives no objects and no errors. Each malformed segment
    is left out of `objects` and reported in `errors` with its text; the other objects are kept.
    A segment without a label ("<loc..>x4") is kept with label "". With `token_spans` (the answer's
    tokens and log-probs, `GenerationResult.token_spans()`) each detection gets its `score`.
    """
    check_image_size(image_size)
    result = DetectionResult()
    for start, end in object_spans(answer):
        segment = answer[start:end]
        problem = _detection_problem(segment)
        if problem is None:
            tokens, label = leading_tokens(segment)
            try:
                box = parse_loc_box([v for _, v in tokens], image_size)
                result.objects.append(Detection(label, box, span_score(token_spans, start, end)))
                continue
            except ValueError as err:
                problem = str(err)
        result.errors.append(f"{problem}: {segment!r}")
    return result


def _detection_problem(segment: str) -> str | None:
    """Why `segment` is not "4 loc tokens + label" (count and range are checked by parse_loc_box), or None."""
    if not segment:
        return "empty object (stray ';')"
    if _SEG_RE.search(segment):
        return "segmentation tokens in a detect answer"
    locs = _LOC_RE.findall(segment)
    if not locs:
        return "text without location tokens"
    tokens, label = leading_tokens(segment)
    if not tokens:
        return "text before the location tokens"
    if _LOC_RE.search(label):
        return f"location tokens inside the label ({len(locs)} in all)"
    return None


def encode_box(box_xyxy: Sequence[float], image_size: tuple[int, int]) -> str:
    """[x0, y0, x1, y1] pixels of a (width, height) image -> "<locYMIN><locXMIN><locYMAX><locXMAX>".

    Each value is round(coord / size * 1023) (Python's round: half to even, like big_vision's
    tf.round). Coordinates outside the image or a min above its max raise ValueError.
    """
    check_image_size(image_size)
    if len(box_xyxy) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {list(box_xyxy)}")
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    width, height = image_size
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"box {[x0, y0, x1, y1]} is not inside a {width}x{height} image with min <= max")
    values = (round(y0 / height * _LOC_SCALE), round(x0 / width * _LOC_SCALE),
              round(y1 / height * _LOC_SCALE), round(x1 / width * _LOC_SCALE))
    return "".join(f"<loc{v:04d}>" for v in values)


def format_detections(detections: Iterable[tuple[str, Sequence[float]]], image_size: tuple[int, int]) -> str:
    """The detect answer for (label, [x0, y0, x1, y1]) pairs (or `Detection`s): the inverse of parse_detections."""
    segments = []
    for label, box in detections:
        check_label(label)
        segments.append(f"{encode_box(box, image_size)} {label}".rstrip())
    return " ; ".join(segments)


def check_label(label: str) -> None:
    """Raise ValueError unless `label` reads back unchanged from an answer (no ';', no <loc>/<seg>
    tokens, no leading or trailing spaces)."""
    if ";" in label or TOKEN_RE.search(label) or label != label.strip():
        raise ValueError(f"label {label!r} would not parse back: no ';', no <loc>/<seg> tokens, "
                         "no leading or trailing spaces")


def check_image_size(image_size: tuple[int, int]) -> None:
    """Raise ValueError unless `image_size` is (width, height), both > 0."""
    if len(image_size) != 2 or any(s <= 0 for s in image_size):
        raise ValueError(f"image_size must be (width, height) > 0, got {image_size}")


def filter_detections(detections: Sequence[Detection], min_score: float | None = None,
                      nms_iou: float | None = None) -> list[Detection]:
    """The scored `detections` with score >= `min_score`, then per-label non-maximum suppression:
    within one label, a box overlapping a higher-scored kept box with IoU > `nms_iou` is dropped.
    Either step is skipped when its setting is None; the answer's order is kept."""
    if min_score is None and nms_iou is None:
        return list(detections)
    if any(d.score is None for d in detections):
        raise ValueError("filtering detections needs their scores: parse the answer with its token_spans")
    kept = [d for d in detections if min_score is None or d.score >= min_score]
    if nms_iou is None:
        return kept
    survivors: list[Detection] = []
    for detection in sorted(kept, key=lambda d: -d.score):
        if all(other.label != detection.label or box_iou(other.box, detection.box) <= nms_iou for other in survivors):
            survivors.append(detection)
    return [d for d in kept if any(d is s for s in survivors)]
