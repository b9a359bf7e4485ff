#!/usr/bin/env bash
# Second round (2026-12-04), after run.sh: ours only, with the int4 kernels' scales loaded as vectors and
# every worker started with the checkpoint in the page cache (run.sh's first ours-bf16 AVX-512 worker and
# PaliGemma 2 int8 worker timed the disk: their load and cold start figures are superseded by these).
set -u
cd "$(dirname "$0")/../../.."
R=benchmarks/results/2026-12-04
run() {  # name, bench_inference arguments...
    local name=$1; shift
    python benchmarks/bench_inference.py "$@" --json-out $R/$name.json > $R/$name.md 2> $R/$name.log
}
run avx2-quantized-2threads-r2 --models pg1,pg2 --dtypes '' --quantize int8,int4 --no-transformers --threads 2 --repeats 1 --inner 1 --isa avx2
run avx512bf16-pg1-2threads-r2 --models pg1 --dtypes bf16 --quantize '' --no-transformers --threads 2 --repeats 1 --inner 1 --isa avx512bf16 --batch8 bf16
run avx512bf16-pg1-1thread-r2 --models pg1 --dtypes bf16 --quantize int8,int4 --no-transformers --threads 1 --repeats 1 --inner 1 --isa avx512bf16
