#!/bin/sh
# One LoRA step (rank 8, batch 1, 224 px image + 32 tokens, gradient checkpointing) on random-weight PaliGemma 3B.
# Run from anywhere; one configuration at a time (each in its own worker process). Check `free -g` first:
# the float32 rows need ~13 GiB. The machine (2 cores, 24 GB) was shared with other jobs: CPU seconds and
# peak RSS are the figures to read; wall seconds depend on the others' load.
cd "$(dirname "$0")/../../.."
R=benchmarks/results/2026-12-04-finetune

# Round 1, at 5656c80 (full (B, T, V) logits, int4 quantized on 2 threads, glibc's default malloc threshold):
#   python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16 --isa native --steps 3  # pg1-native.log

# Round 2, intermediate (kept for the record; superseded by round 3):
#   at 3c85937 (logits of the labelled positions only; int4 quantized on one thread):
#   python benchmarks/bench_finetune.py --models pg1 --bases float32 --isa native --steps 2            # pg1-float32-native.log
#   python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16 --isa native --steps 2 # pg1-native-after.log
#   at cf00067 (train_step sets glibc's mmap threshold, then 4 MiB):
#   python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa native --steps 2  # pg1-native-r3.log
#   python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 2    # pg1-avx2.log
#   python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa native --steps 2  # pg2-native.log
#   python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 2    # pg2-avx2.log

# Round 3, at b48bac7 (mmap threshold 1 MiB); the first pass of the last command stopped after 3 rows:
python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa native --steps 3 > $R/pg1-native-final.log
python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 3 > $R/pg1-avx2-final.log
python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa native --steps 2 > $R/pg2-native-final.log
python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 2 > $R/pg2-avx2-final.log
# Round 3, repeats of pg2 at avx2 (the float32 row's process was killed from outside in the first pass):
python benchmarks/bench_finetune.py --models pg2 --bases float32,int8 --isa avx2 --steps 2 > $R/pg2-avx2-final-b.log
python benchmarks/bench_finetune.py --models pg2 --bases int4,int8 --isa avx2 --steps 2 > $R/pg2-avx2-final-c.log

# Round 4, at 95b3ed6 (mmap threshold 2 MiB, the code as committed), as far as the session's time went:
python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 2 > $R/pg2-avx2-2mib.log
python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa native --steps 2 > $R/pg1-native-2mib.log
python benchmarks/bench_finetune.py --models pg1 --bases int4,int8,bfloat16,float32 --isa avx2 --steps 2 > $R/pg1-avx2-2mib.log
python benchmarks/bench_finetune.py --models pg2 --bases int4,int8,bfloat16,float32 --isa native --steps 2 > $R/pg2-native-2mib.log
# One thread (no contention between torch's threads), pg1 at avx2, at 95b3ed6:
python benchmarks/bench_finetune.py --models pg1 --bases float32,int4,bfloat16 --isa avx2 --steps 2 --threads 1 > $R/pg1-avx2-1thread.log
