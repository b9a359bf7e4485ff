"""paligemma.metrics against the reference implementations, on the same inputs, and small cases by hand.

References: pycocoevalcap's Cider scorer (CIDEr, on pre-tokenized text), pycocotools' COCOeval (built
here from a result list through COCO.loadRes, the documented path, not the one metrics.py takes), the
official VQA evaluation's rules and the cases of its evaluation page (visualqa.org/evaluation.html),
and Stanford's PTB tokenizer (outputs recorded below). Both reference packages are in the [test] extra.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import sys

import numpy as np
import pytest

from paligemma.errors import UsageError
from paligemma.metrics import (
    anls,
    anls_score,
    box_accuracy,
    box_iou,
    cider,
    cider_scores,
    detection_map,
    detection_matches,
    greedy_match,
    levenshtein,
    mask_miou,
    ptb_tokenize,
    vqa_accuracy,
    vqa_normalize,
    vqa_score,
)
from paligemma.tasks import Detection

# ---------------------------------------------------------------------- PTB tokenization

# (caption, what COCO's evaluator makes of it): Stanford CoreNLP 3.4.1's PTBTokenizer run with
# `-preserveLines -lowerCase` (the jar pycocoevalcap ships), then pycocoevalcap's punctuation filter.
PTB_REFERENCE = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("A woman's purse sitting on a wooden bench.", "a woman 's purse sitting on a wooden bench"),
    ("The cat is sleeping on the couch, next to a remote control.",
     "the cat is sleeping on the couch next to a remote control"),
    ("There's a red double-decker bus driving down the street.",
     "there 's a red double-decker bus driving down the street"),
    ("Is this a \"stop\" sign?", "is this a stop sign"),
    ("A giraffe (standing) near some trees [at the zoo].",
     "a giraffe -lrb- standing -rrb- near some trees -lsb- at the zoo -rsb-"),
    ("A train at 3:45 pm on track #2.", "a train at 3:45 pm on track # 2"),
    ("A 1,000-piece puzzle on the table; it's half done.", "a 1,000-piece puzzle on the table it 's half done"),
    ("The kids' toys are on the floor.", "the kids toys are on the floor"),
    ("He can't believe it's not butter.", "he ca n't believe it 's not butter"),
    ("They won't go; we'd rather stay.", "they wo n't go we 'd rather stay"),
    ("A sign that says 'no parking' on a pole.", "a sign that says no parking on a pole"),
    ("A black and white photo of a man wearing a hat...", "a black and white photo of a man wearing a hat"),
    ("Cars parked along the side of a road - near a building.", "cars parked along the side of a road near a building"),
    ("A bowl of fruit: apples, oranges & bananas.", "a bowl of fruit apples oranges & bananas"),
    ("A person holding an umbrella in the rain?!", "a person holding an umbrella in the rain ?!"),
    ("An elephant walking through tall grass -- slowly.", "an elephant walking through tall grass slowly"),
    ("The U.S. flag flying over a building at 50% mast.", "the u.s. flag flying over a building at 50 % mast"),
    ("A cup of coffee costs $3.50 at this cafe.", "a cup of coffee costs $ 3.50 at this cafe"),
    ("A street sign reading \"Main St.\" and \"5th Ave.\"", "a street sign reading main st. and 5th ave."),
    ("I'm not sure what this is, but it's cool", "i 'm not sure what this is but it 's cool"),
    ("Men/women playing tennis on a clay court.", "men/women playing tennis on a clay court"),
    ("A bird perched on a branch {in winter}.", "a bird perched on a branch -lcb- in winter -rcb-"),
    ("Motorcycles lined up @ the parking lot.", "motorcycles lined up @ the parking lot"),
    ("A young girl eating a donut. She looks happy.", "a young girl eating a donut she looks happy"),
    ("The time is 10:30 a.m. on the clock.", "the time is 10:30 a.m. on the clock"),
    ("A man wearing a shirt that says \"I <3 NY\"", "a man wearing a shirt that says i < 3 ny"),
    ("A sign: \"Don't walk\" at the crosswalk.", "a sign do n't walk at the crosswalk"),
    ("It is what it is, isn't it?", "it is what it is is n't it"),
    ("Cannot tell what's in the box.", "can not tell what 's in the box"),
    ("A skateboarder doing a trick -- at the skate park!!!", "a skateboarder doing a trick at the skate park !!!"),
    ("Bananas, apples, oranges, etc. on display", "bananas apples oranges etc. on display"),
    ("Dr. Smith's office is on the 2nd floor.", "dr. smith 's office is on the 2nd floor"),
    ("The bear is 6'2\" tall.", "the bear is 6 2 tall"),
    ("A sandwich cut in half.It's on a plate.", "a sandwich cut in half.it 's on a plate"),
    ("A sign that reads \"Welcome to N.Y.C.\"", "a sign that reads welcome to n.y.c."),
    ("Kids at a birthday party: cake, balloons, and presents.", "kids at a birthday party cake balloons and presents"),
    ("A stop sign at the corner of 1st St. and Elm.", "a stop sign at the corner of 1st st. and elm"),
    ("There are 12 donuts in the box; 3 are chocolate.", "there are 12 donuts in the box 3 are chocolate"),
    ("The 2 dogs' owner is walking them.", "the 2 dogs owner is walking them"),
]


@pytest.mark.parametrize("text, expected", PTB_REFERENCE)
def test_ptb_tokenize_matches_the_java_tokenizer(text, expected):
    assert ptb_tokenize(text) == expected


# ---------------------------------------------------------------------- CIDEr

def _random_captions(rng: random.Random, n_images: int) -> tuple[list[str], list[list[str]]]:
    vocabulary = "a man dog red blue sits on the grass with ball two cats table".split()

    def sentence(shortest: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(shortest, 12)))

    predictions = [sentence(0) for _ in range(n_images)]
    references = [[sentence(1) for _ in range(rng.randint(1, 5))] for _ in range(n_images)]
    return predictions, references


def _pycocoevalcap_cider(predictions, references):
    from pycocoevalcap.cider.cider import Cider

    ids = range(len(predictions))
    return Cider().compute_score({i: references[i] for i in ids}, {i: [predictions[i]] for i in ids})


@pytest.mark.parametrize("seed", range(40))
def test_cider_equals_pycocoevalcap_on_pretokenized_text(seed):
    rng = random.Random(seed)
    predictions, references = _random_captions(rng, rng.randint(1, 25))
    score, scores = _pycocoevalcap_cider(predictions, references)
    # Same terms summed in the same order: the same floats, not merely close ones.
    assert cider(predictions, references, tokenize=False) == score
    assert cider_scores(predictions, references, tokenize=False) == list(scores)


def test_cider_tokenizes_like_the_coco_evaluator():
    captions = [text for text, _ in PTB_REFERENCE]
    predictions = captions[::2]
    references = [[c, captions[(i + 3) % len(captions)]] for i, c in enumerate(captions[1::2])]
    tokenized_refs = [[ptb_tokenize(r) for r in refs] for refs in references]
    score, _ = _pycocoevalcap_cider([ptb_tokenize(p) for p in predictions], tokenized_refs)
    assert cider(predictions, references) == score
    assert cider(predictions, references) != cider(predictions, references, tokenize=False)


def test_cider_small_cases_by_hand():
    # Two images with no word in common: every n-gram has df 1, idf log(2); identical candidate and
    # reference -> cosine 1 for n = 1..4, no length penalty: 10 per image.
    assert cider(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]], tokenize=False) == pytest.approx(10.0)
    # A three-word caption has no 4-grams: the mean over n = 1..4 is 3/4.
    assert cider(["a b c", "e f g"], [["a b c"], ["e f g"]], tokenize=False) == pytest.approx(7.5)
    # One image: log(#images) = 0 makes every weight 0.
    assert cider(["a cat"], [["a cat"]]) == 0.0
    # References may be one string; a candidate sharing nothing scores 0.
    assert cider_scores(["x y", "a b c d"], ["a b c d", "e f g h"], tokenize=False)[0] == 0.0


# ---------------------------------------------------------------------- VQA accuracy

@pytest.mark.parametrize("answer, expected", [
    # The processing steps listed on visualqa.org/evaluation.html, with its examples:
    ("Yes", "yes"),  # lower-cased
    ("yes.", "yes"), ("3.5", "3.5"),  # periods removed except in decimals
    ("two", "2"), ("Ten dogs", "10 dogs"), ("none", "0"),  # number words to digits
    ("the dog", "dog"), ("a cat and an owl", "cat and owl"),  # articles removed
    ("dont", "don't"), ("isnt", "isn't"), ("whats up", "what's up"),  # contractions get their apostrophe
    ("red/blue", "red blue"), ("x-ray", "x ray"), ("(left)", "left"),  # punctuation -> space (or removed)
    ("girl's", "girl's"), ("2:50 pm", "2:50 pm"),  # apostrophes and colons kept
    ("100,978", "100978"),  # no space for a comma between digits
    # The official code's own rules, followed to the letter:
    ("red, blue", "red blue"),  # a mark next to a space is deleted, not spaced
    ("1,000 red/blue", "1000 redblue"),  # a digit-comma-digit anywhere deletes every mark
    ("\tyes\n", "yes"), ("Im", "im"),  # the table's capitalised keys never match
])
def test_vqa_normalize(answer, expected):
    assert vqa_normalize(answer) == expected


def test_vqa_score_averages_over_the_ten_leave_one_out_subsets():
    others = ["no"] * 10
    # k humans said "yes": leaving one of them out leaves k-1 matches, leaving another out leaves k.
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["yes"] * k + others[k:]
        assert vqa_score("yes", answers) == pytest.approx(expected)
        assert vqa_score("yes", answers) == pytest.approx(
            sum(min(1.0, (k - (i < k)) / 3) for i in range(10)) / 10)


def test_vqa_score_normalises_only_when_the_humans_disagree():
    assert vqa_score("Two.", ["2"] * 9 + ["two"]) == 1.0  # they disagree in spelling: both normalised
    assert vqa_score("Two", ["two"] * 10) == 0.0  # all agree: compared as written (stripped)
    assert vqa_score(" two\n", ["two"] * 10) == 1.0
    assert vqa_score("two", ["two"]) == vqa_score("two", ["two"] * 10) == 1.0  # one answer = ten copies
    assert vqa_score("2", ["two"]) == 0.0
    assert vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 7 + ["no"] * 3]) == pytest.approx((1 + 0.9) / 2)


# ---------------------------------------------------------------------- ANLS

def test_anls_by_hand():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert anls_score("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)
    assert anls_score("Dear dr.  Lobo ", ["Dear Dr. Lobo"]) == 1.0  # case and spacing do not count
    assert anls_score("Denver", ["Denver Broncos", "Denver"]) == 1.0  # the best answer counts
    assert anls_score("ab", ["ac"]) == 0.0  # NL = 0.5 is not below the threshold
    assert anls_score("abc", ["abd"]) == pytest.approx(2 / 3)
    assert anls_score("ab", ["ac"], threshold=0.6) == 0.5
    assert anls_score("", [""]) == 1.0 and anls_score("x", [""]) == 0.0
    assert anls(["abc", "zzz"], [["abd"], ["abc"]]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(UsageError, match="threshold"):
        anls_score("a", ["a"], threshold=0)


# ---------------------------------------------------------------------- boxes and masks

def test_box_accuracy_by_hand():
    truth = [0, 0, 10, 10]
    assert box_iou(truth, [0, 0, 10, 5]) == 0.5 and box_iou(truth, [20, 20, 30, 30]) == 0.0
    assert box_accuracy([[0, 0, 10, 5], [0, 0, 10, 4.9], None], [truth] * 3) == pytest.approx(1 / 3)  # >= 0.5 counts
    assert box_accuracy([[0, 0, 10, 4.9]], [truth], iou=0.4) == 1.0
    with pytest.raises(UsageError, match="2 predictions for 1"):
        box_accuracy([truth, truth], [truth])


def _rect(x0, y0, x1, y1, size=(10, 10)):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_greedy_match_one_to_one_by_decreasing_similarity():
    left, right, wide = _rect(0, 0, 5, 4), _rect(5, 0, 10, 4), _rect(1, 0, 10, 4)  # wide: 16/40 left, 20/36 right
    from paligemma.metrics import mask_iou

    assert greedy_match([left, right], [wide], mask_iou) == [0.0, pytest.approx(20 / 36)]
    assert greedy_match([left, right], [wide, _rect(0, 0, 4, 4)], mask_iou) == [pytest.approx(0.8),
                                                                                  pytest.approx(20 / 36)]
    assert greedy_match([[0, 0, 10, 10]], [[0, 0, 10, 4.9]], box_iou, threshold=0.5) == [0.0]


def test_mask_miou_by_hand():
    a, b = _rect(0, 0, 4, 4), _rect(6, 6, 10, 10)
    half = _rect(0, 0, 4, 2)
    # One object per example (RefCOCO): the mean of the IoUs; no prediction counts 0.
    assert mask_miou([a, half, None], [a, a, b]) == pytest.approx((1 + 0.5 + 0) / 3)
    # Labelled objects match within their label only; extra predictions lower nothing.
    truth = [[("cat", a), ("dog", b)]]
    assert mask_miou([[("dog", a), ("cat", a), ("cat", b)]], truth) == pytest.approx((1 + 0) / 2)
    assert math.isnan(mask_miou([[("cat", a)]], [[]]))


# ---------------------------------------------------------------------- detection

def _cocoeval_stats(predictions, ground_truth):
    """COCOeval on the same objects, through COCO.loadRes as its documentation shows."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = sorted({label for image in ground_truth + predictions for label, *_ in image})
    category = {label: i for i, label in enumerate(labels, start=1)}

    def xywh(box):
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    annotations = [{"id": len(ground_truth) * 1000 + j, "image_id": i, "category_id": category[label],
                    "bbox": xywh(box), "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0}
                   for i, image in enumerate(ground_truth, start=1) for j, (label, box) in enumerate(image, start=1)]
    for k, ann in enumerate(annotations, start=1):
        ann["id"] = k
    results = [{"image_id": i, "category_id": category[label], "bbox": xywh(box), "score": score}
               for i, image in enumerate(predictions, start=1) for label, box, score in image]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": [{"id": i} for i in range(1, len(ground_truth) + 1)],
                         "categories": [{"id": c, "name": name} for name, c in category.items()],
                         "annotations": annotations}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[:3].tolist()


def _random_detections(rng: np.random.Generator, n_images: int):
    labels = ["cat", "dog", "red car"]
    ground_truth, predictions = [], []
    for _ in range(n_images):
        truth = []
        for _ in range(rng.integers(0, 5)):
            x0, y0 = rng.uniform(0, 200, size=2)
            w, h = rng.uniform(5, 100, size=2)
            truth.append((str(rng.choice(labels)), [x0, y0, x0 + w, y0 + h]))
        predicted = []
        for label, box in truth:
            if rng.random() < 0.8:  # a found object, shifted a little or a lot
                jitter = rng.normal(0, rng.choice([2, 10, 30]), size=4)
                moved = sorted(box[0::2] + jitter[0::2]), sorted(box[1::2] + jitter[1::2])
                predicted.append((label, [moved[0][0], moved[1][0], moved[0][1], moved[1][1]], float(rng.random())))
        for _ in range(rng.integers(0, 3)):  # false positives
            x0, y0 = rng.uniform(0, 200, size=2)
            predicted.append((str(rng.choice(labels)), [x0, y0, x0 + 30, y0 + 40], float(rng.random())))
        ground_truth.append(truth)
        predictions.append(predicted)
    return predictions, ground_truth


@pytest.mark.parametrize("seed", range(8))
def test_detection_map_equals_cocoeval(seed):
    predictions, ground_truth = _random_detections(np.random.default_rng(seed), 12)
    expected = _cocoeval_stats(predictions, ground_truth)
    result = detection_map(predictions, ground_truth)
    assert [result["map"], result["map50"], result["map75"]] == expected
    assert 0.0 < result["map"] < result["map50"] <= 1.0


def test_detection_map_takes_detection_objects_and_scores_them_1_without_a_score():
    predictions, ground_truth = _random_detections(np.random.default_rng(100), 10)
    as_detections = [[Detection(label, box) for label, box, _ in image] for image in predictions]
    unscored = [[(label, box, 1.0) for label, box, _ in image] for image in predictions]
    result = detection_map(as_detections, ground_truth)
    assert [result["map"], result["map50"], result["map75"]] == _cocoeval_stats(unscored, ground_truth)
    scored = [[{"label": label, "box": box, "score": score} for label, box, score in image] for image in predictions]
    assert detection_map(scored, ground_truth) == detection_map(predictions, ground_truth)


def test_detection_map_small_cases_by_hand():
    truth = [[("cat", [0, 0, 100, 100])]]
    # (COCOeval's 101-point sums come out a few ulps off 1.0.)
    perfect = detection_map([[("cat", [0, 0, 100, 100])]], truth)
    assert perfect == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})
    # IoU 0.62 passes the thresholds 0.50, 0.55, 0.60 of ten.
    result = detection_map([[("cat", [0, 0, 100, 62])]], truth)
    assert result == pytest.approx({"map": 0.3, "map50": 1.0, "map75": 0.0})
    # A wrong box ranked above the right one: precision 1/2 at every recall level.
    ranked = [[("cat", [200, 200, 300, 300], 0.9), ("cat", [0, 0, 100, 100], 0.5)]]
    assert detection_map(ranked, truth)["map50"] == pytest.approx(0.5)
    assert detection_map([[("cat", [0, 0, 100, 100], 0.9), ("cat", [200, 200, 300, 300], 0.5)]],
                         truth)["map50"] == pytest.approx(1.0)
    assert detection_map([[("dog", [0, 0, 100, 100])]], truth)["map"] == 0.0  # wrong label
    assert detection_map([[]], truth)["map"] == 0.0  # nothing predicted
    assert all(math.isnan(v) for v in detection_map([[("cat", [0, 0, 1, 1])]], [[]]).values())


def test_detection_matches_by_hand():
    truth = [[("cat", [0, 0, 10, 10]), ("cat", [20, 0, 30, 10]), ("dog", [0, 20, 10, 30])], []]
    predicted = [[("cat", [1, 0, 11, 10]), ("dog", [20, 0, 30, 10]), ("cat", [0, 0, 10, 10])], [("cat", [0, 0, 5, 5])]]
    counts = detection_matches(predicted, truth)
    assert counts == (1, 3, 4)  # one cat found (by the better of two boxes), the dog box is in the wrong place
    predicted[0].append(("cat", [21, 0, 31, 10]))  # IoU 9/11 with the second cat
    assert detection_matches(predicted, truth) == (2, 3, 5)
    assert detection_matches(predicted, truth, iou=0.85) == (1, 3, 5)
    assert counts.recall == pytest.approx(1 / 3) and counts.precision == 0.25
    assert math.isnan(detection_matches([[]], [[]]).recall)


def test_detection_map_without_pycocotools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(UsageError, match=r"paligemma\[eval\]"):
        detection_map([[]], [[("cat", [0, 0, 1, 1])]])


@pytest.mark.parametrize("call", [
    lambda: cider(["a"], [["a"], ["b"]]),
    lambda: cider("a cat", [["a cat"]]),
    lambda: vqa_accuracy(["yes"], [[]]),
    lambda: anls([], []),
    lambda: detection_map([[]], []),
    lambda: mask_miou([None], []),
])
def test_bad_inputs_say_what_is_wrong(call):
    with pytest.raises(UsageError):
        call()
