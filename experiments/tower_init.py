"""Does a contrastively pretrained vision tower help the demo PaliGemma? Same steps, same data, two starts.

    OMP_NUM_THREADS=1 python experiments/tower_init.py --out runs/tower_init

1. Pretrains the demo's tower (112 px, patch 14) as a SigLIP dual encoder (sigmoid loss) on
   shapes-world image/caption pairs (`paligemma.demo.pretrain_vision`), unless already done.
2. Trains the demo PaliGemma for `--steps` steps twice with the same seed and data: vision tower
   from random weights ("scratch") and from the pretrained tower ("pretrained").
3. Scores both with `evaluate_demo` on the same held-out scenes and prints a markdown table, plus
   the held-out loss of the training probe. Results go to `out/results.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paligemma.demo import pretrain_vision, train
from paligemma.demo.evaluate import evaluate_demo
from paligemma.loading import load_model
from paligemma.processor import load_processor


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r][-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--scenes", type=int, default=100)
    args = parser.parse_args(argv)

    tower = args.out / "tower"
    if not (tower / "vision_tower.safetensors").exists():
        pretrain_vision.pretrain(tower, steps=args.pretrain_steps, batch_size=64, warmup_steps=30,
                                 eval_every=args.pretrain_steps, eval_scenes=500)
    tower_scores = [json.loads(line) for line in (tower / "metrics.jsonl").read_text().splitlines()][-1]

    results = {"tower": tower_scores, "runs": {}}
    for name, extra in (("scratch", []), ("pretrained", ["--vision-init", str(tower / "vision_tower.safetensors")])):
        run = args.out / name
        if not (run / "final" / "model.safetensors").exists():
            train.main(["--out", str(run), "--steps", str(args.steps), "--warmup-steps", str(args.steps // 10),
                        "--eval-every", str(args.steps), "--save-every", str(args.steps), *extra])
        model, processor = load_model(run / "final"), load_processor(run / "final")
        scores = evaluate_demo(model, processor, num_scenes=args.scenes).as_dict()
        results["runs"][name] = {"probe": last_eval(run), "scores": scores}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    metrics = list(results["runs"]["scratch"]["scores"])
    print(f"| after {args.steps} steps | " + " | ".join(results["runs"]) + " |")
    print("|---|" + "---|" * len(results["runs"]))
    print("| held-out probe loss | " + " | ".join(f"{r['probe']['eval_loss']:.3f}" for r in results["runs"].values())
          + " |")
    for metric in metrics:
        values = [r["scores"][metric] for r in results["runs"].values()]
        if all(isinstance(v, float) for v in values):
            print(f"| {metric} | " + " | ".join(f"{100 * v:.1f}%" for v in values) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
