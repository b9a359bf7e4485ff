#!/usr/bin/env bash
# PaliGemma 2 10B and 28B (issue 24) on the 2-core, 24 GB benchmark VM, ours only. The VM was shared with
# other work during these runs (load average 10-15 on 2 cores): timings are disturbed, RSS is not.
# One thread: under that load, torch's two-thread parallel regions stall (int4 quantizing 42 M weights:
# 1.9 s at 1 thread, 33 s at 2). Run one step at a time, in the background, after checking `free -g`
# (28B needs >= 20 GB available); each step's outputs: NAME.md (table), NAME.log (per worker), NAME.json.
# Disk: 10B needs ~37 GB (bf16 + int4 + int8), 28B ~73 GB (bf16 + int4): remove the 10B and 3B caches
# (benchmarks/cache/, regenerable) before the 28B steps.
set -u
cd "$(dirname "$0")/../../.."
R=benchmarks/results/2026-12-04-bigmodels
step() {  # name, bench_inference arguments...
    local name=$1; shift
    free -g > $R/$name.free
    python benchmarks/bench_inference.py --no-transformers --threads 1 --repeats 1 --inner 1 "$@" \
        --json-out $R/$name.json > $R/$name.md 2> $R/$name.log
}
case "${1:-}" in
    10b-prepare) step 10b-prepare --models pg2-10b --saved int4,int8 --prepare ;;  # bf16 streamed; paligemma quantize x2
    10b-bf16-load) step 10b-bf16-load --models pg2-10b --dtypes bf16 --quantize '' --load-only --no-optimize ;;
    10b) step 10b --models pg2-10b --dtypes '' --quantize int4,int8 --saved int4,int8 --new-tokens 16 ;;
    10b-r2) step 10b-r2 --models pg2-10b --dtypes '' --quantize int4,int8 --new-tokens 16 ;;  # after the block-by-block page release
    28b-prepare) step 28b-prepare --models pg2-28b --saved int4 --prepare ;;
    28b-bf16-load) step 28b-bf16-load --models pg2-28b --dtypes bf16 --quantize '' --load-only --no-optimize ;;
    28b) step 28b --models pg2-28b --dtypes '' --quantize int4 --saved int4 --new-tokens 8 ;;
    28b-2threads) step 28b-2threads --models pg2-28b --dtypes '' --quantize '' --saved int4 --new-tokens 16 --threads 2 ;;  # the VM idle
    28b-bf16-load-2threads) step 28b-bf16-load-2threads --models pg2-28b --dtypes bf16 --quantize '' --load-only --no-optimize --threads 2 ;;
    # The VM idle again: 10B once more at 2 threads (the 28B files removed first, for disk space).
    10b-2threads) step 10b-2threads --models pg2-10b --dtypes '' --quantize int4,int8 --saved int4,int8 --new-tokens 16 --threads 2 ;;
    10b-bf16-load-2threads) step 10b-bf16-load-2threads --models pg2-10b --dtypes bf16 --quantize '' --load-only --no-optimize --threads 2 ;;
    *) echo "usage: $0 10b-prepare|10b-bf16-load|10b|10b-r2|28b-prepare|28b-bf16-load|28b|28b-2threads|28b-bf16-load-2threads|10b-2threads|10b-bf16-load-2threads" >&2; exit 2 ;;
esac
