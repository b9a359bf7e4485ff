"""`paligemma batch`: answer a dataset, resumably, on one process or many (registered by paligemma/cli.py).

    paligemma batch --model DIR --input rows.jsonl --out answers.jsonl
    paligemma batch --model DIR --images photos/ --prompt "caption en" --out captions.jsonl
    torchrun --nproc_per_node 4 -m paligemma batch --model DIR --input rows.jsonl --out answers.jsonl

Options, the input and the output path are checked before the model loads. See docs/batch.md and
`paligemma.batch` for the output records, the shards, resuming and the merge.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_common import add_mask_codec_argument, add_model_arguments, checkpoint_dir, load
from .errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="ROWS.jsonl", help='one {"image", "prompt"[, "id"]} object per line '
                        "(image paths relative to the file's folder)")
    source.add_argument("--images", metavar="DIR", help="every image under DIR (recursively), with --prompt")
    parser.add_argument("--prompt", help='the prompt for every image of --images, e.g. "caption en"')
    parser.add_argument("--out", required=True, metavar="ANSWERS.jsonl",
                        help="one JSON line per input row, in input order (never overwritten; work in progress "
                             "is kept in ANSWERS.jsonl.parts/ and resumed from there)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows answered together per process (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    add_mask_codec_argument(model)


def run(args: argparse.Namespace) -> int:
    from .batch import check_output, folder_rows, join_processes, read_jsonl_rows, run_batch
    from .process_group import leave_process_group

    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if (args.images is None) != (args.prompt is None):
        raise UsageError("--prompt goes with --images (JSONL rows carry their own prompts)")
    out = Path(args.out)
    check_output(out)
    rows = read_jsonl_rows(args.input) if args.input else folder_rows(args.images, args.prompt)
    shard = join_processes()
    device = args.device
    if shard.world_size > 1 and device == "cuda":  # one GPU per process on each machine, as torchrun numbers them
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        model, processor, codec = load(checkpoint_dir(args.model), args.dtype, device,
                                       optimize=not args.no_optimize, quantize=args.quantize,
                                       mask_codec=args.mask_codec)
        summary = run_batch(model, processor, rows, out, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, codec=codec, shard=shard,
                            progress=not args.no_progress and sys.stderr.isatty())
    finally:
        leave_process_group()
    if shard.rank == 0:
        done = summary.answered + summary.errors
        print(f"{out}: {summary.rows} rows ({summary.skipped} done before, {summary.answered} answered, "
              f"{summary.errors} errors) in {summary.seconds:.1f} s on {summary.world_size} process(es): "
              f"{summary.rows_per_second:.2f} images/s, {3600 * summary.rows_per_second:.0f} images/hour"
              + ("" if done else " (nothing left to do)"), file=sys.stderr)
    return 0
