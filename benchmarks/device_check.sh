#!/bin/bash
# One call on a lent CUDA machine (the `device` tool), everything that needs the GPU, in one go:
#   1. tests/test_device.py (parity with transformers, greedy generation, a fine-tuning step: full, LoRA,
#      QLoRA) on CPU and CUDA;
#   2. the demo model's multi-class stage (paligemma/demo_model/README.md), trained on the GPU from the
#      bundled model for as many steps as TRAIN_SECONDS allows (a 40-step calibration run picks the
#      count, a multiple of 250, at most MAX_STEPS), concurrently with 1;
#   3. `paligemma demo-eval --device cuda` of the trained weights and of the bundled model (the model
#      card's 500 held-out scenes), after 2;
#   4. bench_inference.py --device cuda on PaliGemma 1 3B bf16, ours against transformers, last (so that
#      nothing else uses the GPU while it is timed).
# To $OUT (at most 8 files come back, 16 MiB each): progress.log, logs.tar.gz (every log, re-packed after
# each phase), bench.md, and the trained weights split into 12 MiB parts with their sha256.
# Run from the repository root: bash benchmarks/device_check.sh
set -u
OUT=${OUT:-/tmp/device_out}
L=/tmp/device_logs
mkdir -p "$OUT" "$L"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
MAX_STEPS=${MAX_STEPS:-6000}
WORKERS=${WORKERS:-12}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu BENCH=0 TRAIN_SECONDS=30 WORKERS=2: a smoke run of this script on a CPU machine
BENCH=${BENCH:-1}
began=$(date +%s)
log() { echo "[$(($(date +%s) - began)) s] $*" | tee -a "$OUT/progress.log"; }
pack() { tar czf "$OUT/logs.tar.gz" -C "$L" . 2>/dev/null; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"; } >"$L/machine.txt" 2>&1
log "machine: $(tr '\n' ' ' <"$L/machine.txt")"

# --- 2. demo training: calibrate, then the real run in the background
stage=(--init paligemma/demo_model --multiclass --lr 3e-4 --warmup-steps 100 --first-scene 700000
       --device "$DEVICE" --num-workers "$WORKERS")
python3 -m paligemma.demo.train --out /tmp/calibrate "${stage[@]}" --steps 40 --save-every 0 --eval-every 0 \
    >"$L/calibrate.log" 2>&1
per_step=$(python3 -c "
import json
rows = [json.loads(l) for l in open('/tmp/calibrate/metrics.jsonl') if '\"loss\"' in l]
print((rows[-1]['elapsed'] - rows[0]['elapsed']) / (rows[-1]['step'] - rows[0]['step']))" 2>>"$L/calibrate.log")
steps=$(python3 -c "print(max(250, min($MAX_STEPS, int($TRAIN_SECONDS * 0.9 / ${per_step:-1} / 250) * 250)))")
log "calibration: ${per_step:-failed} s/step -> $steps steps"
pack
timeout $((TRAIN_SECONDS + 60)) python3 -m paligemma.demo.train --out /tmp/demo7 "${stage[@]}" --steps "$steps" \
    --save-every 250 --eval-every 1000 >"$L/train.log" 2>&1 &
trainer=$!

# --- 1. the device tests, while it trains
timeout 240 python3 -m pytest tests/test_device.py -q -p no:cacheprovider -rs >"$L/test_device.log" 2>&1
log "test_device rc $?: $(tail -1 "$L/test_device.log")"
pack
if [ "$BENCH" = 1 ]; then
    timeout 200 python3 benchmarks/bench_inference.py --models pg1 --prepare >"$L/bench_prepare.log" 2>&1
    log "bench checkpoint written, rc $?"
fi

wait $trainer
log "training rc $?: $(tail -c 300 /tmp/demo7/metrics.jsonl | tail -1)"
latest=$(ls -d /tmp/demo7/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
if [ -n "$latest" ]; then
    log "weights from $latest"
    split -b 12M "$latest/model.safetensors" "$OUT/model.safetensors.part-"
    sha256sum "$latest/model.safetensors" >"$OUT/model.sha256"
fi
cp /tmp/demo7/metrics.jsonl "$L/train_metrics.jsonl" 2>/dev/null
pack
# the trained weights and the bundled model scored on the GPU, 500 held-out scenes each (the model card's table)
if [ -n "$latest" ]; then
    timeout 240 python3 -m paligemma demo-eval --model "$latest" --device "$DEVICE" --json \
        >"$L/eval_trained.json" 2>"$L/eval_trained.err"
    log "demo-eval of $latest rc $?"
    pack
fi
timeout 240 python3 -m paligemma demo-eval --device "$DEVICE" --json >"$L/eval_bundled.json" 2>"$L/eval_bundled.err"
log "demo-eval of the bundled model rc $?"
pack

# --- 4. inference benchmark on the GPU, alone
if [ "$BENCH" = 1 ]; then
    timeout 240 python3 benchmarks/bench_inference.py --device cuda --models pg1 --dtypes bf16 --quantize '' \
        --repeats 1 --inner 3 --batch8 bf16 --threads 8 --new-tokens 128 --json-out "$L/bench.json" \
        >"$OUT/bench.md" 2>"$L/bench.err"
    log "bench rc $?"
    cp "$OUT/bench.md" "$L/"
    pack
    cat "$OUT/bench.md"
fi
log done
