"""`paligemma finetune`: command-line fine-tuning over `train`.

    paligemma finetune --model ckpt/ --data train.jsonl --eval-data val.jsonl --out runs/a --epochs 3
    torchrun --nproc_per_node 2 -m paligemma.finetune.cli --model ckpt/ --data train.jsonl --out runs/a [--fsdp]

The main CLI registers the subcommand from `add_arguments` and `run`; `python -m
paligemma.finetune.cli ARGS` is `paligemma finetune ARGS` (torchrun needs a module or a script), with
the same exit codes: 2 and one `error: ...` line for a user error (docs/cli.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from ..checkpoint_layout import refuse_quantized
from ..cli_common import add_device_argument, add_model_arguments, checkpoint_dir, load, parse_device
from ..config import PaliGemmaConfig
from ..errors import UsageError
from ..evaluation.scoring import TASKS
from ..quantize import MODES as QUANTIZE_MODES
from .trainer import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fine-tuning options to `parser`."""
    add_model_arguments(parser.add_argument_group("model"), required=True, default_dtype="float32",
                        inference_options=False)
    add_device_argument(parser.add_argument_group("device"))
    io = parser.add_argument_group("data and files")
    io.add_argument("--data", required=True, help="training JSONL: {image, prefix, suffix} per line")
    io.add_argument("--eval-data", help="held-out JSONL, evaluated every --eval-every steps and at the end")
    io.add_argument("--eval-task", choices=TASKS,
                    help="also score --eval-data with this task's metrics, as `paligemma eval` does (docs/eval.md)")
    io.add_argument("--out", required=True, help="output folder: checkpoint-STEP/, final/, metrics.jsonl")
    runs = io.add_mutually_exclusive_group()
    runs.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                      help="resume from the latest checkpoint in --out, or from the folder given")
    runs.add_argument("--overwrite", action="store_true",
                      help="--out holds an earlier run: delete its files (checkpoints, final/, logs) and start "
                           "again (without this or --resume such a folder is refused)")
    io.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
    io.add_argument("--max-bad-fraction", type=float, default=0.5, metavar="F",
                    help="stop when more than this fraction of the rows of --data (or of --eval-data) cannot be "
                         "used (default 0.5); fewer are skipped and listed in --out/skipped_rows.jsonl")
    io.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes decoding images")
    io.add_argument("--max-length", type=int, help="skip (as bad rows) samples longer than this many tokens")

    length = parser.add_argument_group("schedule").add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, help="optimizer steps")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    opt.add_argument("--batch-size", type=int, default=8, help="examples per micro-step over all processes")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    opt.add_argument("--warmup-steps", type=int, default=0)
    opt.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay, on matrices only")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--bf16", action="store_true",
                     help="bfloat16 autocast (weights stay in --dtype); float32 instead on a CPU without native bf16")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")

    what = parser.add_argument_group("what to train")
    what.add_argument("--freeze", default="", help="comma-separated parts: vision,projector,embeddings,decoder")
    what.add_argument("--attention-only", action="store_true",
                      help="train only the decoder's attention layers (big_vision's colab recipe)")
    what.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (needs peft)")
    what.add_argument("--lora-alpha", type=float, default=16.0)
    what.add_argument("--lora-dropout", type=float, default=0.0)
    what.add_argument("--quantize", choices=QUANTIZE_MODES,
                      help="QLoRA: freeze the decoder's projections as int8/int4 weights under the LoRA adapters "
                           "(needs --lora-rank; CPU, or bitsandbytes nf4 int4 on CUDA); final/ holds them merged")
    what.add_argument("--fsdp", action="store_true",
                      help="under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")

    log = parser.add_argument_group("logging, evaluation, checkpoints")
    log.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    log.add_argument("--save-every", type=int, default=0, help="write checkpoint-STEP every N steps (0: never)")
    log.add_argument("--log-every", type=int, default=1)
    log.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` the parsed arguments describe; UsageError if they do not fit together."""
    if args.eval_task and not args.eval_data:
        raise UsageError("--eval-task scores the --eval-data set: give --eval-data too")
    try:
        return _train_config(args)
    except ValueError as err:  # TrainConfig's own checks, all of them about the options given
        raise UsageError(str(err)) from None


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out, model_dir=args.model, steps=args.steps, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        device=str(parse_device(args.device)), quantize=args.quantize,
        freeze=tuple(part.strip() for part in args.freeze.split(",") if part.strip()),
        attention_only=args.attention_only, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, seed=args.seed, max_length=args.max_length, strict=args.strict,
        max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite,
        num_workers=args.num_workers, eval_every=args.eval_every, eval_task=args.eval_task,
        save_every=args.save_every,
        log_every=args.log_every, resume=args.resume, progress=not args.no_progress, fsdp=args.fsdp,
    )


def run(args: argparse.Namespace) -> int:
    """Train as the arguments say; prints a JSON summary (rank 0). User errors raise PaliGemmaError."""
    from ..process_group import leave_process_group
    from .distributed import init_distributed, process_device
    from .trainer import train

    config = config_from_args(args)
    if args.lora_rank and importlib.util.find_spec("peft") is None:
        raise UsageError("--lora-rank needs the optional 'peft' package: pip install peft")
    directory = checkpoint_dir(args.model)
    refuse_quantized(PaliGemmaConfig.from_json_file(directory / "config.json"), directory)  # training needs floats
    config.model_dir = str(directory)
    device = process_device(config.device)  # under torchrun on CUDA: GPU LOCAL_RANK
    env = init_distributed(device=device)
    try:
        model, processor, codec = load(directory, args.dtype, device)
        summary = train(model, processor, args.data, config, eval_data=args.eval_data, mask_codec=codec)
    finally:
        leave_process_group()
    if env.is_main:
        report = {"steps": summary.steps, "final_loss": summary.final_loss, "final_dir": summary.final_dir,
                  "trainable_parameters": summary.trainable_parameters, "elapsed_s": round(summary.elapsed, 2)}
        if summary.evals:
            report["eval"] = {k: v for k, v in summary.evals[-1].items() if k != "examples"}
        print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`paligemma finetune ARGV` (default: sys.argv[1:]); returns the exit code."""
    from ..cli import main as paligemma_main

    return paligemma_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
