#!/usr/bin/env bash
# Third round (2026-12-04): ours on the emulated AVX2 CPU after decoder attention moved to float32 there.
set -u
cd "$(dirname "$0")/../../.."
R=benchmarks/results/2026-12-04
python benchmarks/bench_inference.py --models pg1 --dtypes bf16 --quantize int8,int4 --no-transformers --threads 2 \
    --repeats 1 --inner 1 --isa avx2 --json-out $R/avx2-pg1-2threads-r3.json > $R/avx2-pg1-2threads-r3.md \
    2> $R/avx2-pg1-2threads-r3.log
