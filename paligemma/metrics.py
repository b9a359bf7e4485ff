"""Task metrics as plain functions of predictions and references: no model, no files, no torch.

| function | task | equals (checked in tests/test_metrics.py) |
|---|---|---|
| `cider` | captions | pycocoevalcap's `Cider` scorer: the COCO caption leaderboard's "CIDEr", which is CIDEr-D |
| `vqa_accuracy` | VQAv2 | the official VQA evaluation (GT-Vision-Lab/VQA `vqaEval.py`): normalisation + leave-one-out |
| `anls` | DocVQA, OCR | the DocVQA paper's ANLS (eq. 1), on lower-cased, whitespace-collapsed text |
| `box_accuracy` | referring expressions | big_vision's RefCOCO box accuracy (IoU >= 0.5) |
| `mask_miou` | segmentation | big_vision's RefCOCO mIoU (one object per example); greedy matching with more |
| `detection_map` | detection | pycocotools' `COCOeval` (called: needs `pip install paligemma[eval]`) |

CIDEr-D (Vedantam et al. 2015, as coded in pycocoevalcap/cider/cider_scorer.py and in the authors'
CiderD scorer, "corpus" mode): per n = 1..4, tf-idf vectors of n-grams with the document frequency
counted over the references of the whole evaluated set (idf = log(#images) - log(df)), the
candidate's vector clipped to each reference's, cosine similarity times a Gaussian length penalty
exp(-(l_c - l_r)^2 / (2 * 6^2)) (l = number of bigrams, as that code counts it), averaged over n and
over the references, times 10. So it is a corpus metric: a caption's score depends on the other
images' references, and a set of one image scores 0 (every idf is 0).

Text for CIDEr is tokenized like COCO's evaluator does (`ptb_tokenize`): Stanford's PTB tokenizer
with lower-casing, then the punctuation tokens it lists removed. Ours is a pure-Python
re-implementation of the rules captions need (no Java); see `ptb_tokenize` for what it covers.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .errors import UsageError

# ---------------------------------------------------------------------- tokenization (COCO captions)

# What COCO's evaluator (pycocoevalcap/tokenizer/ptbtokenizer.py) drops after PTB tokenization. It
# lower-cases first, so the bracket tokens -LRB- etc. arrive as -lrb- and are NOT dropped: kept here too.
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                             "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_OPENING = {**_BRACKETS, '"': "``", "'": "`"}  # how PTB writes a mark that opens a word
_CLOSING = {**_BRACKETS, '"': "''"}
# Abbreviations whose final period the PTB tokenizer keeps (a subset of its list: those captions use).
_ABBREVIATIONS = frozenset("mr mrs ms dr st ave etc vs jr sr prof inc ltd co corp mt ft rd blvd".split())
_ACRONYM = re.compile(r"(?:[a-z]\.)+[a-z]?\.?")  # u.s. a.m. e.g.
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
_CLITIC = re.compile(r"(.+?)('s|'re|'ve|'ll|'d|'m|n't)")
_LEADING = "\"'`([{<$#@"
_TRAILING = "\"')]}>,;:%"
# Inside a chunk: , ; : unless between digits, runs of ? and !, "--", an apostrophe between digits (6'2).
_INNER = re.compile(r"(?<!\d)[,;:]|[,;:](?!\d)|[?!]+|--|(?<=\d)'(?=\d)")


def ptb_tokenize(text: str) -> str:
    """`text` as COCO's caption evaluator tokenizes it, space-separated.

    COCO runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) and drops the tokens
    in `PTB_PUNCTUATION`. This re-implements the rules captions meet: lower-casing; clitics split off
    ("man's" -> "man 's", "don't" -> "do n't", "can't" -> "ca n't", "cannot" -> "can not"); quotes,
    commas, semicolons, colons, "?" and "!" split off and dropped, except inside numbers (1,000 3:45);
    a word's final period split off and dropped unless the word is an acronym (u.s., a.m.) or a common
    abbreviation (st., dr., etc.); runs like "?!" or "!!!" kept as one token (not in the drop list);
    brackets turned into -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- and kept (see PTB_PUNCTUATION); $ # @ % <
    split off and kept; hyphens and slashes inside words kept, a lone "-" or "--" dropped. On the
    captions in tests/test_metrics.py it gives exactly the Java tokenizer's output.
    """
    tokens: list[str] = []
    for chunk in text.lower().split():
        tokens += _split_chunk(chunk)
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


def _split_chunk(chunk: str) -> list[str]:
    """One whitespace-separated chunk -> PTB tokens (punctuation still in)."""
    head: list[str] = []
    while chunk and chunk[0] in _LEADING and not _is_clitic(chunk):
        head.append(_OPENING.get(chunk[0], chunk[0]))
        chunk = chunk[1:]
    tail: list[str] = []
    while chunk:
        if chunk.endswith("..."):
            tail.append("...")
            chunk = chunk[:-3]
        elif match := re.search(r"[?!]+$", chunk):
            tail.append(match.group())
            chunk = chunk[:match.start()]
        elif chunk.endswith(".") and not (_ACRONYM.fullmatch(chunk) or chunk[:-1] in _ABBREVIATIONS):
            tail.append(".")
            chunk = chunk[:-1]
        elif chunk[-1] in _TRAILING or chunk[-1] in _BRACKETS:
            tail.append(_CLOSING.get(chunk[-1], chunk[-1]))
            chunk = chunk[:-1]
        else:
            break
    middle: list[str] = []
    if chunk:
        position = 0
        for match in _INNER.finditer(chunk):
            middle += _words(chunk[position:match.start()]) + [match.group()]
            position = match.end()
        middle += _words(chunk[position:])
    return head + middle + tail[::-1]


def _is_clitic(chunk: str) -> bool:
    """'s 're 've 'll 'd 'm standing alone (after a space): a word, not an opening quote."""
    return chunk[0] == "'" and re.fullmatch(r"'(s|re|ve|ll|d|m)", chunk) is not None


def _words(part: str) -> list[str]:
    """A chunk's core (no edge punctuation) with its clitics split off."""
    if not part:
        return []
    if part in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[part])
    match = _CLITIC.fullmatch(part)
    if match and "'" not in match.group(1):
        return [match.group(1), match.group(2)]
    return [part]


# ---------------------------------------------------------------------- CIDEr-D

def cider(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True) -> float:
    """Corpus CIDEr-D of one caption per image against that image's reference captions (see module
    docstring); the mean of `cider_scores`. tokenize=False takes the texts as already tokenized
    (space-separated tokens), as pycocoevalcap's scorer does."""
    return float(np.mean(cider_scores(predictions, references, tokenize)))


def cider_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: bool = True,
                 n: int = 4, sigma: float = 6.0) -> list[float]:
    """Each image's CIDEr-D score, with document frequencies over all of `references`."""
    references = _check_references(predictions, references)
    prepare = ptb_tokenize if tokenize else (lambda text: text)
    candidates = [_ngram_counts(prepare(text), n) for text in predictions]
    reference_counts = [[_ngram_counts(prepare(text), n) for text in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update({gram for counts in refs for gram in counts})
    log_images = math.log(float(len(reference_counts)))

    def vector(counts: dict) -> tuple[list[dict], list[float], int]:
        # Per n: {ngram: tf * idf}, its norm, and the "length" (bigram count, as pycocoevalcap counts it).
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, term_frequency in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(term_frequency) * (log_images - math.log(max(1.0, document_frequency[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                length += term_frequency
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for candidate, refs in zip(candidates, reference_counts):
        vec, norm, length = vector(candidate)
        total = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = vector(ref)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                value = 0.0
                for gram, weight in vec[k].items():
                    value += min(weight, vec_ref[k].get(gram, 0.0)) * vec_ref[k].get(gram, 0.0)  # clipped
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return scores


def _ngram_counts(text: str, n: int) -> dict[tuple[str, ...], int]:
    """n-gram counts, 1-grams first then 2-grams..., each in order of first appearance (the order the
    reference sums its terms in, so the floats come out identical)."""
    words = text.split()
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = tuple(words[i:i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


# ---------------------------------------------------------------------- VQA accuracy

# The official VQA evaluation's normalisation tables (GT-Vision-Lab/VQA, vqaEval.py).
_VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!"]
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: in effect, a period not before a digit
_VQA_ARTICLES = frozenset(["a", "an", "the"])
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Contractions written without their apostrophe, and the spelling they are given back. The table has
# keys with capitals ("Im", "Ive") that never match the lower-cased words: kept as the original has them.
_VQA_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def vqa_normalize(answer: str) -> str:
    """An answer as the official VQA evaluation compares it: newlines and tabs to spaces, stripped;
    punctuation removed (or turned into a space), periods not before a digit removed, lower-cased,
    number words to digits, articles dropped, contractions given their apostrophe.

    Punctuation follows the official rule to the letter: a mark is deleted when it touches a space
    anywhere in the answer, or when the answer holds a digit-comma-digit anywhere ("100,978" ->
    "100978"), and replaced by a space otherwise. Colons and apostrophes are kept ("2:50", "girl's").
    """
    text = _vqa_strip(answer)
    out = text
    for mark in _VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or _VQA_DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official code passes re.UNICODE (= 32) where re.sub takes `count`: at most 32 periods go.
    out = _VQA_PERIOD.sub("", out, 32)
    words = [_VQA_NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def _vqa_strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """One question's VQA accuracy: over the leave-one-out subsets of the human answers (10 choose 9
    for VQAv2), the mean of min(#answers in the subset equal to the prediction / 3, 1).

    As in the official code, answers and prediction are normalised (`vqa_normalize`) only when the
    humans disagree; when all answers are the same, the stripped texts are compared as they are. A
    single answer counts as ten identical ones (score 1 for a match, else 0): the formula would
    otherwise give 0 to every prediction.
    """
    answers = [_vqa_strip(answer) for answer in _check_answers(answers)]
    prediction = _vqa_strip(prediction)
    if len(answers) == 1:
        answers = answers * 10
    if len(set(answers)) > 1:
        answers = [vqa_normalize(answer) for answer in answers]
        prediction = vqa_normalize(prediction)
    accuracies = []
    for left_out in range(len(answers)):
        matches = sum(answer == prediction for i, answer in enumerate(answers) if i != left_out)
        accuracies.append(min(1, float(matches) / 3))
    return float(sum(accuracies)) / len(accuracies)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_score` over the questions: `answers[i]` holds question i's human answers."""
    answers = _check_references(predictions, answers, "answers")
    return _mean([vqa_score(p, a) for p, a in zip(predictions, answers)])


# ---------------------------------------------------------------------- ANLS

def anls_score(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """One question's ANLS: the best over the answers of 1 - NL, where NL is the Levenshtein distance
    divided by the longer string's length, or 0 when NL >= threshold (DocVQA paper, eq. 1; a tie at
    the threshold scores 0 as there and in big_vision). Texts are compared lower-cased and with runs of
    whitespace made one space, as the DocVQA / ST-VQA challenge scripts do; two empty texts score 1."""
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"the ANLS threshold must be in (0, 1], got {threshold}")
    predicted = _anls_text(prediction)
    best = 0.0
    for answer in _check_answers(answers):
        answer = _anls_text(answer)
        longest = max(len(answer), len(predicted))
        distance = levenshtein(answer, predicted) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def anls(predictions: Sequence[str], answers: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """Mean `anls_score` over the questions (Average Normalized Levenshtein Similarity)."""
    answers = _check_references(predictions, answers, "answers")
    return _mean([anls_score(p, a, threshold) for p, a in zip(predictions, answers)])


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


# ---------------------------------------------------------------------- boxes and masks

Box = Sequence[float]  # [x0, y0, x1, y1], any unit (pixels or fractions): IoU does not depend on it


def box_iou(box_a: Box, box_b: Box) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes; 0.0 when both are empty."""
    ix = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    iy = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    inter = ix * iy
    area_a = max(0.0, box_a[2] - box_a[0]) * max(0.0, box_a[3] - box_a[1])
    area_b = max(0.0, box_b[2] - box_b[0]) * max(0.0, box_b[3] - box_b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def box_accuracy(predictions: Sequence[Box | None], boxes: Sequence[Box], iou: float = 0.5) -> float:
    """Referring-expression accuracy: the fraction of examples whose predicted box has IoU >= `iou`
    with the true box (big_vision's `boxacc`). A prediction of None (no valid box) is a miss."""
    if len(predictions) != len(boxes):
        raise UsageError(f"got {len(predictions)} predictions for {len(boxes)} boxes: give one per example")
    return _mean([float(p is not None and box_iou(p, b) >= iou) for p, b in zip(predictions, boxes)])


def mask_iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape; 0.0 when both are empty."""
    mask_a, mask_b = np.asarray(mask_a, dtype=bool), np.asarray(mask_b, dtype=bool)
    if mask_a.shape != mask_b.shape:
        raise UsageError(f"masks of different shapes {mask_a.shape} and {mask_b.shape}")
    union = np.count_nonzero(mask_a | mask_b)
    return np.count_nonzero(mask_a & mask_b) / union if union else 0.0


def greedy_match(truth: Sequence, predicted: Sequence, similarity: Callable[[Any, Any], float],
                 threshold: float = 0.0) -> list[float]:
    """Each true item's similarity with the prediction matched to it, 0.0 when none is.

    Greedy one-to-one matching: pairs are taken by decreasing similarity (ties: the earlier true item,
    then the earlier prediction), each item used at most once; pairs below `threshold` or with no
    overlap at all (similarity 0) are never matched.
    """
    pairs = sorted((-similarity(t, p), ti, pi) for ti, t in enumerate(truth) for pi, p in enumerate(predicted))
    scores, used_truth, used_predicted = [0.0] * len(truth), set(), set()
    for negative, ti, pi in pairs:
        if -negative <= 0.0 or -negative < threshold:
            break
        if ti not in used_truth and pi not in used_predicted:
            scores[ti] = -negative
            used_truth.add(ti)
            used_predicted.add(pi)
    return scores


def mask_miou(predictions: Sequence, masks: Sequence) -> float:
    """Mean mask IoU over all true objects, each matched one-to-one (`greedy_match` by mask IoU) to a
    predicted mask of the same label; an unmatched true object counts 0, extra predictions nothing.

    Each item of `predictions` / `masks` is one example: a list of objects, or a single object, or
    None (nothing). An object is a bool (H, W) mask (unlabelled), a (label, mask) pair, or anything
    with `.label` and `.mask` (`segmentation.Segmentation`). With one object per example this is
    big_vision's RefCOCO mIoU, except that of several predicted objects the best-matching one counts
    (big_vision reads only the first). NaN when there is no true object at all.
    """
    if len(predictions) != len(masks):
        raise UsageError(f"got {len(predictions)} predictions for {len(masks)} examples: give one per example")
    ious: list[float] = []
    for predicted, truth in zip(predictions, masks):
        for label, true_masks in _by_label(_objects(truth, "mask")).items():
            candidates = _by_label(_objects(predicted, "mask")).get(label, [])
            ious += greedy_match([m for m, _ in true_masks], [m for m, _ in candidates], mask_iou)
    return _mean(ious) if ious else math.nan


# ---------------------------------------------------------------------- detection

class MatchCounts(NamedTuple):
    """Objects matched one-to-one at an IoU threshold, with the totals recall and precision divide by."""

    matched: int
    ground_truth: int
    predicted: int

    @property
    def recall(self) -> float:
        return self.matched / self.ground_truth if self.ground_truth else math.nan

    @property
    def precision(self) -> float:
        return self.matched / self.predicted if self.predicted else math.nan


def detection_matches(predictions: Sequence, ground_truth: Sequence, iou: float = 0.5) -> MatchCounts:
    """Boxes matched one-to-one (`greedy_match` by IoU, at IoU >= `iou`) to true boxes of the same label,
    per image. Items are as for `detection_map`; every predicted box counts in `predicted`, whatever
    its label."""
    if len(predictions) != len(ground_truth):
        raise UsageError(f"got {len(predictions)} predictions for {len(ground_truth)} images: give one per image")
    matched = total_truth = total_predicted = 0
    for predicted, truth in zip(predictions, ground_truth):
        predicted_by_label = _by_label(_objects(predicted, "box"))
        for label, boxes in _by_label(_objects(truth, "box")).items():
            candidates = [box for box, _ in predicted_by_label.get(label, [])]
            matched += sum(s > 0.0 for s in greedy_match([b for b, _ in boxes], candidates, box_iou, iou))
            total_truth += len(boxes)
        total_predicted += sum(len(v) for v in predicted_by_label.values())
    return MatchCounts(matched, total_truth, total_predicted)


def detection_map(predictions: Sequence, ground_truth: Sequence) -> dict[str, float]:
    """COCO box AP computed by pycocotools' COCOeval: {"map": mAP@[.5:.95], "map50", "map75"} (all
    areas, at most 100 detections per image), averaged over the labels present in `ground_truth`.

    `predictions[i]` and `ground_truth[i]` are image i's objects: `tasks.Detection`s, (label, box) or
    (label, box, score) tuples, {"label", "box"[, "score"]} dicts, or anything with `.label` and
    `.box` (and `.score`). Boxes are [x0, y0, x1, y1] in pixels. A prediction's score ranks it
    (COCO's precision-recall curve); without one it is 1.0, so all of an answer's boxes tie and
    COCOeval keeps them in answer order. NaN when the ground truth holds no object at all.
    Needs pycocotools (`pip install paligemma[eval]` or `pip install pycocotools`).
    """
    if len(predictions) != len(ground_truth):
        raise UsageError(f"got {len(predictions)} predictions for {len(ground_truth)} images: give one per image")
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UsageError("detection mAP needs pycocotools: pip install 'paligemma[eval]' (or pip install "
                         "pycocotools)") from None
    truth = [_objects(objects, "box") for objects in ground_truth]
    predicted = [_objects(objects, "box") for objects in predictions]
    labels = sorted({o.label for image in truth + predicted for o in image}, key=str)
    category = {label: index for index, label in enumerate(labels, start=1)}
    images = [{"id": i} for i in range(1, len(truth) + 1)]
    categories = [{"id": index, "name": str(label)} for label, index in category.items()]
    gt_anns, dt_anns = [], []
    for image_id, (true_objects, predicted_objects) in enumerate(zip(truth, predicted), start=1):
        for obj in true_objects:
            gt_anns.append(_coco_box(len(gt_anns) + 1, image_id, category[obj.label], obj.value))
        for obj in predicted_objects:
            dt_anns.append({**_coco_box(len(dt_anns) + 1, image_id, category[obj.label], obj.value),
                            "score": obj.score})
    if not gt_anns:
        return {"map": math.nan, "map50": math.nan, "map75": math.nan}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_truth, coco_predicted = COCO(), COCO()
        coco_truth.dataset = {"images": images, "categories": categories, "annotations": gt_anns}
        # What COCO.loadRes builds from a result list, written out so that no detections at all works too.
        coco_predicted.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
        coco_truth.createIndex()
        coco_predicted.createIndex()
        evaluation = COCOeval(coco_truth, coco_predicted, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats  # [AP, AP50, AP75, ...]; -1 means undefined
    return {name: float(stats[i]) if stats[i] >= 0 else math.nan
            for i, name in enumerate(("map", "map50", "map75"))}


def _coco_box(ann_id: int, image_id: int, category_id: int, box: Box) -> dict:
    """A COCO annotation for an [x0, y0, x1, y1] box (COCO: [x, y, width, height]); ids start at 1
    because COCOeval uses 0 for "unmatched"."""
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = x1 - x0, y1 - y0
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, width, height],
            "area": width * height, "iscrowd": 0}


# ---------------------------------------------------------------------- helpers

class _Object(NamedTuple):
    label: Any
    value: Any  # a box or a mask
    score: float


def _objects(item, field: str) -> list[_Object]:
    """One example's objects (see `detection_map` / `mask_miou` for what an item may be)."""
    if item is None:
        return []
    if isinstance(item, np.ndarray) or (field == "box" and _is_box(item)) or not isinstance(item, (list, tuple)):
        item = [item]
    objects = []
    for obj in item:
        if isinstance(obj, np.ndarray):
            label, value, score = None, obj, None
        elif isinstance(obj, dict):
            label, value, score = obj.get("label"), obj[field], obj.get("score")
        elif hasattr(obj, field):
            label, value, score = getattr(obj, "label", None), getattr(obj, field), getattr(obj, "score", None)
        elif isinstance(obj, (list, tuple)) and len(obj) in (2, 3) and not _is_box(obj):
            label, value, score = obj[0], obj[1], obj[2] if len(obj) == 3 else None
        elif field == "box" and _is_box(obj):
            label, value, score = None, obj, None
        else:
            raise UsageError(f"cannot read an object with a {field} from {obj!r}: give (label, {field}[, score]), "
                             f"a dict with '{field}', or an object with .{field}")
        objects.append(_Object(label, value, 1.0 if score is None else float(score)))
    return objects


def _is_box(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def _by_label(objects: list[_Object]) -> dict[Any, list[tuple[Any, float]]]:
    grouped: dict[Any, list[tuple[Any, float]]] = {}
    for obj in objects:
        grouped.setdefault(obj.label, []).append((obj.value, obj.score))
    return grouped


def _check_references(predictions: Sequence[str], references: Sequence, name: str = "references") -> list[list[str]]:
    """references as a list of non-empty lists of str, one per prediction; a bare str is one reference."""
    if isinstance(predictions, str):
        raise UsageError("predictions must be a list of strings, one per example, not one string")
    if len(predictions) != len(references):
        raise UsageError(f"got {len(predictions)} predictions for {len(references)} sets of {name}: "
                         "give one set per prediction")
    if not predictions:
        raise UsageError("no predictions to score")
    return [_check_answers([refs] if isinstance(refs, str) else refs, name) for refs in references]


def _check_answers(answers: Sequence[str], name: str = "answers") -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    answers = list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise UsageError(f"every example needs a non-empty list of string {name}, got {answers!r}")
    return answers


def _mean(values: Sequence[float]) -> float:
    if not values:
        raise UsageError("nothing to average: no examples (or no true objects) to score")
    return float(sum(values)) / len(values)
