"""`paligemma demo-eval`: score a model on freshly generated, held-out shapes-world scenes."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli_common import (
    add_device_argument,
    add_mask_codec_argument,
    add_model_arguments,
    checkpoint_dir,
    load,
    mask_codec_path,
    parse_device,
)
from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, inference_options=False)
    add_device_argument(parser)
    parser.add_argument("--scenes", type=int, default=500, help="number of held-out scenes (default 500)")
    parser.add_argument("--seed0", type=int, default=None, help="first scene seed (default: the held-out range)")
    parser.add_argument("--batch-size", type=int, default=64, help="answers generated together (default 64)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    segmentation = parser.add_mutually_exclusive_group()
    add_mask_codec_argument(segmentation)
    segmentation.add_argument("--no-segmentation", action="store_true", help="skip the segmentation score")
    parser.add_argument("--no-multiclass", action="store_true",
                        help="skip the multi-class prompts (`detect A ; B`, `segment A ; B`)")


def run(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_demo
    from .recipe import EVAL_SEED0

    if args.scenes < 1 or args.batch_size < 1:
        raise UsageError(f"--scenes and --batch-size must be >= 1, got {args.scenes} and {args.batch_size}")
    directory = checkpoint_dir(args.model)
    model, processor, codec = load(directory, args.dtype, parse_device(args.device), mask_codec=args.mask_codec)
    if args.no_segmentation:
        codec = None
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{done}/{total} answers", end="", file=sys.stderr, flush=True)

    scores = evaluate_demo(model, processor, num_scenes=args.scenes,
                           seed0=EVAL_SEED0 if args.seed0 is None else args.seed0,
                           batch_size=args.batch_size, progress=progress, codec=codec,
                           multiclass=not args.no_multiclass)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(scores.as_dict(), indent=1))
    else:
        print(scores.table())
        print(f"\n{directory}: {args.scenes} scenes in {time.perf_counter() - started:.0f} s"
              + ("" if codec is None else f"; masks decoded with {mask_codec_path(directory, args.mask_codec)}"))
    return 0
