"""Learning-rate schedule and optimizer construction.

The schedule is a pure function of the step, so resuming needs only the step number (no scheduler
object to serialise): linear warmup from 0 to the peak over `warmup_steps`, then a cosine decay
to `min_lr_ratio * peak` at `total_steps` (big_vision's "warmup + cosine").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): the update that takes the model to step + 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not on norms or biases).

    Group order is fixed (decayed, then not decayed, each in `named_parameters` order), so the
    optimizer state of a checkpoint maps back onto the same parameters when resuming.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise UsageError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-parameter loop is the same arithmetic whatever the parameter grouping,
    # which keeps a sharded (FSDP) run and a plain one numerically aligned.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
