"""Inference benchmark: ours vs transformers' PaliGemmaForConditionalGeneration on the same CPU and files.

    python benchmarks/bench_inference.py --models pg1 --dtypes bf16 --repeats 2 --threads 2,1 [--isa avx2]

Writes full-size random-weight checkpoints (bf16 safetensors, sharded) once into benchmarks/cache/,
then runs every measurement in a fresh worker process, alternating ours and transformers (A B A B)
so that drift in the machine's load hits both alike, and prints a markdown table of medians.

Measured per (model, dtype, implementation):
  load (s)           from_pretrained / load_model, files already in the page cache (read before each worker)
  peak RSS (GB)      the worker's ru_maxrss after everything below
  encode (s)         vision tower + projector, one 224 px image
  prefill (s)        256 image tokens + a 10-token prompt, up to the first token's logits
  decode b1 / b8     tokens/s over 64 new tokens (transformers forced with min_new_tokens)
  cold start (s)     new process: imports, load, encode, prefill, one token
and, for batch-1 decode, the bytes streamed per token divided by the machine's streaming bandwidth
(a 1 GiB tensor sum measured in the same run): the "fraction of the physical limit".

PaliGemma 2 10B and 28B (`--models pg2-10b,pg2-28b`, ours only: `--no-transformers`): the random
checkpoint is streamed to disk a tensor at a time (never the whole model in memory); `--saved int8,int4`
adds rows loaded from quantized checkpoints, written once from the bf16 one by `paligemma quantize`
(its time and peak RSS are printed); `--load-only` measures load time and RSS alone (the bf16 memory
map of a model that does not fit in memory); `--new-tokens` shortens decode. A checkpoint larger than
half the available memory is not read into the page cache before a worker: its load reads the disk.

`--isa avx512bf16|avx2|none` caps this project's kernels (PALIGEMMA_ISA) in every worker; `--isa avx2`
also makes both implementations' torch (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA) and MKL
(MKL_ENABLE_INSTRUCTIONS) run their AVX2 code, so that an AVX-512 machine measures both sides as an
AVX2-only CPU would run them. `--threads 2,1` repeats everything per thread count, one table each.
`--reference-fp32` adds transformers in float32 (what a user without fast bf16 might pick instead).
`--device cuda` runs both implementations on the GPU (timers synchronize it; quantized rows, which are
CPU kernels, are skipped; peak GPU memory is added; the bandwidth probe sums 1 GiB on the GPU).

Random weights give random tokens, which is all a timing needs. Never imported by the tests.
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

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
MODELS = {"pg1": "paligemma-3b-224", "pg2": "paligemma2-3b-224", "pg2-10b": "paligemma2-10b-224",
          "pg2-28b": "paligemma2-28b-224"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PROMPT_LEN = 10  # <bos> + 8 text tokens + "\n"
NEW_TOKENS = 64


# ---------------------------------------------------------------------- checkpoints

def checkpoint_dir(model: str, quantized: str | None = None) -> Path:
    return CACHE / f"{model}-random-{quantized or 'bf16'}"


def ensure_checkpoint(model: str) -> Path:
    """Write a random-weight bf16 checkpoint of the full-size preset, once, a tensor at a time: memory
    holds one tensor (28B's embedding table, 2.4 GB, at most), never the model."""
    directory = checkpoint_dir(model)
    if (directory / "config.json").exists():
        return directory
    import resource

    import torch

    from paligemma.checkpoint_layout import checkpoint_config, hub_key
    from paligemma.config import PaliGemmaConfig
    from paligemma.model import PaliGemma
    from paligemma.safetensors_io import StreamedCheckpoint, new_folder

    print(f"writing {directory} (random weights, bf16)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with torch.device("meta"):
        skeleton = PaliGemma(PaliGemmaConfig.from_preset(MODELS[model])).to(torch.bfloat16)
    layout = {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}
    # N(0, 0.02) values cycled from a 16 M-entry pool (normal_ costs ~20 ns an entry: 10 minutes for 28B);
    # biases and RMSNorm weights (scale 1 + w) 0, SigLIP's LayerNorm weights 1, as init_weights makes them.
    pool = torch.empty(1 << 24, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    with new_folder(directory) as tmp:
        writer = StreamedCheckpoint(tmp, {hub_key(name): spec for name, spec in layout.items()}, 2 * 1024**3)
        for number, (name, (shape, dtype)) in enumerate(layout.items()):
            tensor = torch.empty(shape, dtype=dtype)
            if len(shape) > 1:
                flat, done, offset = tensor.view(-1), 0, (number * 7919) % pool.numel()
                while done < flat.numel():
                    take = min(pool.numel() - offset, flat.numel() - done)
                    flat[done:done + take].copy_(pool[offset:offset + take])
                    done, offset = done + take, 0
            else:
                tensor.fill_(1.0 if name.startswith("vision_tower") and "norm" in name and name.endswith("weight")
                             else 0.0)
            writer.write(hub_key(name), tensor)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(checkpoint_config(skeleton), indent=2) + "\n", encoding="utf-8")
    size = sum(path.stat().st_size for path in directory.iterdir())
    print(f"wrote {directory}: {size / 1024**3:.1f} GiB in {time.perf_counter() - start:.0f} s, peak RSS of this "
          f"process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB", file=sys.stderr,
          flush=True)
    return directory


def ensure_quantized(model: str, mode: str, threads: int) -> Path:
    """The bf16 checkpoint quantized once by `paligemma quantize` on `threads` threads (its time and peak
    RSS printed)."""
    directory = checkpoint_dir(model, mode)
    if not (directory / "config.json").exists():
        source = ensure_checkpoint(model)
        proc = subprocess.run([sys.executable, "-m", "paligemma", "quantize", "--model", str(source), "--to", mode,
                               "--out", str(directory)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS=str(threads)))
        if proc.returncode:
            raise SystemExit(f"paligemma quantize failed: {proc.stderr[-2000:]}")
        print(f"paligemma quantize --to {mode} ({threads} thread(s)): {proc.stdout.strip()}", file=sys.stderr,
              flush=True)
    return directory


# ---------------------------------------------------------------------- worker (one measurement process)

def _rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _inputs(config, batch: int, device: str = "cpu"):
    import torch
    g = torch.Generator().manual_seed(batch)
    n = config.num_image_tokens
    text = torch.randint(1000, 20000, (batch, PROMPT_LEN), generator=g)
    text[:, 0], text[:, -1] = 2, 108  # <bos> ... "\n"
    ids = torch.cat([torch.full((batch, n), config.image_token_index), text], dim=1)
    size = config.vision.image_size
    pixels = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device)


def _synchronizer(device: str):
    """A function that waits for `device`'s queued work (CUDA runs asynchronously), so timers see it done."""
    import torch
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    t_launch = float(os.environ["BENCH_LAUNCH"])
    dtype = getattr(torch, DTYPES[args.dtype])
    directory = checkpoint_dir(args.model, args.quantize if args.saved else None)
    from paligemma.config import PaliGemmaConfig
    config = PaliGemmaConfig.from_json_file(directory / "config.json")
    ids1, mask1, pix1 = _inputs(config, 1, args.device)
    sync = _synchronizer(args.device)
    out = {}
    if args.impl == "ours":
        from paligemma.loading import load_model
        start = time.perf_counter()
        quantize = None if args.saved else args.quantize  # a saved quantized checkpoint loads as it is
        model = load_model(directory, dtype=dtype, quantize=quantize, optimize=not args.no_optimize,
                           device=args.device)
        out["load"] = time.perf_counter() - start
        if args.load_only:
            out["peak_rss_gb"] = _rss_gb()
            return out
        new_tokens = args.new_tokens

        def encode(pixels):
            return model.encode_images(pixels)

        def prefill(ids, mask, feats):
            cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens + 1)
            return model.prefill(ids, mask, cache, image_features=feats), cache

        def decode(ids, mask, feats, steps):
            logits, cache = prefill(ids, mask, feats)
            positions = mask.sum(-1)
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                positions = positions + 1
                logits = model.decode_step(logits.argmax(-1), positions, cache)
            sync()
            return time.perf_counter() - start

        with torch.inference_mode():
            feats = encode(pix1)
            logits, _ = prefill(ids1, mask1, feats)
            int(logits.argmax(-1)[0])
            out["cold_start"] = time.time() - t_launch
            out["encode"] = _median(lambda: encode(pix1), args.inner, sync)
            out["prefill"] = _median(lambda: prefill(ids1, mask1, feats), args.inner, sync)
            out["decode_b1"] = new_tokens / decode(ids1, mask1, feats, new_tokens)
            if args.batch8:
                ids8, mask8, pix8 = _inputs(config, 8, args.device)
                feats8 = encode(pix8)
                out["decode_b8"] = 8 * new_tokens / decode(ids8, mask8, feats8, new_tokens)
        out["weight_bytes"] = _decode_bytes(model)
    else:
        from transformers import PaliGemmaForConditionalGeneration
        start = time.perf_counter()
        model = PaliGemmaForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval().to(args.device)
        sync()
        out["load"] = time.perf_counter() - start

        def generate(ids, mask, pixels, new):
            return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype),
                                  token_type_ids=torch.zeros_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False)

        def timed(f):
            sync()
            start = time.perf_counter()
            f()
            sync()
            return time.perf_counter() - start

        with torch.inference_mode():
            generate(ids1, mask1, pix1, 1)
            out["cold_start"] = time.time() - t_launch
            out["encode"] = _median(lambda: model.model.get_image_features(pix1.to(dtype)), args.inner, sync)
            # prefill = encode + prompt forward + first token, minus the encode timed above
            first = statistics.median(timed(lambda: generate(ids1, mask1, pix1, 1)) for _ in range(args.inner))
            out["prefill"] = first - out["encode"]
            new = args.new_tokens
            out["decode_b1"] = new / (timed(lambda: generate(ids1, mask1, pix1, new + 1)) - first)
            if args.batch8:
                ids8, mask8, pix8 = _inputs(config, 8, args.device)
                first8 = timed(lambda: generate(ids8, mask8, pix8, 1))
                elapsed = timed(lambda: generate(ids8, mask8, pix8, new + 1)) - first8
                out["decode_b8"] = 8 * new / elapsed
        out["weight_bytes"] = _decode_bytes(model)
    out["total_weight_bytes"] = _decode_bytes(model, vision=True)
    out["peak_rss_gb"] = _rss_gb()
    if args.device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def _median(f, n: int, sync) -> float:
    f()  # warm-up
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_bytes(model, vision: bool = False) -> int:
    """Bytes a decode step must stream: the decoder's and LM head's weights (vision tower excluded).

    Counted from what the model holds (quantized and packed tensors at their real size); the tied
    embedding table is read once, as the head (its lookup touches one row).
    """
    import torch
    total = 0
    seen = set()
    for name, module in model.named_modules():
        if not vision and ("vision" in name or "multi_modal_projector" in name):
            continue
        if not vision and name.endswith("embed_tokens") and _has_quantized_head(model):
            continue  # the lookup reads one row; the head streams its own quantized copy
        for tensor in _module_tensors(module):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.data_ptr() if tensor.layout == torch.strided else id(tensor)  # tied = same storage
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _has_quantized_head(model) -> bool:
    return type(getattr(model, "lm_head", None)).__name__ == "QuantizedLinear"


def _module_tensors(module):
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)  # our inference layers hold their weights as buffers


# ---------------------------------------------------------------------- driver

def streaming_bandwidth(threads: int, device: str = "cpu") -> float:
    """GB/s of summing a 1 GiB float32 tensor (best of 5) on `device`, the streaming read limit for this
    thread count (on the CPU) or of the GPU's memory."""
    import torch
    torch.set_num_threads(threads)
    sync = _synchronizer(device)
    x = torch.empty(256 * 1024**2, device=device).uniform_()
    x.sum()
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


# Environment that makes torch, oneDNN and MKL run as on a CPU of the level (an AVX-512 machine emulating AVX2).
ISA_EMULATION = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                          "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def isa_environment(isa: str | None) -> dict:
    if not isa:
        return {}
    return {"PALIGEMMA_ISA": isa, **ISA_EMULATION.get(isa, {})}


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def warm_page_cache(directory: Path) -> bool:
    """Read a checkpoint's files once, so that every worker starts with them in the page cache (a
    float32 transformers worker needs ~17 GB and evicts them; the next load would time the disk).
    Not for files over half the available memory (10B / 28B in bf16): they would not stay. Returns
    whether it read them."""
    paths = sorted(directory.iterdir())
    if sum(path.stat().st_size for path in paths) > available_memory() / 2:
        return False
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    return True


def run_worker(args, impl: str, model: str, dtype: str, quantize: str | None, saved: bool = False) -> dict:
    warmed = warm_page_cache(checkpoint_dir(model, quantize if saved else None))
    cmd = [sys.executable, __file__, "--worker", impl, "--models", model, "--dtypes", dtype, "--device", args.device,
           "--threads", str(args.threads), "--inner", str(args.inner), "--new-tokens", str(args.new_tokens)]
    cmd += ["--quantize", quantize or ""]
    if (quantize or dtype) in args.batch8.split(","):
        cmd.append("--worker-batch8")
    for flag, on in (("--no-optimize", args.no_optimize), ("--worker-saved", saved), ("--load-only", args.load_only)):
        if on:
            cmd.append(flag)
    available = available_memory()
    env = dict(os.environ, BENCH_LAUNCH=repr(time.time()), OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **isa_environment(args.isa))
    # time.time() in both processes: the child's clock starts before its imports.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(files_in_page_cache=int(warmed), available_gb_before=available / 1024**3)
    label = f"{quantize or ''}{' saved' if saved else ''}"
    print(f"  {impl:12s} {model} {dtype} {label:10s} {json.dumps({k: round(v, 3) for k, v in result.items()})}",
          file=sys.stderr, flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="pg1,pg2", help=f"comma list of {', '.join(MODELS)} (default pg1,pg2)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument("--quantize", default="int8,int4",
                        help="comma list of int8, int4 for ours (bf16 activations), or ''")
    parser.add_argument("--saved", default="", help="comma list of int8, int4: ours loaded from a quantized "
                        "checkpoint written once by `paligemma quantize` (default none)")
    parser.add_argument("--load-only", action="store_true", help="measure load time and peak RSS only")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=f"decode steps timed (default {NEW_TOKENS})")
    parser.add_argument("--repeats", type=int, default=2, help="A B rounds per configuration (default 2)")
    parser.add_argument("--inner", type=int, default=2, help="timed repeats of encode/prefill inside a worker")
    parser.add_argument("--threads", default=str(os.cpu_count()),
                        help="comma list of torch thread counts, one table each (default: all cores)")
    parser.add_argument("--isa", choices=["avx512bf16", "avx2", "none"],
                        help="cap our kernels at this level; avx2 also runs torch/oneDNN/MKL at AVX2 on both sides")
    parser.add_argument("--reference-fp32", action="store_true", help="also measure transformers in float32")
    parser.add_argument("--batch8", default="", help="comma list of configurations that also measure batch-8 decode "
                        "(slow for transformers), e.g. bf16,int4; default none")
    parser.add_argument("--no-transformers", action="store_true", help="measure ours only")
    parser.add_argument("--no-optimize", action="store_true", help="ours without fused/packed inference layout")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both implementations; default cpu)")
    parser.add_argument("--prepare", action="store_true", help="only write the checkpoints")
    parser.add_argument("--json-out", help="also write the raw results here")
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch8", dest="worker_batch8", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-saved", dest="worker_saved", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        args.impl, args.model, args.dtype = args.worker, args.models, args.dtypes
        args.quantize = args.quantize or None
        args.batch8, args.saved = args.worker_batch8, args.worker_saved
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, str(HERE.parent))
    models = [m for m in args.models.split(",") if m]
    for model in models:
        ensure_checkpoint(model)
        for mode in [m for m in args.saved.split(",") if m]:
            ensure_quantized(model, mode, int(args.threads.split(",")[0]))
    if args.prepare:
        return
    results = {}
    for threads in [int(t) for t in args.threads.split(",") if t]:
        args.threads = threads
        print(f"isa {args.isa or 'best'}, {threads} thread(s)", file=sys.stderr)
        bandwidth, rows = measure(args, models)
        print(f"\n### {threads} thread(s), ISA level {args.isa or 'best'}, streaming bandwidth {bandwidth:.1f} GB/s\n")
        print(render(rows, bandwidth))
        results[threads] = {"bandwidth_gbs": bandwidth, "rows": [[m, d, q, r] for m, d, q, r in rows]}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"isa": args.isa, "threads": results}, indent=1))


def measure(args, models: list[str]):
    """(streaming bandwidth, [(model, dtype, quant, {"ours": [...], "transformers": [...]})]) at args.threads."""
    env = isa_environment(args.isa)
    os.environ.update(env)  # the bandwidth probe runs here, as the workers will
    bandwidth = streaming_bandwidth(args.threads, args.device)
    print(f"streaming bandwidth ({args.threads} thread(s)): {bandwidth:.1f} GB/s", file=sys.stderr)
    rows = []
    for model in models:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            runs = {"ours": [], "transformers": []}
            for _ in range(args.repeats):
                runs["ours"].append(run_worker(args, "ours", model, dtype, None))
                if not args.no_transformers:
                    runs["transformers"].append(run_worker(args, "transformers", model, dtype, None))
            rows.append((model, dtype, None, runs))
        for quant in [q for q in args.quantize.split(",") if q and args.device == "cpu"]:  # CPU kernels
            runs = {"ours": [run_worker(args, "ours", model, "bf16", quant) for _ in range(args.repeats)],
                    "transformers": []}
            rows.append((model, "bf16", quant, runs))
        for quant in [q for q in args.saved.split(",") if q]:
            runs = {"ours": [run_worker(args, "ours", model, "bf16", quant, saved=True) for _ in range(args.repeats)],
                    "transformers": []}
            rows.append((model, "bf16", f"{quant} saved", runs))
        if args.reference_fp32 and not args.no_transformers:
            runs = {"ours": [], "transformers": [run_worker(args, "transformers", model, "fp32", None)
                                                 for _ in range(args.repeats)]}
            rows.append((model, "fp32", "reference", runs))
    return bandwidth, rows


METRICS = [("load", "load s", False), ("peak_rss_gb", "peak RSS GiB", False), ("encode", "encode s", False),
           ("prefill", "prefill s", False), ("decode_b1", "decode b1 tok/s", True),
           ("decode_b8", "decode b8 tok/s", True), ("cold_start", "cold start s", False),
           ("peak_gpu_gib", "peak GPU memory GiB", False)]


def _med(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def render(rows, bandwidth: float) -> str:
    head = "| model | dtype | quant | metric | ours | transformers | ours/transformers |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    bf16_reference = {}
    for model, dtype, quant, runs in rows:
        if quant is None and dtype == "bf16":
            bf16_reference[model] = runs["transformers"]
    for model, dtype, quant, runs in rows:
        ref_runs = runs["transformers"] or (bf16_reference.get(model, []) if quant else [])
        for key, label, higher in METRICS:
            ours, ref = _med(runs["ours"], key), _med(ref_runs, key)
            if ours is None and ref is None:
                continue
            ratio = f"{ours / ref:.2f}" if ours is not None and ref else ""
            borrowed = " (bf16)" if quant and not runs["transformers"] else ""  # ours quantized vs their bf16
            ref_label = f"{ref:.3g}{borrowed}" if ref is not None else "-"
            lines.append(f"| {model} | {dtype} | {quant or '-'} | {label} | "
                         f"{'-' if ours is None else f'{ours:.3g}'} | {ref_label} | {ratio} |")
        tok = _med(runs["ours"], "decode_b1")
        nbytes = _med(runs["ours"], "weight_bytes")
        if tok and nbytes:
            achieved = nbytes * tok / 1e9
            lines.append(f"| {model} | {dtype} | {quant or '-'} | decode b1 GB/s streamed (fraction of "
                         f"{bandwidth:.1f} GB/s) | {achieved:.1f} ({achieved / bandwidth:.2f}) | | |")
            b8 = _med(runs["ours"], "decode_b8")
            if b8:
                lines.append(f"| {model} | {dtype} | {quant or '-'} | b8 throughput / b1 (ours) | {b8 / tok:.2f} | | |")
        ref_tok, ref_bytes = _med(ref_runs, "decode_b1"), _med(ref_runs, "weight_bytes")
        if ref_tok and ref_bytes and not quant:
            achieved = ref_bytes * ref_tok / 1e9
            lines.append(f"| {model} | {dtype} | - | decode b1 GB/s streamed, transformers (fraction) | | "
                         f"{achieved:.1f} ({achieved / bandwidth:.2f}) | |")
        rss = _med(runs["ours"], "peak_rss_gb")
        if rss:
            total = _med(runs["ours"], "total_weight_bytes")
            if total:
                lines.append(f"| {model} | {dtype} | {quant or '-'} | peak RSS / weights' bytes (ours) | "
                             f"{rss * 1024**3 / total:.2f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
