#!/bin/bash
# Issue 21: the same seeded workloads against the continuous scheduler (this checkout) and the static
# one it replaced (a worktree of 95576de: git worktree add --detach /tmp/old 95576de), then paligemma batch.
# Run from the repository root. Outputs: load-*.txt and batch-*.txt beside this script.
set -e
OUT=benchmarks/results/2026-12-04-serving
MIX=(--mix "describe en:48:1" --mix "caption en:24:1" --mix "answer en how many circles are there?:8:2")
OPEN=(--rate 3 --duration 60 --stream --seed 1 "${MIX[@]}")
for round in 1 2; do
  python benchmarks/load_test.py "${OPEN[@]}" > $OUT/load-after_$round.txt 2>&1
  python benchmarks/load_test.py --server-root /tmp/old "${OPEN[@]}" > $OUT/load-before_$round.txt 2>&1
done
CLOSED=(--clients 8 --duration 60 --stream --seed 1 "${MIX[@]}")
python benchmarks/load_test.py "${CLOSED[@]}" > $OUT/load-after_closed.txt 2>&1
python benchmarks/load_test.py --server-root /tmp/old "${CLOSED[@]}" > $OUT/load-before_closed.txt 2>&1
python benchmarks/load_test.py "${CLOSED[@]}" -- --prefill-layers-per-step 1 > $OUT/load-after_closed_layers1.txt 2>&1
# paligemma batch: 200 held-out demo scenes, "caption en" (rows.jsonl made by make_scenes.py)
python $OUT/make_scenes.py /tmp/bm 200
( time python -m paligemma batch --input /tmp/bm/rows.jsonl --out /tmp/bm/out0.jsonl --batch-size 8 --no-progress ) \
    > $OUT/batch-1process-2threads.txt 2>&1  # torch's default 2 threads on a machine others kept busy
( time OMP_NUM_THREADS=1 python -m paligemma batch --input /tmp/bm/rows.jsonl --out /tmp/bm/out1.jsonl --batch-size 8 \
    --no-progress ) > $OUT/batch-1process.txt 2>&1
( time OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m paligemma batch --input /tmp/bm/rows.jsonl \
    --out /tmp/bm/out2.jsonl --batch-size 8 --no-progress ) > $OUT/batch-2processes.txt 2>&1
cmp /tmp/bm/out1.jsonl /tmp/bm/out2.jsonl && echo "outputs equal" >> $OUT/batch-2processes.txt
