"""Where a decode step's time goes: torch.profiler over a few batch-1 steps of a full-size checkpoint.

    python benchmarks/profile_decode.py --model pg1 --dtype bf16 [--optimize] [--quantize int4]

Uses the random-weight checkpoints written by bench_inference.py (benchmarks/cache/).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import DTYPES, _inputs, checkpoint_dir  # noqa: E402

from paligemma.loading import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="pg1")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--optimize", action="store_true")
    parser.add_argument("--quantize")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(checkpoint_dir(args.model), dtype=getattr(torch, DTYPES[args.dtype]),
                       optimize=args.optimize, quantize=args.quantize)
    ids, mask, pixels = _inputs(model.config, args.batch)
    with torch.inference_mode():
        cache = model.new_cache(args.batch, ids.shape[1] + 2 * args.steps + 4)
        logits = model.prefill(ids, mask, cache, image_features=model.encode_images(pixels))
        positions = mask.sum(-1)
        for _ in range(3):  # warm-up
            positions = positions + 1
            logits = model.decode_step(logits.argmax(-1), positions, cache)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                positions = positions + 1
                logits = model.decode_step(logits.argmax(-1), positions, cache)
        elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.2f} s (profiled): {args.steps * args.batch / elapsed:.2f} tok/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
