"""The fine-tuning loop: one function, `train`, the same on one process or many (torchrun, DDP on gloo).

One optimizer step = `grad_accum` micro-steps of `batch_size` examples each (summed over all
processes; each process takes batch_size / world_size of them). The loss of a step is the mean
over *all* its suffix tokens, so accumulation equals one big batch, and 2 processes equal 1, up to
float rounding: `step.train_step` does the forward and backward passes.

Deterministic given `seed`: the data order is a function of (seed, epoch) alone
(`MicroBatchSampler`), and a resumed run restores the step, optimizer and RNG states, so it
retraces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..model import PaliGemma
from . import checkpoint as ckpt
from . import lora
from .data import Collator, DataError, MicroBatchSampler, as_dataset
from .distributed import DistEnv, barrier, init_distributed, shard_bounds, wrap_model
from .evaluation import evaluate
from .freezing import count_trainable, set_trainable
from .schedule import build_optimizer, lr_at, set_lr
from .step import train_step

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Fine-tuning settings. Give `steps` or `epochs` (default: 1 epoch)."""

    out_dir: str = "finetune-out"
    model_dir: str | None = None  # base checkpoint folder: its tokenizer/preprocessor files go into checkpoints
    extra_files: tuple[str, ...] = ()  # more files copied into every checkpoint (e.g. a mask codec)
    steps: int | None = None  # optimizer steps
    epochs: float | None = None
    lr: float = 2e-5  # peak learning rate
    batch_size: int = 8  # examples per micro-step, over all processes
    grad_accum: int = 1  # micro-steps per optimizer step
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW, matrices only
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    bf16: bool = False  # bfloat16 autocast on CPU
    gradient_checkpointing: bool = False
    freeze: tuple[str, ...] = ()  # of "vision", "projector", "embeddings", "decoder"
    attention_only: bool = False  # train language_model.layers.*.self_attn.* only
    lora_rank: int = 0  # > 0: LoRA adapters on the decoder projections, base frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    seed: int = 0
    shuffle: bool = True
    max_length: int | None = None  # raise on longer samples (nothing is truncated)
    strict: bool = False  # bad data rows raise instead of being skipped
    num_workers: int = 0  # DataLoader worker processes (image decoding)
    eval_every: int = 0  # evaluate every N steps (0: at the end only)
    eval_batch_size: int | None = None
    eval_max_new_tokens: int | None = None  # None: longest target + a margin
    save_every: int = 0  # write out/checkpoint-STEP every N steps (0: never; out/final always)
    log_every: int = 1
    resume: bool | str = False  # True: latest checkpoint in out_dir; a path: that checkpoint
    progress: bool = True  # tqdm bar on rank 0 when tqdm is installed
    fsdp: bool = False  # shard weights, gradients and optimizer state over processes (FSDP2) instead of DDP

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either steps or epochs, not both")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_rank and (self.attention_only or self.freeze):
            raise ValueError("LoRA freezes the whole base model already; drop freeze/attention_only")
        if self.lora_rank and self.fsdp:
            raise ValueError("LoRA with FSDP is not supported: the adapters are small, use DDP (no --fsdp)")
        self.freeze = tuple(self.freeze)
        self.extra_files = tuple(str(f) for f in self.extra_files)
        missing = [f for f in self.extra_files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"extra_files not found: {missing}")


@dataclass
class TrainSummary:
    steps: int  # optimizer steps done in total (a resumed run counts the earlier ones)
    losses: list[float]  # training loss of each step run by this call
    final_loss: float | None
    evals: list[dict] = field(default_factory=list)  # {"step", "eval_loss", "exact_match", ...}
    out_dir: str = ""
    final_dir: str | None = None
    elapsed: float = 0.0
    trainable_parameters: int = 0


def train(model: PaliGemma, processor, train_data, config: TrainConfig, eval_data=None,
          on_log: Callable[[dict], None] | None = None) -> TrainSummary:
    """Fine-tune `model` in place on `train_data`; returns a `TrainSummary`.

    train_data / eval_data: a `FinetuneDataset`, a JSONL path, or a list of dicts / (image, prefix,
    suffix) tuples (images as paths or PIL images). `on_log` gets every metrics record (train and
    eval) on rank 0, as written to out_dir/metrics.jsonl. Under torchrun every process calls
    `train` with the same arguments; rank 0 alone writes files.
    """
    env = init_distributed()
    _seed_everything(config.seed)
    train_set = as_dataset(train_data, strict=config.strict)
    eval_set = as_dataset(eval_data, strict=config.strict) if eval_data is not None else None
    if eval_set is not None and len(eval_set) == 0:
        raise DataError("the evaluation set has no usable examples")

    _choose_trainable(model, config)
    runner = wrap_model(model, env, config.fsdp)  # FSDP swaps in sharded parameters: before the optimizer
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]

    out = Path(config.out_dir)
    start_step = 0
    resume_from = _resume_dir(config, out)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, env.rank)
        start_step = state["step"]
    per_epoch = len(train_set) // config.batch_size
    total_steps = config.steps if config.steps is not None else \
        max(1, math.ceil((config.epochs or 1.0) * per_epoch / config.grad_accum))
    batches = _micro_batches(train_set, processor, config, env, start_step, total_steps)

    log = _Logger(out, env, on_log, start_step)
    trainable, _ = count_trainable(model)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(config), indent=1) + "\n", encoding="utf-8")
    bar = _progress_bar(config.progress and env.is_main, total_steps, start_step)
    summary = TrainSummary(steps=start_step, losses=[], final_loss=None, out_dir=str(out),
                           trainable_parameters=trainable)
    step_samples = config.batch_size * config.grad_accum
    started = time.perf_counter()
    model.train()
    for step in range(start_step, total_steps):
        tick = time.perf_counter()
        micro = [next(batches) for _ in range(config.grad_accum)]
        loss, grad_norm = train_step(runner, micro, params, env, config.bf16, config.max_grad_norm)
        lr = lr_at(step, config.lr, total_steps, config.warmup_steps, config.min_lr_ratio)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        summary.steps, summary.final_loss = done, loss
        summary.losses.append(loss)
        seconds = time.perf_counter() - tick
        if done % config.log_every == 0 or done == total_steps:
            log.write({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "samples_per_s": step_samples / seconds, "epoch": done * config.grad_accum / per_epoch,
                       "elapsed": time.perf_counter() - started})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{step_samples / seconds:.1f}")
        if eval_set is not None and config.eval_every and done % config.eval_every == 0 and done != total_steps:
            summary.evals.append(_evaluate(model, processor, eval_set, config, env, log, done))
        if config.save_every and done % config.save_every == 0:
            state = {"step": done, "micro_batches": done * config.grad_accum, "total_steps": total_steps,
                     "epoch": done * config.grad_accum / per_epoch, "world_size": env.world_size,
                     "config": asdict(config)}
            ckpt.save_checkpoint(out / f"checkpoint-{done}", model, optimizer, state, config.model_dir, env,
                                 config.extra_files)
    if bar is not None:
        bar.close()
    if eval_set is not None:
        summary.evals.append(_evaluate(model, processor, eval_set, config, env, log, summary.steps))
    final = ckpt.gathered_model(model)
    if env.is_main:
        summary.final_dir = str(out / "final")
        ckpt.save_model_folder(final, out / "final", config.model_dir, config.extra_files)
    barrier(env)
    summary.elapsed = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------------- helpers

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _choose_trainable(model: PaliGemma, config: TrainConfig) -> None:
    """LoRA adapters, the caller's adapters, or the parts not frozen; and gradient checkpointing."""
    if config.lora_rank:
        lora.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.model_dir)
    elif lora.has_lora(model):  # adapters injected by the caller (apply_lora / load_adapter): train those
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name)
    else:
        set_trainable(model, config.freeze, config.attention_only)
    model.vision_tower.gradient_checkpointing = config.gradient_checkpointing
    model.language_model.gradient_checkpointing = config.gradient_checkpointing


def _micro_batches(train_set, processor, config: TrainConfig, env: DistEnv, start_step: int, total_steps: int):
    """An iterator over this process's share of the micro-batches of steps start_step .. total_steps - 1."""
    lo, hi = shard_bounds(config.batch_size, env)
    sampler = MicroBatchSampler(len(train_set), config.batch_size, config.seed, config.shuffle,
                                start=start_step * config.grad_accum, stop=total_steps * config.grad_accum,
                                lo=lo, hi=hi)
    # Its own generator: a DataLoader otherwise draws a seed from the global RNG when iterated,
    # which would shift a resumed run's random stream (e.g. LoRA dropout) by one draw.
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=config.num_workers,
                                         collate_fn=Collator(processor, config.max_length),
                                         generator=torch.Generator().manual_seed(config.seed))
    return iter(loader)


def _resume_dir(config: TrainConfig, out: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume is True:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            raise FileNotFoundError(f"resume asked for, but {out} holds no checkpoint-STEP folder with a "
                                    f"{ckpt.STATE_FILE}")
        return found
    return Path(config.resume)


def _evaluate(model, processor, eval_set, config: TrainConfig, env: DistEnv, log: "_Logger", step: int) -> dict:
    """Rank 0 evaluates the unwrapped (FSDP: gathered) model; the others wait (and receive nothing)."""
    result = {}
    model = ckpt.gathered_model(model)
    if env.is_main:
        result = evaluate(model, processor, eval_set, batch_size=config.eval_batch_size or config.batch_size,
                          bf16=config.bf16, max_new_tokens=config.eval_max_new_tokens, max_length=config.max_length)
        result = {"step": step, **result}
        log.write({k: v for k, v in result.items() if k != "examples"})
    barrier(env)
    return result


class _Logger:
    """Appends metrics records to out/metrics.jsonl (rank 0) and hands them to the callback."""

    def __init__(self, out: Path, env: DistEnv, on_log, start_step: int):
        self.path = out / METRICS_FILE
        self.env, self.on_log = env, on_log
        if env.is_main and self.path.exists():
            # A resumed run rewrites the steps after its checkpoint: drop the interrupted run's copies.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.env.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

