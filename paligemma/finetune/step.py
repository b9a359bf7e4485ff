"""One optimizer step's forward and backward passes, with the loss weighted by target tokens.

The loss of a step is the mean over *all* its suffix tokens: every micro-batch contributes
sum(token losses) / N, where N is the step's token count over all micro-batches and all
processes. So accumulation equals one big batch, and 2 processes equal 1, up to float rounding; a
mean of per-batch means would not (batches hold different numbers of answer tokens).

Kept apart from `trainer` (the loop) so that `evaluation`, which `trainer` calls, can share
`autocast_context` and `count_targets` without importing the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
from typing import Sequence

import torch
from torch import nn

from ..kernels import native_bf16
from ..model import IGNORE_INDEX
from .distributed import DistEnv, all_reduce_sum, gradient_sync

log = logging.getLogger(__name__)


def autocast_context(bf16: bool, device: torch.device | str = "cpu"):
    """bfloat16 autocast for `device`'s type (cpu, cuda) when asked; a no-op otherwise.

    On a CPU without native bf16 arithmetic (kernels.native_bf16: no AVX512-BF16, or capped by
    PALIGEMMA_ISA), torch runs bf16 matmuls, the backward's included, on its reference GEMM, many times
    slower than float32: there the step computes in float32 instead (no autocast), and says so once.
    """
    device_type = torch.device(device).type
    if not bf16:
        return contextlib.nullcontext()
    if device_type == "cpu" and not native_bf16():
        _say_float32_once()
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


@functools.cache
def _say_float32_once() -> None:
    log.warning("paligemma: this CPU has no native bf16 arithmetic, where torch's bf16 matmuls take a slow "
                "reference path: --bf16 autocast is off and training computes in float32")


@functools.cache
def limit_heap_growth() -> bool:
    """glibc only, once per process: blocks of 2 MiB or more get their own memory maps, handed back when freed.

    glibc's default threshold rises to the largest block freed so far (up to 32 MiB); a step's
    activations (a 3B decoder layer's (288, 2048) to (288, 16384) tensors) then come from the heap,
    where freed blocks stay resident behind long-lived ones: peak RSS grew by ~40 MiB per decoder
    layer, +0.8 to 1.1 GiB for a 3B step (BENCHMARKS.md, "Fine-tuning memory"). Measured on a
    PaliGemma 2 int4 step at AVX2: 4 MiB still let its (288, 2304) float32 activations pile up (4.43
    GiB peak), 1 MiB cost 80 CPU s against 63 (presumably mapping the ~1 MiB products of
    the dequantized blocks afresh each time); 2 MiB: 3.84 GiB, 63 s. Returns whether the setting was made.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return ctypes.CDLL(None).mallopt(-3, 2 << 20) == 1  # M_MMAP_THRESHOLD; a fixed value stops the rise
    except (OSError, AttributeError):
        return False


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors moved to `device` (the collators build them on the CPU)."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that the next-token loss is computed over (labels shifted by one, IGNORE_INDEX excluded)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def train_step(runner: nn.Module, micro_batches: Sequence[dict], params: Sequence[torch.Tensor],
               env: DistEnv = DistEnv(), bf16: bool = False,
               max_grad_norm: float | None = None) -> tuple[float, float]:
    """Forward and backward over one step's micro-batches (this process's share); returns (loss, grad_norm).

    `runner` is the model as `distributed.wrap_model` returns it. The gradients of `params` are then
    those of the token-weighted mean loss over the whole step (all micro-batches, all processes),
    clipped to `max_grad_norm` (None: not clipped); `grad_norm` is their norm before clipping. The
    caller steps the optimizer and zeroes the gradients.
    """
    limit_heap_growth()
    # The step's target-token count over every micro-batch and every process: the loss divisor.
    local_counts = [count_targets(batch["labels"]) for batch in micro_batches]
    global_count = float(all_reduce_sum(torch.tensor(float(sum(local_counts))), env))
    loss_sum = torch.zeros((), dtype=torch.float64)
    device = params[0].device if params else torch.device("cpu")
    for index, (batch, count) in enumerate(zip(micro_batches, local_counts)):
        with gradient_sync(runner, sync=index == len(micro_batches) - 1):
            with autocast_context(bf16, device):
                # The LM head runs on the answer positions only: logits (N, V), not (B, T, V).
                output = runner(**to_device(batch, device), loss_only=True)
                # mean * count = this micro-batch's summed token loss; no target at all keeps the graph.
                token_sum = output.loss.float() * count if count else output.logits.sum() * 0.0
            # DDP and FSDP average gradients over processes, hence * world_size: we want their sum.
            (token_sum * (env.world_size / global_count)).backward()
        loss_sum += token_sum.detach().double().cpu()
    loss = float(all_reduce_sum(loss_sum, env)) / global_count
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: DTensor
    return loss, grad_norm
