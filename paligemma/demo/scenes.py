"""The "shapes world": procedural images and exact answers for PaliGemma's task prompts.

A small demo PaliGemma is trained on this world, so everything here is deterministic from a seed
and every answer is computed from the scene, never guessed.

The world
---------
- A square RGB image (224x224 by default) with a light, slightly tinted grey background
  (level 200..235 per scene, per-channel tint within +-6) and gaussian pixel noise (std 4) over
  the whole image.
- 1 to 4 objects (uniformly). Each is a `circle`, `square` or `triangle` (upward-pointing,
  isosceles), filled flat with one of six well-separated colours: red, green, blue, yellow,
  purple, orange (each object jittered by at most +-12 per channel). Shapes and colours are drawn
  independently and may repeat, so "how many circles" has answers 0 to 4.
- Each object lives in a square cell whose side is 14%..36% of the image side. Cells are
  rejection-sampled so that they keep a gap of a few pixels from each other and from the border:
  objects never touch or overlap (box IoU is 0), so every object is fully visible and its mask is
  exactly its drawn pixels. If an object finds no room after 100 tries it is dropped, so a scene
  never has fewer than 1 object and very rarely fewer than it asked for.

Coordinates
-----------
`SceneObject.box` is `(x0, y0, x1, y1)` in pixels, the tight box of the mask with `x1`, `y1`
EXCLUSIVE: `mask[y0:y1, x0:x1]` holds every pixel of the object, and a box touching the right
border has `x1 == size`. `SceneObject.mask` is a bool array (H, W), True on the object's pixels.

Canonical order
---------------
`Scene.objects` is sorted left to right by box centre x, ties broken by box centre y (top first).
Captions and detect answers list objects in this order.

Prompts and answers (prefix -> suffix)
--------------------------------------
- ``caption en`` -> the objects in canonical order, each as "a {color} {shape}" ("an orange ..."
  for orange), joined as "A", "A and B", "A, B and C", "A, B, C and D" (no Oxford comma), e.g.
  "a red circle, an orange triangle and a blue square".
- ``detect {shape}`` -> for each object of that shape, in canonical order, four location tokens
  and the label: "<locYMIN><locXMIN><locYMAX><locXMAX> {shape}", objects joined by " ; ", e.g.
  "<loc0102><loc0040><loc0300><loc0251> circle ; <loc0511><loc0600><loc0730><loc0822> circle".
  Each value is `round(coord / size * 1023)` (Python's round, half to even, like big_vision's
  `tf.round`), written with 4 digits. A shape that is ABSENT gives the empty string "": the model
  must emit `<eos>` as its very first answer token, as the released PaliGemma does when it finds
  nothing.
- ``answer en how many {shape}s are there?`` -> the count as one digit, "0".."4".
- ``answer en what color is the {shape}?`` -> the colour name, e.g. "purple". Only asked when
  exactly ONE object of that shape is in the scene (otherwise the question has no single answer).
- ``segment {shape}`` -> for each object of that shape, in canonical order, the four location
  tokens of its box (exactly as in detect), 16 segmentation tokens and the label:
  "<locYMIN><locXMIN><locYMAX><locXMAX><seg017><seg003>...(16 in all) {shape}", objects joined by
  " ; "; "" for an absent shape. The 16 tokens are the codes (0..127, written with 3 digits) that a
  mask codec (`paligemma.vqvae.MaskCodec`, big_vision's VQ-VAE) encodes the object's mask to: the
  mask cropped to its box and resized to 64x64 (`segmentation.mask_to_64`), a 4x4 grid of codes in
  row-major order. Reading an answer back decodes the codes to a 64x64 mask and resizes it into the
  box (`segmentation.parse_segmentations`). The answer therefore depends on the codec: the demo's is
  `paligemma/demo_model/mask_codec.safetensors`, trained on these masks by
  `python -m paligemma.demo.train_mask_codec`. Segment examples exist only where a codec is passed.
- ``detect A ; B`` / ``detect A ; B ; C`` and ``segment A ; B`` (multi-class, PaliGemma's
  ``detect {thing} ; {thing} ; ...``) -> every object of ANY asked shape, each with its own label,
  in canonical order: e.g. "detect triangle ; circle" on "a purple circle, a red triangle and a green
  circle" answers "<loc..>x4 circle ; <loc..>x4 triangle ; <loc..>x4 circle". The answer depends
  on the scene only, never on the order of the prompt's labels, and an asked shape that is absent
  adds nothing ("" when none is present). The order is our choice: big_vision's released code has
  no detection data pipeline, and the PaliGemma paper only says its multi-object detection is
  "similar to Pix2Seq" (which trains on randomly ordered objects). Canonical order keeps one target
  per prompt, the same order as single-class answers and captions, so a multi-class answer is the
  single-class answers' objects merged.

Training mix (`sample_example`)
-------------------------------
Without a codec (`TASK_MIX`): caption 25%, detect 40%, count 20%, colour 15%. With a codec the
default is `SEGMENT_TASK_MIX`: caption 20%, detect 30%, count 15%, colour 10%, segment 25%. A detect
or segment example asks for an absent shape with probability 20% (when some shape is absent), else
for a present one. A colour example falls back to a count question when no shape occurs exactly
once. `MULTICLASS_TASK_MIX` (needs a codec; `python -m paligemma.demo.train --multiclass`): caption
18%, detect 20%, count 10%, colour 7%, segment 18%, multi-class detect 15% (2 or 3 labels) and
multi-class segment 12% (2 labels); the labels are distinct shapes in random order, so absent shapes
are asked about as often as chance gives. The older mixes draw exactly the examples they drew before
(tests/test_scenes.py pins them). `sample_example(..., side_by_side=share)` (`--side-by-side`) gives
that share of the multi-class examples a scene where two different shapes sit one above the other
(`side_by_side_shapes`), the scenes whose labels a model trained on the plain mix gets wrong most.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..metrics import box_iou as iou  # noqa: F401 - the scenes' IoUs are the metrics' (imported from here too)
from ..metrics import mask_iou  # noqa: F401
from ..tasks import format_detections

if TYPE_CHECKING:
    from ..vqvae import MaskCodec

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Pure-ish, saturated colours: far from each other and from the light grey background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 130, 20),
}

MAX_OBJECTS = 4
MIN_SIDE_FRAC = 0.14  # smallest object cell, as a fraction of the image side
MAX_SIDE_FRAC = 0.36
PLACEMENT_TRIES = 100
COLOR_JITTER = 12  # max per-channel offset of an object's fill colour
BACKGROUND_LEVEL = (200.0, 235.0)
BACKGROUND_TINT = 6.0
NOISE_STD = 4.0

CAPTION_PROMPT = "caption en"
TASKS = ("caption", "detect", "count", "color")
TASK_MIX = {"caption": 0.25, "detect": 0.40, "count": 0.20, "color": 0.15}
DETECT_ABSENT_PROB = 0.20
# The mix once the model learns segmentation; sampling it needs a mask codec.
SEGMENT_TASK_MIX = {"caption": 0.20, "detect": 0.30, "count": 0.15, "color": 0.10, "segment": 0.25}
SEGMENT_ABSENT_PROB = 0.20
# Multi-class prompts ("detect triangle ; circle") on top of the segment mix; also needs a codec.
MULTICLASS_TASK_MIX = {"caption": 0.18, "detect": 0.20, "count": 0.10, "color": 0.07, "segment": 0.18,
                       "detect_multi": 0.15, "segment_multi": 0.12}
MULTICLASS_LABELS = {"detect_multi": (2, 3), "segment_multi": (2,)}  # how many labels a prompt may name
ALL_TASKS = TASKS + ("segment", "detect_multi", "segment_multi")

# Streams of randomness derived from one seed: the scene and the choice of task are independent.
_SCENE_STREAM = 0
_TASK_STREAM = 1
_SIDE_BY_SIDE_STREAM = 3  # whether a multi-class example swaps its scene (`sample_example(side_by_side=...)`)

# Multi-class examples may be given scenes with different shapes one above the other (`side_by_side_shapes`).
SIDE_BY_SIDE_FRAC = 20 / 224  # box centres closer than this (of the image width) in x
SIDE_BY_SIDE_SEED0 = 2 * 10**9  # the swapped-in scenes' seeds: far from training (0...) and evaluation (10**9...)
SIDE_BY_SIDE_TRIES = 8


@dataclass
class SceneObject:
    """One drawn object. `box` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive; `mask` is (H, W) bool."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    """An image and its objects, in canonical order (left to right by box centre, then top first)."""

    image: Image.Image
    objects: list[SceneObject]

    @property
    def size(self) -> int:
        return self.image.width


# --------------------------------------------------------------------------------------------
# Drawing


def _draw_mask(shape: str, cell: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Rasterise `shape` filling the square `cell` (x1/y1 exclusive) into a (size, size) bool mask."""
    x0, y0, x1, y1 = cell
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    # PIL's corner coordinates are inclusive, hence the -1. PIL does not antialias these, so the
    # mask is exactly the set of pixels that get the object's colour.
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas, dtype=bool)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1) of a non-empty mask, x1/y1 exclusive."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _cells_apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    """True when the two boxes are separated by at least `gap` pixels along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def generate_scene(seed: int, size: int = 224) -> Scene:
    """Draw the scene for `seed` (a non-negative int): same seed and size, same pixels, always."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng([_SCENE_STREAM, seed])
    min_side = math.ceil(MIN_SIDE_FRAC * size)
    max_side = math.floor(MAX_SIDE_FRAC * size)
    gap = max(2, size // 56)  # 4 px at 224: between objects and from the image border

    n_wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    placed: list[tuple[str, str, tuple[int, int, int, int]]] = []
    for _ in range(n_wanted):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        for _try in range(PLACEMENT_TRIES):
            side = int(rng.integers(min_side, max_side + 1))
            x0 = int(rng.integers(gap, size - gap - side + 1))
            y0 = int(rng.integers(gap, size - gap - side + 1))
            cell = (x0, y0, x0 + side, y0 + side)
            if all(_cells_apart(cell, other, gap) for _, _, other in placed):
                placed.append((shape, color, cell))
                break
        # No room after all tries: the object is dropped (the first one always fits).

    background = rng.uniform(*BACKGROUND_LEVEL) + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, 3)
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = background
    objects = []
    for shape, color, cell in placed:
        mask = _draw_mask(shape, cell, size)
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        pixels[mask] = np.asarray(COLORS[color]) + jitter
        objects.append(SceneObject(shape, color, _mask_box(mask), mask))
    pixels += NOISE_STD * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")

    objects.sort(key=lambda o: (o.center[0], o.center[1]))
    return Scene(image=image, objects=objects)


# --------------------------------------------------------------------------------------------
# Prompts and answers


def _label_list(shapes: str | Sequence[str]) -> list[str]:
    """One shape or several, as a list; every name must be one of SHAPES."""
    labels = [shapes] if isinstance(shapes, str) else list(shapes)
    unknown = [s for s in labels if s not in SHAPES]
    if unknown or not labels:
        raise ValueError(f"shapes are among {SHAPES}, got {labels}")
    return labels


def detect_prompt(shapes: str | Sequence[str]) -> str:
    """"detect circle", or for several shapes big_vision's multi-class form "detect triangle ; circle"."""
    return "detect " + " ; ".join(_label_list(shapes))


def count_prompt(shape: str) -> str:
    return f"answer en how many {PLURALS[shape]} are there?"


def color_prompt(shape: str) -> str:
    return f"answer en what color is the {shape}?"


def noun_phrase(color: str, shape: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


def _join_phrases(phrases: list[str]) -> str:
    """"A", "A and B", "A, B and C", ... (no Oxford comma)."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """Answer to "caption en": every object, in canonical order."""
    return _join_phrases([noun_phrase(o.color, o.shape) for o in scene.objects])


def matching_objects(scene: Scene, shapes: str | Sequence[str]) -> list[SceneObject]:
    """The objects of any of `shapes`, in canonical order: the order of every detect / segment answer,
    whatever the order of the labels in the prompt."""
    labels = set(_label_list(shapes))
    return [o for o in scene.objects if o.shape in labels]


def detect_answer(scene: Scene, shapes: str | Sequence[str]) -> str:
    """Answer to "detect {shape}" (or "detect A ; B"): "<loc..>x4 {shape}" per matching object, in
    canonical order, joined by " ; "; "" when no asked shape is present."""
    matches = [(o.shape, o.box) for o in matching_objects(scene, shapes)]
    return format_detections(matches, (scene.size, scene.size))


def segment_prompt(shapes: str | Sequence[str]) -> str:
    return "segment " + " ; ".join(_label_list(shapes))


def segment_answer(scene: Scene, shapes: str | Sequence[str], codec: MaskCodec) -> str:
    """Answer to "segment {shape}" (or "segment A ; B"): "<loc..>x4<seg...>x16 {shape}" per matching
    object, in canonical order, joined by " ; "; "" when no asked shape is present. The codes are
    `codec`'s encoding of each object's mask inside its box."""
    from ..segmentation import format_segmentations

    matches = [(o.shape, o.box, o.mask) for o in matching_objects(scene, shapes)]
    return format_segmentations(matches, (scene.size, scene.size), codec)


def count(scene: Scene, shape: str) -> int:
    return sum(o.shape == shape for o in scene.objects)


def count_answer(scene: Scene, shape: str) -> str:
    """Answer to "answer en how many {shape}s are there?": one digit."""
    return str(count(scene, shape))


def color_answer(scene: Scene, shape: str) -> str:
    """Answer to "answer en what color is the {shape}?"; the shape must occur exactly once."""
    matches = [o for o in scene.objects if o.shape == shape]
    if len(matches) != 1:
        raise ValueError(f"the colour question needs exactly one {shape}, the scene has {len(matches)}")
    return matches[0].color


def unique_shapes(scene: Scene) -> list[str]:
    """Shapes that occur exactly once: the ones a colour question may be asked about."""
    return [s for s in SHAPES if count(scene, s) == 1]


def multiclass_label_lists(task: str) -> list[tuple[str, ...]]:
    """Every label list a multi-class prompt of `task` ("detect_multi" or "segment_multi") may name:
    each ordered choice of MULTICLASS_LABELS[task] distinct shapes."""
    return [labels for k in MULTICLASS_LABELS[task] for labels in itertools.permutations(SHAPES, k)]


def scene_examples(scene: Scene, codec: MaskCodec | None = None, multiclass: bool = False) -> list[tuple[str, str]]:
    """Every (prefix, suffix) pair for a scene: caption, detect and count for each shape (absent
    shapes included), and colour for each shape that occurs exactly once; with a codec, segment for
    each shape too; with `multiclass`, every multi-class detect (and with a codec segment) prompt."""
    examples = [(CAPTION_PROMPT, caption(scene))]
    examples += [(detect_prompt(s), detect_answer(scene, s)) for s in SHAPES]
    examples += [(count_prompt(s), count_answer(scene, s)) for s in SHAPES]
    examples += [(color_prompt(s), color_answer(scene, s)) for s in unique_shapes(scene)]
    if codec is not None:
        examples += [(segment_prompt(s), segment_answer(scene, s, codec)) for s in SHAPES]
    if multiclass:
        examples += [(detect_prompt(labels), detect_answer(scene, labels))
                     for labels in multiclass_label_lists("detect_multi")]
    if multiclass and codec is not None:
        examples += [(segment_prompt(labels), segment_answer(scene, labels, codec))
                     for labels in multiclass_label_lists("segment_multi")]
    return examples


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _task_mix(codec: MaskCodec | None, mix: Mapping[str, float] | None) -> Mapping[str, float]:
    """The mix to sample: `mix`, else SEGMENT_TASK_MIX with a codec and TASK_MIX without."""
    if mix is None:
        return TASK_MIX if codec is None else SEGMENT_TASK_MIX
    unknown = set(mix) - set(ALL_TASKS)
    if unknown or not mix:
        raise ValueError(f"a task mix names tasks among {ALL_TASKS}, got {dict(mix)}")
    if (mix.get("segment") or mix.get("segment_multi")) and codec is None:
        raise ValueError("segment examples need a mask codec (codec=...)")
    return mix


def _choose_task(r: float, mix: Mapping[str, float]) -> str:
    """The task a uniform draw `r` in [0, 1) falls on: the mix's tasks take consecutive shares of [0, 1)."""
    cumulative = 0.0
    for name, share in mix.items():
        cumulative += share
        if r < cumulative:
            return name
    return list(mix)[-1]


def side_by_side_flags(objects: Sequence[SceneObject], size: int) -> list[bool]:
    """For each object, whether one of another shape has its box centre less than SIDE_BY_SIDE_FRAC of the
    image (`size` px wide) away in x (one above the other, roughly): in a multi-class answer their order
    hangs on a few pixels, and the model must read each box's label off the image, not off its place in
    the list."""
    limit = SIDE_BY_SIDE_FRAC * size
    return [any(other.shape != o.shape and abs(other.center[0] - o.center[0]) < limit for other in objects)
            for o in objects]


def side_by_side_shapes(scene: Scene) -> bool:
    """Whether the scene has two objects of different shapes side by side (`side_by_side_flags`)."""
    return any(side_by_side_flags(scene.objects, scene.size))


def sample_task(scene: Scene, rng: np.random.Generator, codec: MaskCodec | None = None,
                mix: Mapping[str, float] | None = None) -> tuple[str, str, str]:
    """Draw one (task, prefix, suffix) for `scene` following `mix` (default: TASK_MIX, or
    SEGMENT_TASK_MIX when a mask codec is given; see the module docstring). Tasks are tried in the
    mix's order against one uniform draw, and a task draws more numbers only once chosen, so the
    default mixes reproduce the original sampler exactly."""
    task = _choose_task(rng.random(), _task_mix(codec, mix))
    present = [s for s in SHAPES if count(scene, s) > 0]
    if task == "color" and not unique_shapes(scene):
        task = "count"
    if task == "caption":
        return task, CAPTION_PROMPT, caption(scene)
    if task == "detect":
        absent = [s for s in SHAPES if s not in present]
        pool = absent if absent and rng.random() < DETECT_ABSENT_PROB else present
        shape = _pick(rng, pool)
        return task, detect_prompt(shape), detect_answer(scene, shape)
    if task == "count":
        shape = _pick(rng, list(SHAPES))
        return task, count_prompt(shape), count_answer(scene, shape)
    if task == "segment":
        absent = [s for s in SHAPES if s not in present]
        pool = absent if absent and rng.random() < SEGMENT_ABSENT_PROB else present
        shape = _pick(rng, pool)
        return task, segment_prompt(shape), segment_answer(scene, shape, codec)
    if task in MULTICLASS_LABELS:
        sizes = MULTICLASS_LABELS[task]
        labels = [str(s) for s in rng.permutation(SHAPES)[:sizes[int(rng.integers(len(sizes)))]]]
        if task == "detect_multi":
            return task, detect_prompt(labels), detect_answer(scene, labels)
        return task, segment_prompt(labels), segment_answer(scene, labels, codec)
    shape = _pick(rng, unique_shapes(scene))
    return task, color_prompt(shape), color_answer(scene, shape)


def sample_example(seed: int, size: int = 224, codec: MaskCodec | None = None,
                   mix: Mapping[str, float] | None = None, side_by_side: float = 0.0) -> tuple[Image.Image, str, str]:
    """One training example for `seed`: the image of `generate_scene(seed, size)` and a
    (prefix, suffix) drawn from the task mix with a random stream independent of the scene's.
    Without `codec` and `mix` this is the original demo data, unchanged; with a codec the mix
    defaults to SEGMENT_TASK_MIX.

    `side_by_side` (0..1) is the share of multi-class examples whose scene is swapped for one with
    `side_by_side_shapes` (the first of scenes SIDE_BY_SIDE_SEED0 + SIDE_BY_SIDE_TRIES * seed + k,
    k < SIDE_BY_SIDE_TRIES, that has them; the scene is kept when none has): about 24% of scenes have
    such a pair, the ones whose boxes the stage 7 model labelled worst. 0 changes nothing."""
    task_mix = _task_mix(codec, mix)
    scene = generate_scene(seed, size)
    if side_by_side and _swaps_scene(seed, task_mix, side_by_side):
        candidates = (generate_scene(SIDE_BY_SIDE_SEED0 + SIDE_BY_SIDE_TRIES * seed + k, size)
                      for k in range(SIDE_BY_SIDE_TRIES))
        scene = next((candidate for candidate in candidates if side_by_side_shapes(candidate)), scene)
    _, prefix, suffix = sample_task(scene, np.random.default_rng([_TASK_STREAM, seed]), codec, task_mix)
    return scene.image, prefix, suffix


def _swaps_scene(seed: int, mix: Mapping[str, float], side_by_side: float) -> bool:
    """Whether example `seed` is a multi-class one (the task its task stream draws first, as sample_task
    will) that the side-by-side stream picks for a swapped scene, with probability `side_by_side`."""
    task = _choose_task(np.random.default_rng([_TASK_STREAM, seed]).random(), mix)
    return task in MULTICLASS_LABELS and np.random.default_rng([_SIDE_BY_SIDE_STREAM, seed]).random() < side_by_side


# --------------------------------------------------------------------------------------------
# Tokenizer corpus, evaluation helper, dataset writer


def corpus_lines() -> Iterator[str]:
    """Every string the demo tokenizer must cover: prompts, answers and their words.

    Location tokens (<loc0000>..<loc1023>) are NOT included: the tokenizer adds them as special
    pieces of their own. Captions with 3-4 objects are represented by a deterministic selection;
    all one- and two-object captions are listed.
    """
    yield CAPTION_PROMPT
    for shape in SHAPES:
        yield detect_prompt(shape)
        yield count_prompt(shape)
        yield color_prompt(shape)
        yield shape
        yield PLURALS[shape]
        yield f"{shape} ; {shape}"
    yield " ; ".join(SHAPES)
    yield from (str(n) for n in range(MAX_OBJECTS + 1))
    yield from COLORS
    phrases = [noun_phrase(c, s) for c in COLORS for s in SHAPES]
    yield from phrases
    for a in phrases:
        for b in phrases:
            yield _join_phrases([a, b])
    n = len(phrases)
    for i, a in enumerate(phrases):
        yield _join_phrases([a, phrases[(i + 5) % n], phrases[(i + 11) % n]])
        yield _join_phrases([a, phrases[(i + 7) % n], phrases[(i + 13) % n], phrases[(i + 2) % n]])


def write_dataset_jsonl(
    out_dir: str | Path, n: int, seed0: int = 0, size: int = 224, name: str = "data.jsonl"
) -> Path:
    """Write `n` examples (seeds seed0 .. seed0+n-1) as fine-tuning data and return the JSONL path.

    Layout: `out_dir/images/{seed:08d}.png` and `out_dir/{name}`, one row per example:
    {"image": "images/00000042.png", "prefix": "...", "suffix": "..."} with the image path relative
    to `out_dir`. Deterministic: the same arguments write byte-identical files.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jsonl_path = out_dir / name
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for seed in range(seed0, seed0 + n):
            image, prefix, suffix = sample_example(seed, size)
            rel = f"images/{seed:08d}.png"
            image.save(out_dir / rel, format="PNG")
            f.write(json.dumps({"image": rel, "prefix": prefix, "suffix": suffix}) + "\n")
    return jsonl_path
