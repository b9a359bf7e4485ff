"""Fine-tuning benchmark: peak RSS and seconds per step of one LoRA step on a full-size PaliGemma.

    python benchmarks/bench_finetune.py --models pg1,pg2 --bases float32,bfloat16,int8,int4 --isa native,avx2

One step = forward and backward of batch 1 (one 224 px image + 32 text tokens: 16 prompt, 16 answer),
gradient checkpointing on, LoRA rank 8 on the decoder's projections, then AdamW on the adapters.
Bases: float32 and bfloat16 load the checkpoint in that dtype; int8 and int4 load it in bf16 and
replace the decoder projections by our quantized layers (finetune.lora.quantize_base: QLoRA), so
the vision tower, projector and embedding table stay bf16. As in `paligemma finetune`, bf16 weights
on a CPU without native bf16 compute in float32 (finetune/widening.py). Each (model, base, ISA) runs in a fresh
worker process (peak RSS is its ru_maxrss, loading included); `--steps` steps, the first one a
warm-up, the reported s/step the median of the others, with the CPU seconds the process used per step
(all threads together: what a shared machine's wall-clock time hides).

`--isa avx2` caps our kernels (PALIGEMMA_ISA) and makes torch, oneDNN and MKL run their AVX2 code
(bench_inference.ISA_EMULATION), as an AVX2-only CPU would run them; `native` is this CPU's best.
The random checkpoints are bench_inference.py's (`--prepare` writes them). Prints one JSON line per
run and a markdown table. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository's paligemma, installed or not
from bench_inference import checkpoint_dir, isa_environment  # noqa: E402

PROMPT_TOKENS, ANSWER_TOKENS = 16, 16


def worker(model_name: str, base: str, steps: int, rank: int) -> dict:
    import resource

    import torch

    from paligemma.finetune.lora import apply_lora, quantize_base
    from paligemma.finetune.schedule import build_optimizer
    from paligemma.finetune.step import train_step
    from paligemma.finetune.widening import needs_widening, widen_bf16
    from paligemma.kernels import level
    from paligemma.loading import load_model
    from paligemma.model import IGNORE_INDEX

    started = time.perf_counter()
    dtype = torch.float32 if base == "float32" else torch.bfloat16
    model = load_model(checkpoint_dir(model_name), dtype=dtype)
    if base in ("int8", "int4"):
        quantize_base(model, base)
    apply_lora(model, rank=rank)
    if needs_widening(model):  # as the trainer does: bf16 weights on a CPU without native bf16
        widen_bf16(model)
    model.vision_tower.gradient_checkpointing = model.language_model.gradient_checkpointing = True
    model.train()
    load_s = time.perf_counter() - started
    load_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # the peak while loading

    config = model.config
    g = torch.Generator().manual_seed(0)
    n = config.num_image_tokens
    text = torch.randint(3, config.image_token_index, (1, PROMPT_TOKENS + ANSWER_TOKENS), generator=g)
    input_ids = torch.cat([torch.full((1, n), config.image_token_index), text], dim=1)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, n + PROMPT_TOKENS:] = 1
    batch = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=torch.ones_like(input_ids),
                 labels=torch.where(token_type_ids == 1, input_ids, IGNORE_INDEX),
                 pixel_values=torch.rand(1, 3, config.vision.image_size, config.vision.image_size, generator=g))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, 1e-4, 0.0)
    times, cpu_times, losses = [], [], []
    for _ in range(steps):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        loss, _ = train_step(model, [batch], params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
        cpu_times.append(time.process_time() - cpu_tick)
        losses.append(loss)
    return {"model": model_name, "base": base, "isa": level(), "threads": torch.get_num_threads(),
            "load_s": round(load_s, 1), "step_s": [round(t, 2) for t in times],
            "s_per_step": round(statistics.median(times[1:] or times), 2), "losses": losses,
            "cpu_s_per_step": round(statistics.median(cpu_times[1:] or cpu_times), 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
            "load_peak_rss_gib": round(load_rss_gib, 2),
            "trainable": sum(p.numel() for p in params)}


def run_one(model_name: str, base: str, isa: str, steps: int, rank: int, threads: int | None = None) -> dict:
    env = dict(os.environ, **isa_environment(None if isa == "native" else isa))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the worker
    cmd = [sys.executable, __file__, "--worker", model_name, base, str(steps), str(rank)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model_name, "base": base, "isa": isa, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="pg1,pg2")
    parser.add_argument("--bases", default="float32,bfloat16,int8,int4")
    parser.add_argument("--isa", default="native,avx2", help="comma-separated: native and/or avx2, none")
    parser.add_argument("--steps", type=int, default=3, help="steps per run; the first is a warm-up")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's, one per core); 1 measures CPU seconds "
                             "free of other jobs' contention, which slows every parallel op's thread barrier")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, base, steps, rank = args.worker
        print(json.dumps(worker(name, base, int(steps), int(rank))))
        return
    rows = []
    for isa in args.isa.split(","):
        for name in args.models.split(","):
            for base in args.bases.split(","):
                row = run_one(name, base, isa, args.steps, args.rank, args.threads)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| model | base | ISA | peak RSS (GiB) | s/step | CPU s/step | load (s) |\n|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['base']} | {row['isa']} | failed: {row['error']} | | | |")
        else:
            print(f"| {row['model']} | {row['base']} | {row['isa']} | {row['peak_rss_gib']} | {row['s_per_step']} "
                  f"| {row.get('cpu_s_per_step', '')} | {row['load_s']} |")


if __name__ == "__main__":
    main()
