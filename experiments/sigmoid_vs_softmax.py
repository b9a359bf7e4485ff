"""The SigLIP paper's loss comparison in miniature: sigmoid vs softmax at several batch sizes.

    OMP_NUM_THREADS=1 python experiments/sigmoid_vs_softmax.py --out runs/sigmoid_vs_softmax

Trains one small dual encoder (paligemma.contrastive) per (loss, batch size) on shapes-world
image/caption pairs, all with the same number of steps, schedule and seed, evaluates each on the
same held-out scenes (zero-shot classification of one-object scenes among 18 captions, retrieval
recall@1 among 1000 scenes), and writes:

- `out/results.json`: one row per run, with the final scores;
- `docs/assets/sigmoid_vs_softmax.png`: scores against batch size, one line per loss (needs
  matplotlib: `pip install matplotlib`);
- a markdown table on stdout (pasted into docs/contrastive.md).

Runs that already finished (their metrics.jsonl ends with an evaluation at the last step) are
read back instead of retrained, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paligemma.config import VisionConfig
from paligemma.demo.pretrain_vision import pretrain

# A tower smaller than the demo model's, fed scenes drawn directly at its 64 px, so that the 6 runs
# take about half an hour on one core.
EXPERIMENT_TOWER = VisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                                num_attention_heads=2, patch_size=8, image_size=64)
METRICS = ("zero_shot_accuracy", "zero_shot_shape_accuracy", "image_to_text_r1", "text_to_image_r1")


def finished_scores(run_dir: Path, steps: int) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "zero_shot_accuracy" in r]
    return evals[-1] if evals and evals[-1]["step"] == steps else None


def markdown_table(results: list[dict]) -> str:
    lines = ["| loss | batch | zero-shot acc. | zero-shot shape acc. | image->text R@1 | text->image R@1 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['loss']} | {r['batch_size']} | " + " | ".join(f"{100 * r[m]:.1f}%" for m in METRICS) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"zero_shot_accuracy": "zero-shot accuracy (18 classes)", "image_to_text_r1": "image->text recall@1"}
    figure, axes = plt.subplots(1, len(titles), figsize=(10, 3.8))
    for axis, (metric, title) in zip(axes, titles.items()):
        for loss, style in (("sigmoid", "o-"), ("softmax", "s--")):
            rows = sorted((r for r in results if r["loss"] == loss), key=lambda r: r["batch_size"])
            axis.plot([r["batch_size"] for r in rows], [100 * r[metric] for r in rows], style, label=loss)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({r["batch_size"] for r in results}),
                        labels=[str(b) for b in sorted({r["batch_size"] for r in results})])
        axis.set_xlabel("batch size")
        axis.set_ylabel("%")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Sigmoid vs softmax contrastive loss, same steps (shapes world)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--plot", type=Path, default=Path("docs/assets/sigmoid_vs_softmax.png"))
    args = parser.parse_args(argv)

    results = []
    for batch_size in args.batch_sizes:
        for loss in ("sigmoid", "softmax"):
            run_dir = args.out / f"{loss}-b{batch_size}"
            scores = finished_scores(run_dir, args.steps)
            if scores is None:
                scores = pretrain(run_dir, loss=loss, batch_size=batch_size, steps=args.steps, lr=args.lr,
                                  warmup_steps=args.steps // 10, eval_every=args.steps, eval_scenes=1000,
                                  vision=EXPERIMENT_TOWER, scene_size=EXPERIMENT_TOWER.image_size,
                                  log=lambda line: None)
            results.append({"loss": loss, "batch_size": batch_size, "steps": args.steps,
                            **{k: v for k, v in scores.items() if k != "step"}})
            print(f"{loss:8s} batch {batch_size:4d}: " + ", ".join(f"{m} {scores[m]:.3f}" for m in METRICS), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(results))
    plot(results, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
