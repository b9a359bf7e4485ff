#!/bin/sh
# One LoRA step (rank 8, batch 1, 224 px image + 32 tokens, gradient checkpointing) on random-weight PaliGemma 3B.
# Run from the repository root; one configuration at a time (each in its own worker process).
cd "$(dirname "$0")/../../.."
python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa native --steps 3
python benchmarks/bench_finetune.py --models pg1 --bases int4,float32 --isa avx2 --steps 2
python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa native --steps 3
