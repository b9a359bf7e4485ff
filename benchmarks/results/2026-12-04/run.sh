#!/usr/bin/env bash
# The runs behind BENCHMARKS.md's per-ISA tables (2026-12-04), on the 2-core AMD EPYC (Zen 4, AVX-512 +
# AVX512-BF16) benchmark machine, idle. --isa avx2 emulates an AVX2-only CPU on both sides (see
# bench_inference.py). Outputs: *.md (tables), *.log (per-worker figures), *.json (raw).
set -u
cd "$(dirname "$0")/../../.."
R=benchmarks/results/2026-12-04
run() {  # name, bench_inference arguments...
    local name=$1; shift
    python benchmarks/bench_inference.py "$@" --json-out $R/$name.json > $R/$name.md 2> $R/$name.log
}
run avx2-pg1-2threads --models pg1 --dtypes bf16 --quantize int8,int4 --reference-fp32 --threads 2 --repeats 1 --inner 1 --isa avx2
run avx2-pg2-2threads --models pg2 --dtypes bf16 --quantize int8,int4 --reference-fp32 --threads 2 --repeats 1 --inner 1 --isa avx2
run avx512bf16-pg1-2threads --models pg1 --dtypes bf16 --quantize int8,int4 --threads 2 --repeats 1 --inner 1 --isa avx512bf16 --batch8 bf16,int8,int4
run avx2-pg1-1thread --models pg1 --dtypes bf16 --quantize int8,int4 --threads 1 --repeats 1 --inner 1 --isa avx2
python benchmarks/bench_kernels.py --threads 1 --repeats 9 --rows 1,8 --isa avx512bf16 > $R/kernels-avx512bf16-1thread.md 2>&1
