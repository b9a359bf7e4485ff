"""How do detection scores tell right boxes from wrong ones?

    OMP_NUM_THREADS=1 python experiments/box_scores.py --scenes 40

Asks a model (the bundled demo model by default) `detect {shape}` for each shape on held-out
shapes-world scenes (seeds from 1,000,050,000 by default: away from `paligemma demo-eval`'s first
scenes), greedily, and scores every box as `paligemma generate --json` does (the product of the
probabilities of its four `<loc>` tokens and its label tokens). A box is right when it is matched
to a true object of the asked shape at IoU >= 0.5, one to one as `paligemma demo-eval` matches
(`metrics.greedy_match`); every other box is wrong. Prints the count, range and median score of each kind and a JSON
summary. The figures are in docs/decoding.md ("Scores for boxes and masks").
"""

import argparse
import json
import statistics

from paligemma.cli_common import DEMO_MODEL_DIR, load
from paligemma.demo.recipe import EVAL_SEED0
from paligemma.demo.scenes import SHAPES, detect_prompt, generate_scene, matching_objects
from paligemma.generation import generate_detailed
from paligemma.metrics import box_iou, greedy_match
from paligemma.tasks import parse_detections

IOU = 0.5


def box_scores(model, processor, num_scenes: int, seed0: int, batch_size: int) -> dict[str, list[float]]:
    """{"right": [score, ...], "wrong": [...]} over every box of every answer."""
    items = [(generate_scene(seed0 + i), shape) for i in range(num_scenes) for shape in SHAPES]
    scores = {"right": [], "wrong": []}
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        results = generate_detailed(model, processor, [scene.image for scene, _ in chunk],
                                    [detect_prompt(shape) for _, shape in chunk], max_new_tokens=64)
        for (scene, shape), result in zip(chunk, results):
            found = parse_detections(result.text, (scene.size, scene.size), result.token_spans()).objects
            truth = [o.box for o in matching_objects(scene, shape)]
            # per answer box: its IoU with the true box matched to it, 0.0 when none is
            overlaps = greedy_match([d.box for d in found], truth, box_iou, IOU)
            for detection, overlap in zip(found, overlaps):
                scores["right" if overlap > 0.0 else "wrong"].append(detection.score)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--seed0", type=int, default=EVAL_SEED0 + 50_000)
    parser.add_argument("--batch-size", type=int, default=60)
    args = parser.parse_args()
    model, processor, _ = load(args.model, None, "cpu", optimize=False, quantize=None)
    scores = box_scores(model, processor, args.scenes, args.seed0, args.batch_size)
    summary = {}
    for kind, values in scores.items():
        values = sorted(values)
        summary[kind] = {"boxes": len(values), "min": values[0] if values else None,
                         "median": statistics.median(values) if values else None,
                         "max": values[-1] if values else None, "scores": [round(v, 6) for v in values]}
        if values:
            print(f"{kind:5} {len(values):4} boxes, score {values[0]:.4f} .. {values[-1]:.4f}, "
                  f"median {statistics.median(values):.4f}")
        else:
            print(f"{kind:5}    0 boxes")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
