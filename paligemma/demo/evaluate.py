"""Score a model on fresh, held-out shapes-world scenes, one number per task.

- detection recall: of all objects, the fraction found by `detect {shape}` with a box of the
  right label at IoU >= 0.5 (each predicted box matches at most one object); precision alongside,
  and how often `detect` of an absent shape correctly answers nothing.
- detection AP: COCO's box mAP@[.5:.95], AP50 and AP75 over the same `detect {shape}` answers
  (`paligemma.metrics.detection_map`, pycocotools' COCOeval; each prompt is one COCO image whose
  ground truth is the asked shape's objects). Each box is ranked by its score, the probability the
  model wrote it with (`GenerationResult.token_spans()`, as `paligemma eval` scores). None when
  pycocotools is not installed (`pip install 'paligemma[eval]'`).
- counting: `answer en how many {shape}s are there?` for every shape, exact match.
- colour: `answer en what color is the {shape}?` for every shape present exactly once, exact match.
- captions: `caption en`, exact match of the whole sentence, and CIDEr-D over all scenes (one
  reference per scene: its canonical caption; `paligemma.metrics.cider`, COCO's tokenization).
- segmentation (only with a mask codec, e.g. the checkpoint's `mask_codec.safetensors`): `segment
  {shape}` for every shape present in the scene; each answer is decoded with the codec into
  full-resolution masks (`parse_segmentations`), the masks labelled with that shape are matched
  one-to-one to the true objects of that shape greedily by mask IoU (highest pair first), and the
  score is the mean IoU over all true objects, an unmatched object counting 0. Extra predicted masks
  lower nothing but are counted among `segment_predictions`; malformed objects are counted like
  detect's.
- multi-class (`evaluate_multiclass`, `paligemma demo-eval` runs it; `evaluate_demo(multiclass=True)`):
  on every scene one `detect A ; B` and one `detect A ; B ; C` prompt, and with a codec one
  `segment A ; B`, labels in an order drawn from the scene's seed, absent shapes included. Boxes are
  matched per asked shape like single-class detection (a box labelled with a shape the prompt did
  not name matches nothing); recall is over the objects of the asked shapes, precision over every
  predicted box; prompts naming only absent shapes should get an empty answer.

The matching and the averages are `paligemma.metrics`' (`detection_matches`, `detection_map`,
`mask_miou`, `greedy_match`), the functions `paligemma eval` scores with; the numbers are the ones this module
computed with its own matchers before (same definitions), except that a multi-class segmentation
score over no true object at all is now NaN (undefined) instead of 0.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import numpy as np

from ..generation import generate_detailed
from ..metrics import cider, detection_map, detection_matches, greedy_match, mask_iou, mask_miou
from ..segmentation import parse_segmentations
from ..tasks import parse_detections
from .recipe import EVAL_SEED0, SCENE_SIZE
from .scenes import (
    CAPTION_PROMPT,
    SHAPES,
    caption,
    color_answer,
    color_prompt,
    count,
    count_answer,
    count_prompt,
    detect_prompt,
    generate_scene,
    matching_objects,
    segment_prompt,
    unique_shapes,
)

IOU_THRESHOLD = 0.5
# Answer lengths in tokens: a detect answer is at most 4 objects x (4 locs + label + " ;"), a segment
# answer 4 x (4 locs + 16 segs + label + " ;").
_MAX_NEW_TOKENS = {"detect": 32, "caption": 24, "count": 4, "color": 4, "segment": 96}
_MULTICLASS_STREAM = 2  # random stream (with the scene's seed) that orders a multi-class prompt's labels


@dataclass
class MulticlassScores:
    """Scores of multi-class prompts (`evaluate_multiclass`); the segment fields need a mask codec."""

    detect_prompts: int
    detection_recall: float
    detection_precision: float
    absent_classes_empty: float  # prompts naming only absent shapes answered with nothing
    unasked_labels: int  # predicted objects labelled with a shape the prompt did not name
    malformed_detect_answers: int
    segmentation_miou: float | None = None
    malformed_segment_answers: int | None = None

    def rows(self) -> list[tuple[str, str]]:
        rows = [("multi-class detection recall (IoU >= 0.5)", f"{self.detection_recall:.1%}"),
                ("multi-class detection precision", f"{self.detection_precision:.1%}"),
                ("multi-class, only absent shapes -> empty answer", f"{self.absent_classes_empty:.1%}")]
        if self.segmentation_miou is not None:
            rows.append(("multi-class segmentation mean mask IoU", f"{self.segmentation_miou:.1%}"))
        rows += [("multi-class objects with a label not asked for", str(self.unasked_labels)),
                 ("malformed multi-class detect answers", str(self.malformed_detect_answers))]
        if self.malformed_segment_answers is not None:
            rows.append(("malformed multi-class segment answers", str(self.malformed_segment_answers)))
        return rows


@dataclass
class DemoScores:
    scenes: int
    detection_recall: float
    detection_precision: float
    absent_shape_empty: float  # detect of a shape not in the scene answered with nothing
    counting_accuracy: float
    color_accuracy: float
    caption_exact_match: float
    caption_cider: float  # CIDEr-D, one reference per scene (not a fraction: a perfect caption scores ~10)
    malformed_detect_answers: int
    # Only when evaluated with a mask codec (None otherwise, and left out of as_dict).
    segmentation_miou: float | None = None
    segment_predictions: int | None = None  # masks labelled with the asked shape, matched or not
    malformed_segment_answers: int | None = None
    multiclass: MulticlassScores | None = None  # only when asked for (demo-eval does)
    # COCO box AP of the single-class detect answers (metrics.detection_map); None without pycocotools.
    detection_map: float | None = None  # mAP@[.5:.95]
    detection_map50: float | None = None
    detection_map75: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (v is None and k in _SEGMENT_FIELDS)}

    def table(self) -> str:
        if self.detection_map is None:
            ap = [("detection AP", "needs pycocotools: pip install 'paligemma[eval]'")]
        else:
            ap = [("detection AP (COCO mAP@[.5:.95])", f"{self.detection_map:.3f}"),
                  ("detection AP50 / AP75", f"{self.detection_map50:.3f} / {self.detection_map75:.3f}")]
        rows = [("detection recall (IoU >= 0.5)", f"{self.detection_recall:.1%}"),
                ("detection precision", f"{self.detection_precision:.1%}"), *ap,
                ("absent shape -> empty answer", f"{self.absent_shape_empty:.1%}"),
                ("counting accuracy", f"{self.counting_accuracy:.1%}"),
                ("colour accuracy", f"{self.color_accuracy:.1%}"),
                ("caption exact match", f"{self.caption_exact_match:.1%}"),
                ("caption CIDEr-D", f"{self.caption_cider:.3f}")]
        lines = [f"| metric ({self.scenes} held-out scenes) | score |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        if self.segmentation_miou is not None:
            lines.append(f"| segmentation mean mask IoU | {self.segmentation_miou:.1%} |")
        lines.append(f"| malformed detect answers | {self.malformed_detect_answers} |")
        if self.malformed_segment_answers is not None:
            lines.append(f"| malformed segment answers | {self.malformed_segment_answers} |")
        if self.multiclass is not None:
            lines += [f"| {name} | {value} |" for name, value in self.multiclass.rows()]
        return "\n".join(lines)


_SEGMENT_FIELDS = ("segmentation_miou", "segment_predictions", "malformed_segment_answers", "multiclass")


def evaluate_demo(model, processor, num_scenes: int = 500, seed0: int = EVAL_SEED0, batch_size: int = 64,
                  progress=None, codec=None, multiclass: bool = False) -> DemoScores:
    """Generate greedy answers for every task on `num_scenes` scenes (seeds seed0...) and score them;
    with a mask codec (`paligemma.vqvae.MaskCodec`) segmentation too; with `multiclass` the
    multi-class prompts (`evaluate_multiclass`) too."""
    scenes = [generate_scene(seed0 + i, SCENE_SIZE) for i in range(num_scenes)]
    # (task, scene index, shape or None, prompt, expected answer)
    items = []
    for index, scene in enumerate(scenes):
        items.append(("caption", index, None, CAPTION_PROMPT, caption(scene)))
        for shape in SHAPES:
            items.append(("detect", index, shape, detect_prompt(shape), None))
            items.append(("count", index, shape, count_prompt(shape), count_answer(scene, shape)))
        items += [("color", index, s, color_prompt(s), color_answer(scene, s)) for s in unique_shapes(scene)]
        if codec is not None:
            items += [("segment", index, s, segment_prompt(s), None) for s in SHAPES if count(scene, s)]

    answers: dict[int, str] = {}
    spans: dict[int, list | None] = {}  # detect answers' token spans: each box's score, for AP
    for task, max_new_tokens in _MAX_NEW_TOKENS.items():
        positions = [i for i, item in enumerate(items) if item[0] == task]
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            results = generate_detailed(model, processor, [scenes[items[i][1]].image for i in chunk],
                                        [items[i][3] for i in chunk], max_new_tokens=max_new_tokens)
            answers.update((i, result.text) for i, result in zip(chunk, results))
            if task == "detect":
                spans.update((i, result.token_spans()) for i, result in zip(chunk, results))
            if progress is not None:
                progress(len(answers), len(items))

    exact = {"caption": [], "count": [], "color": []}
    captions = []  # (answer, reference)
    detected, true_boxes, malformed, absent_empty = [], [], 0, []
    segmented, true_masks, segment_predictions, segment_malformed = [], [], 0, 0
    for i, (task, index, shape, _, expected) in enumerate(items):
        asked = [o for o in scenes[index].objects if o.shape == shape]
        if task == "segment":
            result = parse_segmentations(answers[i], (SCENE_SIZE, SCENE_SIZE), codec)
            segment_malformed += bool(result.errors)
            segment_predictions += sum(o.label == shape for o in result.objects)
            segmented.append(result.objects)  # matched within their label: other labels count nothing
            true_masks.append([(o.shape, o.mask) for o in asked])
            continue
        if task != "detect":
            exact[task].append(answers[i].strip() == expected)
            captions += [(answers[i], expected)] if task == "caption" else []
            continue
        result = parse_detections(answers[i], (SCENE_SIZE, SCENE_SIZE), spans[i])
        malformed += bool(result.errors)
        if not asked:
            absent_empty.append(not result.objects and not result.errors)
        detected.append(result.objects)
        true_boxes.append([(o.shape, o.box) for o in asked])
    boxes = detection_matches(detected, true_boxes, IOU_THRESHOLD)
    ap = _detection_ap(detected, true_boxes)

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    return DemoScores(
        scenes=num_scenes, detection_recall=boxes.matched / max(boxes.ground_truth, 1),
        detection_precision=boxes.matched / max(boxes.predicted, 1), absent_shape_empty=mean(absent_empty),
        counting_accuracy=mean(exact["count"]), color_accuracy=mean(exact["color"]),
        caption_exact_match=mean(exact["caption"]),
        caption_cider=cider([a for a, _ in captions], [[r] for _, r in captions]), malformed_detect_answers=malformed,
        detection_map=ap.get("map"), detection_map50=ap.get("map50"), detection_map75=ap.get("map75"),
        **({} if codec is None else dict(segmentation_miou=mask_miou(segmented, true_masks),
                                         segment_predictions=segment_predictions,
                                         malformed_segment_answers=segment_malformed)),
        multiclass=evaluate_multiclass(model, processor, scenes, seed0, batch_size, codec) if multiclass else None,
    )


def _detection_ap(detected: list, true_boxes: list) -> dict[str, float]:
    """`metrics.detection_map`'s {"map", "map50", "map75"}, or {} without pycocotools (an optional
    package: the other scores do not need it)."""
    return detection_map(detected, true_boxes) if importlib.util.find_spec("pycocotools") else {}


def multiclass_labels(seed: int) -> tuple[list[str], list[str], list[str]]:
    """The label lists of scene `seed`'s multi-class prompts: a detect pair, a detect triple and a
    segment pair, each in an order drawn from the seed (so absent shapes are asked about too)."""
    rng = np.random.default_rng([_MULTICLASS_STREAM, seed])
    pair, triple, segment_pair = ([str(s) for s in rng.permutation(SHAPES)] for _ in range(3))
    return pair[:2], triple, segment_pair[:2]


def evaluate_multiclass(model, processor, scenes: list, seed0: int, batch_size: int = 64,
                        codec=None) -> MulticlassScores:
    """Score `detect A ; B`, `detect A ; B ; C` and (with a codec) `segment A ; B` on `scenes` (seeds
    seed0...); see the module docstring."""
    detect_items, segment_items = [], []  # (scene index, asked shapes)
    for index in range(len(scenes)):
        pair, triple, segment_pair = multiclass_labels(seed0 + index)
        detect_items += [(index, pair), (index, triple)]
        segment_items += [(index, segment_pair)] if codec is not None else []

    def answer(items, prompt, max_new_tokens):
        answers = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            results = generate_detailed(model, processor, [scenes[index].image for index, _ in chunk],
                                        [prompt(labels) for _, labels in chunk], max_new_tokens=max_new_tokens)
            answers += [result.text for result in results]
        return answers

    # A scene has at most 4 objects whatever the prompt asks, so single-class answer lengths suffice.
    unasked = malformed = 0
    absent_empty, detected, true_boxes = [], [], []
    for (index, labels), text in zip(detect_items, answer(detect_items, detect_prompt, _MAX_NEW_TOKENS["detect"])):
        result = parse_detections(text, (SCENE_SIZE, SCENE_SIZE))
        malformed += bool(result.errors)
        unasked += sum(d.label not in labels for d in result.objects)
        truth = matching_objects(scenes[index], labels)
        if not truth:
            absent_empty.append(not result.objects and not result.errors)
        detected.append(result.objects)  # a box labelled with an unasked shape matches no true object
        true_boxes.append([(o.shape, o.box) for o in truth])
    boxes = detection_matches(detected, true_boxes, IOU_THRESHOLD)
    segmented, true_masks, segment_malformed = [], [], 0
    segment_answers = answer(segment_items, segment_prompt, _MAX_NEW_TOKENS["segment"]) if segment_items else []
    for (index, labels), text in zip(segment_items, segment_answers):
        result = parse_segmentations(text, (SCENE_SIZE, SCENE_SIZE), codec)
        segment_malformed += bool(result.errors)
        segmented.append(result.objects)
        true_masks.append([(o.shape, o.mask) for o in matching_objects(scenes[index], labels)])
    return MulticlassScores(
        detect_prompts=len(detect_items), detection_recall=boxes.matched / max(boxes.ground_truth, 1),
        detection_precision=boxes.matched / max(boxes.predicted, 1),
        absent_classes_empty=sum(absent_empty) / len(absent_empty) if absent_empty else float("nan"),
        unasked_labels=unasked, malformed_detect_answers=malformed,
        **({} if codec is None else dict(segmentation_miou=mask_miou(segmented, true_masks),
                                         malformed_segment_answers=segment_malformed)))


def match_masks(truth: list, predicted: list) -> list[float]:
    """Each true mask's IoU with the predicted mask matched to it (`greedy_match` by mask IoU), 0.0 when none is."""
    return greedy_match(truth, predicted, mask_iou)
