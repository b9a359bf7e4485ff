"""Decode-kernel microbenchmark: one weight matrix times 1-8 vectors, at PaliGemma's shapes.

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 15] [--isa avx2]

Prints a markdown table of median milliseconds and the weight bytes streamed per second for torch's
bf16 `F.linear` and this project's kernels at the chosen ISA level (kernels.py): bf16 (`gemv_bf16`),
int8 (`gemv_int8`, group 256, 1 byte per weight) and int4 (`gemv_int4`, group 64, 0.5 byte per
weight), and torch's own int4 kernel on the same bytes where its layout is ours (AVX-512 torch),
interleaved so that drift hits all alike. Random weights (std 0.02); a timing needs nothing else.
Never imported by the tests.
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

from paligemma import kernels  # noqa: E402
from paligemma.quantize import _packs_like_torch, quantize_int4, quantize_int8  # noqa: E402

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
    parser.add_argument("--isa", choices=kernels.LEVELS[:-1], help="cap the kernels' level (default: the CPU's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with kernels.use_level(args.isa or kernels.level()):
        ops = kernels.ops()
    if ops is None:
        raise SystemExit(f"no kernels at ISA level {args.isa or kernels.level()} here (CPU or compiler)")
    torch_int4 = _packs_like_torch()
    print(f"kernels {ops.isa()}, threads {args.threads}, median of {args.repeats}; ms (weight GB/s)\n")
    print("| weight (N x K) | rows | F.linear bf16 | ours bf16 | ours int8 | ours int4 | torch int4 |")
    print("|---|---|---|---|---|---|---|")
    for n, k, name in SHAPES:
        weight = (torch.randn(n, k) * 0.02).bfloat16()
        qweight, scales = quantize_int8(weight, 256, ops)
        packed, scales_zeros = quantize_int4(weight, 64)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k).bfloat16()
            repeats = max(3, args.repeats // 4) if n * k > 1e8 else args.repeats
            candidates = [(lambda: F.linear(x, weight), 2), (lambda: ops.gemv_bf16(x, weight), 2),
                          (lambda: ops.gemv_int8(x, qweight, scales), 1),
                          (lambda: ops.gemv_int4(x, packed, scales_zeros), 0.5)]
            if torch_int4:
                candidates.append((lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, scales_zeros),
                                   0.5))
            cells = []
            for fn, bytes_per_weight in candidates:
                ms = _median(fn, repeats) * 1e3
                cells.append(f"{ms:.2f} ({n * k * bytes_per_weight / ms / 1e6:.0f})")
            cells += ["-"] * (5 - len(cells))
            print(f"| {name} ({n} x {k}) | {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
