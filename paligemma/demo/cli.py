"""`paligemma demo-eval`: score a model on freshly generated, held-out shapes-world scenes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--scenes", type=int, default=500, help="number of held-out scenes (default 500)")
    parser.add_argument("--seed0", type=int, default=None, help="first scene seed (default: the held-out range)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    segmentation = parser.add_mutually_exclusive_group()
    segmentation.add_argument("--mask-codec", type=Path, metavar="FILE",
                              help="score `segment` answers decoded with this VQ-VAE (default: the checkpoint's "
                                   "mask_codec.safetensors, if it has one)")
    segmentation.add_argument("--no-segmentation", action="store_true", help="skip the segmentation score")


def run(args: argparse.Namespace) -> int:
    from ..processor import load_processor
    from ..vqvae import MASK_CODEC_FILE, load_mask_codec
    from ..loading import load_model
    from .evaluate import evaluate_demo
    from .recipe import EVAL_SEED0

    directory = args.model or DEMO_MODEL_DIR
    if args.scenes < 1:
        raise ValueError(f"--scenes must be >= 1, got {args.scenes}")
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    codec_path = args.mask_codec or Path(directory) / MASK_CODEC_FILE
    if args.mask_codec and not args.mask_codec.is_file():
        raise ValueError(f"--mask-codec {args.mask_codec} does not exist")
    codec = None if args.no_segmentation or not codec_path.is_file() else load_mask_codec(codec_path)
    model, processor = load_model(directory, dtype=dtype), load_processor(directory)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{done}/{total} answers", end="", file=sys.stderr, flush=True)

    scores = evaluate_demo(model, processor, num_scenes=args.scenes,
                           seed0=EVAL_SEED0 if args.seed0 is None else args.seed0,
                           batch_size=args.batch_size, progress=progress, codec=codec)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(scores.as_dict(), indent=1))
    else:
        print(scores.table())
        print(f"\n{directory}: {args.scenes} scenes in {time.perf_counter() - started:.0f} s"
              + (f"; masks decoded with {codec_path}" if codec is not None else ""))
    return 0
