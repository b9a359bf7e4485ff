"""`paligemma quantize`: a float checkpoint -> a quantized checkpoint folder, once, a tensor at a time.

    paligemma quantize --model google/paligemma2-10b-pt-448 --to int4 --out pg2-10b-448-int4
    paligemma generate --model pg2-10b-448-int4 --image cat.jpg --prompt "caption en"   # loads as a memory map

The format and the conversion are quantized_checkpoint.py's; documentation: docs/cli.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .errors import UsageError
from .quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the float checkpoint: a folder (HF layout) or Hub repo id")
    parser.add_argument("--to", dest="mode", choices=MODES, required=True, help="weight-only quantization")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                        help="input channels per scale (default: "
                             + ", ".join(f"{size} for {mode}" for mode, size in DEFAULT_GROUP_SIZE.items()) + ")")
    parser.add_argument("--out", required=True, help="the quantized checkpoint folder to create (must not exist)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .quantized_checkpoint import quantize_checkpoint

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} already exists; choose a new folder (nothing is overwritten)")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.resolve().parent} does not exist")
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{done}/{total} tensors", end="" if done < total else "\n", file=sys.stderr, flush=True)

    quantize_checkpoint(args.model, out, args.mode, args.group_size, progress=progress)
    size = sum(path.stat().st_size for path in out.iterdir() if path.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    print(f"wrote {out}: {args.mode}, {size / 1024**3:.2f} GiB, in {time.perf_counter() - started:.0f} s, "
          f"peak RSS {peak:.2f} GiB")
    return 0
