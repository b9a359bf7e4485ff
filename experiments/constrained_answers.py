"""How many detect / segment answers are malformed, with and without constrained decoding?

    OMP_NUM_THREADS=1 python experiments/constrained_answers.py --scenes 500

Asks a model (the bundled demo model by default) about held-out shapes-world scenes (seeds from
1,000,000,000, as `paligemma demo-eval`): "detect {shape}" for each shape, one multi-class
"detect A ; B [; C]" (2 or 3 shapes in random order, absent ones included), "segment {shape}" for
each present shape and one "segment A ; B". Every prompt is answered greedily twice, without and
with `constrain=True`, and each answer is checked: does it parse without errors
(`parse_detections` / `parse_segmentations`), and are all its labels among the prompt's? Prints
one line per (mode, prompt kind) and a JSON summary. The figures are in docs/decoding.md.
"""

import argparse
import json
import random
import time

from paligemma.cli_common import DEMO_MODEL_DIR, load
from paligemma.demo.recipe import EVAL_SEED0
from paligemma.demo.scenes import SHAPES, detect_prompt, generate_scene, segment_prompt
from paligemma.generation import generate
from paligemma.segmentation import parse_segmentations
from paligemma.tasks import parse_detections, prompt_labels, prompt_task

MAX_NEW_TOKENS = {"detect": 64, "segment": 96}


def prompts_for(num_scenes: int, seed0: int) -> list[tuple[str, object, str]]:
    """(kind, scene, prompt) for every question asked."""
    items = []
    for i in range(num_scenes):
        scene = generate_scene(seed0 + i)
        rng = random.Random(seed0 + i)
        items += [("detect", scene, detect_prompt(s)) for s in SHAPES]
        items.append(("detect_multi", scene, detect_prompt(rng.sample(SHAPES, rng.choice([2, 3])))))
        items += [("segment", scene, segment_prompt(s)) for s in sorted({o.shape for o in scene.objects})]
        items.append(("segment_multi", scene, segment_prompt(rng.sample(SHAPES, 2))))
    return items


def problems(text: str, prompt: str, size: tuple[int, int], codec) -> tuple[bool, bool]:
    """(malformed, has a label the prompt did not ask for)."""
    if prompt_task(prompt) == "detect":
        parsed = parse_detections(text, size)
    else:
        parsed = parse_segmentations(text, size, codec)
    labels = set(prompt_labels(prompt))
    return bool(parsed.errors), any(o.label not in labels for o in parsed.objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed0", type=int, default=EVAL_SEED0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    model, processor, codec = load(args.model, None, "cpu", optimize=False, quantize=None)
    items = prompts_for(args.scenes, args.seed0)
    summary, start = {}, time.perf_counter()
    for constrain in (False, True):
        for kind in ("detect", "detect_multi", "segment", "segment_multi"):
            chosen = [item for item in items if item[0] == kind]
            answers = malformed = off_label = 0
            for b in range(0, len(chosen), args.batch_size):
                chunk = chosen[b:b + args.batch_size]
                texts = generate(model, processor, [scene.image for _, scene, _ in chunk],
                                 [prompt for _, _, prompt in chunk], constrain=constrain,
                                 max_new_tokens=MAX_NEW_TOKENS[kind.split("_")[0]])
                for (_, scene, prompt), text in zip(chunk, texts):
                    bad, off = problems(text, prompt, (scene.size, scene.size), codec)
                    answers, malformed, off_label = answers + 1, malformed + bad, off_label + off
            mode = "constrained" if constrain else "unconstrained"
            summary[f"{mode}/{kind}"] = {"answers": answers, "malformed": malformed, "unasked_label": off_label}
            print(f"{mode:13} {kind:13} {answers:5} answers, {malformed:4} malformed, {off_label:3} with a label "
                  f"not asked for ({time.perf_counter() - start:.0f} s)", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
