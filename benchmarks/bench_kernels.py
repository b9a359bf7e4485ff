"""Decode-kernel microbenchmark: one weight matrix times 1-8 vectors, at PaliGemma's shapes.

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 15]

Prints a markdown table of median milliseconds and the weight bytes streamed per second for torch's
bf16 `F.linear`, this project's bf16 kernel (`kernels.gemv_bf16`) and its int8 weight-only kernel
(`kernels.gemv_int8`, group 256, 1 byte per weight), interleaved so that drift hits all three alike.
Random weights (std 0.02); a timing needs nothing else. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import _median  # noqa: E402
from paligemma.kernels import gemv_bf16, gemv_int8  # noqa: E402
from paligemma.quantize import quantize_int8  # noqa: E402

# (N, K, what it is) for PaliGemma 1 (Gemma 2B) and PaliGemma 2 3B (Gemma 2 2B) decoders.
SHAPES = [
    (2048, 2048, "pg1 o_proj"),
    (32768, 2048, "pg1 gate+up (fused)"),
    (2048, 16384, "pg1 down"),
    (257216, 2048, "pg1 LM head"),
    (18432, 2304, "pg2 gate+up (fused)"),
    (2304, 9216, "pg2 down"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", default="1,2,8", help="comma list of input rows (batch sizes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if gemv_bf16() is None:
        raise SystemExit("the kernels are unavailable on this machine (no AVX512-BF16 or no compiler)")
    print(f"threads {args.threads}, median of {args.repeats}; ms (weight GB/s)\n")
    print("| weight (N x K) | rows | F.linear bf16 | ours bf16 | ours int8 |")
    print("|---|---|---|---|---|")
    for n, k, name in SHAPES:
        weight = (torch.randn(n, k) * 0.02).bfloat16()
        qweight, scales = quantize_int8(weight, 256)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k).bfloat16()
            repeats = max(3, args.repeats // 4) if n * k > 1e8 else args.repeats
            cells = []
            for fn, bytes_per_weight in ((lambda: F.linear(x, weight), 2), (lambda: gemv_bf16()(x, weight), 2),
                                         (lambda: gemv_int8()(x, qweight, scales), 1)):
                ms = _median(fn, repeats) * 1e3
                cells.append(f"{ms:.2f} ({n * k * bytes_per_weight / ms / 1e6:.0f})")
            print(f"| {n} x {k} ({name}) | {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
