"""The fine-tuning loop: one function, `train`, the same on one process or many (torchrun, DDP on gloo).

One optimizer step = `grad_accum` micro-steps of `batch_size` examples each (summed over all
processes; each process takes batch_size / world_size of them). The loss of a step is the mean
over *all* its suffix tokens, so accumulation equals one big batch, and 2 processes equal 1, up to
float rounding: `step.train_step` does the forward and backward passes.

Deterministic given `seed`: the data order is a function of (seed, epoch) alone
(`MicroBatchSampler`), a row found unusable while its batch is built is replaced by a function of
the row alone (`data.TrainingCollator`), and a resumed run restores the step, optimizer, RNG states
and the rows found unusable so far, so it retraces the uninterrupted run exactly.

No run is lost or mixed: the run folder is claimed first (`run_folder.claim`: an existing run is
refused unless resumed or overwritten), every file is written in one step, and bad data rows are
skipped and reported (`run_folder.SkipReport`) until more than `max_bad_fraction` of them are bad.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UsageError
from ..model import PaliGemma
from ..progress import progress_bar
from . import checkpoint as ckpt
from . import lora
from .data import DataError, MicroBatchSampler, TrainingCollator, as_dataset, usable_examples
from .distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    init_distributed,
    process_device,
    shard_bounds,
    wrap_model,
)
from .evaluation import check_eval_task, evaluate
from .freezing import count_trainable, set_trainable
from .run_folder import FINAL_DIR, MetricsLog, SkipReport, claim, write_config
from .schedule import build_optimizer, lr_at, set_lr
from .step import train_step
from .widening import needs_widening, widen_bf16


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
    bf16: bool = False  # bfloat16 autocast (float32 instead on a CPU without native bf16: step.autocast_context)
    device: str = "cpu"  # cpu, cuda (GPU LOCAL_RANK under torchrun), cuda:N or auto (cuda if there is one)
    quantize: str | None = None  # QLoRA: "int8" | "int4" frozen decoder projections under the adapters
    gradient_checkpointing: bool = False
    freeze: tuple[str, ...] = ()  # of "vision", "projector", "embeddings", "decoder"
    attention_only: bool = False  # train language_model.layers.*.self_attn.* only
    lora_rank: int = 0  # > 0: LoRA adapters on the decoder projections, base frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    seed: int = 0
    shuffle: bool = True
    max_length: int | None = None  # longer samples are skipped as bad rows (nothing is truncated)
    strict: bool = False  # the first bad data row raises instead of being skipped
    max_bad_fraction: float = 0.5  # stop once more than this fraction of a data set's rows is unusable
    num_workers: int = 0  # DataLoader worker processes (image decoding)
    eval_every: int = 0  # evaluate every N steps (0: at the end only)
    eval_batch_size: int | None = None
    eval_max_new_tokens: int | None = None  # None: longest target + a margin
    eval_task: str | None = None  # also that task's metrics (paligemma.evaluation.TASKS: cider, map, ...)
    save_every: int = 0  # write out/checkpoint-STEP every N steps (0: never; out/final always)
    log_every: int = 1
    resume: bool | str = False  # True: latest checkpoint in out_dir; a path: that checkpoint
    overwrite: bool = False  # out_dir holds another run: delete its files first (else it is refused)
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
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: resume continues the run in out_dir, "
                             "overwrite deletes it")
        if self.quantize is not None and not self.lora_rank:
            raise ValueError("quantize freezes the base as quantized layers: it needs LoRA adapters (lora_rank > 0)")
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
          on_log: Callable[[dict], None] | None = None, mask_codec=None) -> TrainSummary:
    """Fine-tune `model` in place on `train_data`; returns a `TrainSummary`.

    train_data / eval_data: a `FinetuneDataset`, a JSONL path, or a list of dicts / (image, prefix,
    suffix) tuples (images as paths or PIL images). `on_log` gets every metrics record (train and
    eval) on rank 0, as written to out_dir/metrics.jsonl. Under torchrun every process calls
    `train` with the same arguments; rank 0 alone writes files. `mask_codec` decodes segment answers
    when `config.eval_task` is "segment".
    """
    device = process_device(config.device)
    env = init_distributed(device=device)
    out = Path(config.out_dir)
    claim(out, config.resume, config.overwrite, env)  # before anything is read or written
    _seed_everything(config.seed)
    report = SkipReport(out, env, config.max_bad_fraction)
    max_pixels = processor.image_processor.max_pixels
    train_set = as_dataset(train_data, strict=config.strict, max_pixels=max_pixels)
    report.add("train", train_set.num_rows, train_set.skipped, warn=False)  # FinetuneDataset warned already
    eval_set = None
    if eval_data is not None:  # read whole at every evaluation: checked whole now, not hours in
        eval_rows = as_dataset(eval_data, strict=config.strict, max_pixels=max_pixels)
        eval_set, broken = usable_examples(eval_rows, processor, config.max_length, config.strict)
        report.add("eval", eval_rows.num_rows, eval_rows.skipped, warn=False)
        report.add("eval", eval_rows.num_rows, broken)
        if not eval_set:
            raise DataError("the evaluation set has no usable examples")
        if config.eval_task is not None:
            check_eval_task(eval_set, config.eval_task, mask_codec)  # unknown task, unreadable references

    if model.device != device:
        model.to(device)
    _choose_trainable(model, config)
    runner = wrap_model(model, env, config.fsdp)  # FSDP swaps in sharded parameters: before the optimizer
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]

    start_step = 0
    resume_from = _resume_dir(config, out)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, env.rank)
        start_step = state["step"]
        report.restore(state.get("skipped_rows", []))
    report.save()  # a resumed run's file is its checkpoint's, as metrics.jsonl is trimmed to it
    per_epoch = len(train_set) // config.batch_size
    total_steps = config.steps if config.steps is not None else \
        max(1, math.ceil((config.epochs or 1.0) * per_epoch / config.grad_accum))
    batches = _micro_batches(train_set, processor, config, env, start_step, total_steps, report.known_bad("train"))

    log = MetricsLog(out, env, on_log, start_step)
    trainable, _ = count_trainable(model)
    if env.is_main:
        write_config(out, asdict(config))
    bar = progress_bar(config.progress and env.is_main, total_steps, "step", initial=start_step)
    summary = TrainSummary(steps=start_step, losses=[], final_loss=None, out_dir=str(out),
                           trainable_parameters=trainable)
    step_samples = config.batch_size * config.grad_accum
    started = time.perf_counter()
    model.train()
    for step in range(start_step, total_steps):
        tick = time.perf_counter()
        micro, skipped = [], []
        for batch, found in (next(batches) for _ in range(config.grad_accum)):
            micro.append(batch)
            skipped += found
        for found in all_gather_objects(skipped, env):  # every rank learns every rank's rows: same decisions
            report.add("train", train_set.num_rows, found, step=step + 1)
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
            summary.evals.append(_evaluate(model, processor, eval_set, config, env, log, done, mask_codec))
        if config.save_every and done % config.save_every == 0:
            state = {"step": done, "micro_batches": done * config.grad_accum, "total_steps": total_steps,
                     "epoch": done * config.grad_accum / per_epoch, "world_size": env.world_size,
                     "skipped_rows": report.batch_records(), "config": asdict(config)}
            ckpt.save_checkpoint(out / f"checkpoint-{done}", model, optimizer, state, config.model_dir, env,
                                 config.extra_files)
    if bar is not None:
        bar.close()
    if eval_set is not None:
        summary.evals.append(_evaluate(model, processor, eval_set, config, env, log, summary.steps, mask_codec))
    ckpt.save_final(out / FINAL_DIR, model, config.model_dir, env, config.extra_files)
    if env.is_main:
        summary.final_dir = str(out / FINAL_DIR)
    summary.elapsed = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------------- helpers

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _choose_trainable(model: PaliGemma, config: TrainConfig) -> None:
    """LoRA adapters (over a quantized base with `quantize`), the caller's adapters, or the parts not frozen;
    and gradient checkpointing."""
    if config.quantize is not None:
        lora.quantize_base(model, config.quantize)
    if config.lora_rank:
        lora.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.model_dir)
    elif lora.has_lora(model):  # adapters injected by the caller (apply_lora / load_adapter): train those
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name)
    else:
        set_trainable(model, config.freeze, config.attention_only)
    if needs_widening(model):  # bf16 weights on a CPU without native bf16: float32 arithmetic
        widen_bf16(model)
    model.vision_tower.gradient_checkpointing = config.gradient_checkpointing
    model.language_model.gradient_checkpointing = config.gradient_checkpointing


def _micro_batches(train_set, processor, config: TrainConfig, env: DistEnv, start_step: int, total_steps: int,
                   known_bad: dict[int, str]):
    """An iterator over (this process's share of a micro-batch, rows found unusable building it), for the
    micro-batches of steps start_step .. total_steps - 1."""
    lo, hi = shard_bounds(config.batch_size, env)
    # The sampler yields whole global micro-batches: the collator needs them to pick replacements for bad
    # rows that do not depend on the process count; it builds only the [lo, hi) slice.
    sampler = MicroBatchSampler(len(train_set), config.batch_size, config.seed, config.shuffle,
                                start=start_step * config.grad_accum, stop=total_steps * config.grad_accum)
    collate = TrainingCollator(train_set, processor, config.max_length, lo, hi, config.strict, known_bad)
    # Indices in, examples read by the collator (it may need others than those sampled). Its own
    # generator: a DataLoader otherwise draws a seed from the global RNG when iterated, which would
    # shift a resumed run's random stream (e.g. LoRA dropout) by one draw.
    loader = torch.utils.data.DataLoader(range(len(train_set)), batch_sampler=sampler, num_workers=config.num_workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
    return iter(loader)


def _resume_dir(config: TrainConfig, out: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume is True:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            raise UsageError(f"--resume asked for, but {out} holds no checkpoint-STEP folder with a "
                             f"{ckpt.STATE_FILE} (was the run saved with --save-every?)")
        return found
    if not (Path(config.resume) / ckpt.STATE_FILE).is_file():
        raise UsageError(f"--resume {config.resume}: not a checkpoint folder (no {ckpt.STATE_FILE} in it)")
    return Path(config.resume)


def _evaluate(model, processor, eval_set, config: TrainConfig, env: DistEnv, log: MetricsLog, step: int,
              mask_codec=None) -> dict:
    """Rank 0 evaluates the unwrapped (FSDP: gathered) model; the others wait (and receive nothing)."""
    result = {}
    model = ckpt.gathered_model(model)
    if env.is_main:
        result = evaluate(model, processor, eval_set, batch_size=config.eval_batch_size or config.batch_size,
                          bf16=config.bf16, max_new_tokens=config.eval_max_new_tokens, max_length=config.max_length,
                          task=config.eval_task, codec=mask_codec)
        result = {"step": step, **result}
        log.write({k: v for k, v in result.items() if k != "examples"})
    barrier(env)
    return result



