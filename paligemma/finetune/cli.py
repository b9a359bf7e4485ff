"""`paligemma finetune`: command-line fine-tuning over `train`.

    paligemma finetune --model ckpt/ --data train.jsonl --eval-data val.jsonl --out runs/a --epochs 3
    torchrun --nproc_per_node 2 -m paligemma.finetune.cli --model ckpt/ --data train.jsonl --out runs/a [--fsdp]

The main CLI registers the subcommand from `add_arguments` and `run`; `python -m
paligemma.finetune.cli` runs it directly (what torchrun needs: a module or a script).
"""

from __future__ import annotations

import argparse
import json
import sys

from .trainer import TrainConfig

_DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fine-tuning options to `parser`."""
    io = parser.add_argument_group("data and files")
    io.add_argument("--model", required=True, help="base checkpoint folder (HF layout) or Hub repo id")
    io.add_argument("--data", required=True, help="training JSONL: {image, prefix, suffix} per line")
    io.add_argument("--eval-data", help="held-out JSONL, evaluated every --eval-every steps and at the end")
    io.add_argument("--out", required=True, help="output folder: checkpoint-STEP/, final/, metrics.jsonl")
    io.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                    help="resume from the latest checkpoint in --out, or from the folder given")
    io.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
    io.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes decoding images")
    io.add_argument("--max-length", type=int, help="refuse samples longer than this many tokens")

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
    opt.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay in --dtype)")
    opt.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype the weights are loaded and trained in")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")

    what = parser.add_argument_group("what to train")
    what.add_argument("--freeze", default="", help="comma-separated parts: vision,projector,embeddings,decoder")
    what.add_argument("--attention-only", action="store_true",
                      help="train only the decoder's attention layers (big_vision's colab recipe)")
    what.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (needs peft)")
    what.add_argument("--lora-alpha", type=float, default=16.0)
    what.add_argument("--lora-dropout", type=float, default=0.0)
    what.add_argument("--fsdp", action="store_true",
                      help="under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")

    log = parser.add_argument_group("logging, evaluation, checkpoints")
    log.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    log.add_argument("--save-every", type=int, default=0, help="write checkpoint-STEP every N steps (0: never)")
    log.add_argument("--log-every", type=int, default=1)
    log.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` the parsed arguments describe."""
    return TrainConfig(
        out_dir=args.out, model_dir=args.model, steps=args.steps, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        freeze=tuple(part.strip() for part in args.freeze.split(",") if part.strip()),
        attention_only=args.attention_only, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, seed=args.seed, max_length=args.max_length, strict=args.strict,
        num_workers=args.num_workers, eval_every=args.eval_every, save_every=args.save_every,
        log_every=args.log_every, resume=args.resume, progress=not args.no_progress, fsdp=args.fsdp,
    )


def run(args: argparse.Namespace) -> int:
    """Train as the arguments say; prints a JSON summary (rank 0). Returns the exit status."""
    import torch

    from ..hub import CheckpointError, resolve_checkpoint
    from ..processor import load_processor
    from ..loading import load_model
    from .data import DataError
    from .distributed import init_distributed
    from .trainer import train

    try:
        config = config_from_args(args)
        model_dir = resolve_checkpoint(args.model)
        config.model_dir = str(model_dir)
        env = init_distributed()
        model = load_model(model_dir, dtype=getattr(torch, args.dtype))
        processor = load_processor(model_dir)
        summary = train(model, processor, args.data, config, eval_data=args.eval_data)
    except (DataError, CheckpointError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if env.is_main:
        report = {"steps": summary.steps, "final_loss": summary.final_loss, "final_dir": summary.final_dir,
                  "trainable_parameters": summary.trainable_parameters, "elapsed_s": round(summary.elapsed, 2)}
        if summary.evals:
            report["eval"] = {k: v for k, v in summary.evals[-1].items() if k != "examples"}
        print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paligemma finetune", description="Fine-tune PaliGemma on JSONL data.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
