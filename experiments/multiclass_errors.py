"""What goes wrong in multi-class detect answers, and is it the objects one above the other?

    OMP_NUM_THREADS=1 python experiments/multiclass_errors.py --model paligemma/demo_model --scenes 200

Asks the prompts of `paligemma demo-eval`'s multi-class score (`evaluate_multiclass`: per held-out scene
one `detect A ; B` and one `detect A ; B ; C`, labels in an order drawn from the scene's seed) and sorts
every predicted box: "right" (IoU >= 0.5 with an asked object of its label), "mislabelled" (IoU >= 0.5
with an asked object of another shape), or "misplaced" (no asked object). The true objects that have an
object of another asked shape side by side with them (`scenes.side_by_side_flags`: box centres less
than 20 px apart in x, so their order in the answer hangs on a few pixels) are counted apart, with
how often their box got the wrong label. Prints one JSON line; the figures are in the demo model card.
"""

import argparse
import json
from collections import Counter

from paligemma.cli_common import load
from paligemma.demo.evaluate import multiclass_labels
from paligemma.demo.recipe import EVAL_SEED0, SCENE_SIZE
from paligemma.demo.scenes import detect_prompt, generate_scene, matching_objects, side_by_side_flags
from paligemma.generation import generate
from paligemma.metrics import box_iou
from paligemma.tasks import parse_detections


def count_errors(model, processor, num_scenes: int, batch_size: int = 64) -> Counter:
    items = []  # (scene, asked labels)
    for index in range(num_scenes):
        scene = generate_scene(EVAL_SEED0 + index, SCENE_SIZE)
        pair, triple, _ = multiclass_labels(EVAL_SEED0 + index)
        items += [(scene, pair), (scene, triple)]
    counts = Counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        answers = generate(model, processor, [scene.image for scene, _ in chunk],
                           [detect_prompt(labels) for _, labels in chunk], max_new_tokens=64)
        for (scene, labels), answer in zip(chunk, answers):
            truth = matching_objects(scene, labels)
            beside = side_by_side_flags(truth, scene.size)
            counts["true objects"] += len(truth)
            counts["side-by-side objects"] += sum(beside)
            for found in parse_detections(answer, (SCENE_SIZE, SCENE_SIZE)).objects:
                counts["boxes"] += 1
                overlap, index = max(((box_iou(found.box, t.box), i) for i, t in enumerate(truth)), default=(0.0, -1))
                if overlap < 0.5:
                    counts["misplaced"] += 1
                    continue
                right = truth[index].shape == found.label
                counts["right" if right else "mislabelled"] += 1
                if beside[index]:
                    counts["side-by-side right" if right else "side-by-side mislabelled"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="paligemma/demo_model")
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()
    model, processor, _ = load(args.model)
    counts = count_errors(model, processor, args.scenes)
    placed = counts["right"] + counts["mislabelled"]  # boxes on an asked object
    beside = counts["side-by-side right"] + counts["side-by-side mislabelled"]
    others = placed - beside
    print(json.dumps({"model": args.model, "scenes": args.scenes, **counts,
                      "mislabelled share, side by side": round(counts["side-by-side mislabelled"] / max(beside, 1), 3),
                      "mislabelled share, others": round((counts["mislabelled"] - counts["side-by-side mislabelled"])
                                                         / max(others, 1), 3)}))


if __name__ == "__main__":
    main()
