"""`paligemma eval`: score a checkpoint on a JSONL set with the task's own metric (docs/eval.md).

    paligemma eval --model ckpt/ --data val.jsonl --task caption --out predictions.jsonl
    paligemma eval --model ckpt/ --data refcoco_val.jsonl --task refer --json

Everything that can be wrong with the options, the data or the output path is found before the
model is loaded. The predictions file is written once, at the end, and never over an existing file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ..cli_common import add_mask_codec_argument, add_model_arguments, checkpoint_dir, load, mask_codec_path
from ..errors import UsageError
from ..vqvae import load_mask_codec
from .data import read_eval_jsonl
from .scoring import TASKS, check_references


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSONL rows {image, prefix, suffix} (suffix may be a list "
                                                      "of references; VQA rows may give 'answers')")
    parser.add_argument("--task", required=True, choices=TASKS, help="which metrics to compute (docs/eval.md)")
    parser.add_argument("--out", metavar="PREDICTIONS.jsonl",
                        help="write one JSON line per row: its answer, references and own scores (never overwritten)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows answered together (default 8)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="answer length limit (default: the longest reference + 8 tokens)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    add_mask_codec_argument(model)


def run(args: argparse.Namespace) -> int:
    from .runner import evaluate_examples

    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_new_file(out)
    examples = read_eval_jsonl(args.data, args.task)[:args.limit]
    directory = checkpoint_dir(args.model)
    codec_file = mask_codec_path(directory, args.mask_codec)
    if args.task == "segment" and codec_file is None:
        raise UsageError(f"--task segment decodes masks with a mask codec and {directory} has none: pass "
                         "--mask-codec (the codec the references' <seg> codes were written with)")
    check_references(args.task, [e.references for e in examples], [e.where for e in examples],
                     load_mask_codec(codec_file) if args.task == "segment" else None)
    started = time.perf_counter()
    model, processor, codec = load(directory, args.dtype, args.device, optimize=not args.no_optimize,
                                   quantize=args.quantize, mask_codec=args.mask_codec)
    result = evaluate_examples(model, processor, examples, args.task, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, codec=codec,
                               progress=not args.no_progress and sys.stderr.isatty())
    seconds = time.perf_counter() - started
    if out is not None:
        write_new_file(out, "".join(json.dumps(_finite(record)) + "\n" for record in result.records))
    summary = {"task": args.task, "num_examples": len(examples), "metrics": _finite(result.metrics),
               "data": str(args.data), "model": str(directory), "predictions": str(out) if out else None,
               "seconds": round(seconds, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(args.task, len(examples), result.metrics))
        print(f"\n{directory} on {args.data}: {len(examples)} rows in {seconds:.0f} s"
              + (f"; per-row answers in {out}" if out else ""))
    return 0


def _table(task: str, rows: int, metrics: dict[str, float]) -> str:
    lines = [f"| {task} metric ({rows} rows) | score |", "|---|---|"]
    for name, value in metrics.items():
        shown = "n/a" if isinstance(value, float) and math.isnan(value) else \
            (str(value) if isinstance(value, int) else f"{value:.4f}")
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def _finite(value):
    """JSON-safe: NaN (an undefined metric) as null, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _check_new_file(path: Path) -> None:
    if path.exists():
        raise UsageError(f"--out {path} already exists: choose another name or remove it (it is never overwritten)")
    if not path.parent.is_dir():
        raise UsageError(f"--out {path}: directory {path.parent} does not exist")


def write_new_file(path: Path, text: str) -> None:
    """Write `text` to `path` in one step, refusing to replace a file that appeared meanwhile: the text
    goes to a temporary file beside it, which is then hard-linked under the final name (an atomic
    create-if-absent on POSIX) and removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it has the final name
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UsageError(f"--out {path} appeared while evaluating; the predictions were not written over "
                             "it") from None
    finally:
        tmp.unlink(missing_ok=True)
