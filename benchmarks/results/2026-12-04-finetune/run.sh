#!/bin/sh
# One LoRA step (rank 8, batch 1, 224 px image + 32 tokens, gradient checkpointing) on random-weight PaliGemma 3B.
# Run from anywhere; one configuration at a time (each in its own worker process). Check `free -g` first:
# the float32 rows need ~14 GiB.
cd "$(dirname "$0")/../../.."
# Run on 2026-12-04 (pg1-native.log), on a machine shared with other jobs:
python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16 --isa native --steps 3
# Not run yet (session time; memory held by other jobs):
# python benchmarks/bench_finetune.py --models pg1 --bases float32 --isa native --steps 3
# python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 2
# python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa native,avx2 --steps 2
