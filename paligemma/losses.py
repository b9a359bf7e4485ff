"""Contrastive image-text losses: CLIP's softmax loss and SigLIP's sigmoid loss.

Both score every image against every text in a batch of n pairs, logits (n, n) = scale * cos-sim,
where pair (i, i) is a match and every (i, j != i) is not.

- CLIP (Radford et al. 2021): each row is an n-way classification "which text is mine?", and each
  column likewise for texts; the loss is the mean of both cross-entropies. Every term is
  normalised over the whole batch, so it needs the batch's global view (and a large batch).
- SigLIP (Zhai et al. 2023): every (i, j) is an independent binary question "is this a match?",
  answered with a sigmoid of logit + bias. No normalisation over the batch; the bias starts at
  -10 because almost all pairs are negatives (n - 1 of every n), which keeps the first steps from
  being swamped by them.

The temperature is learned as a log-scale (t' with scale = exp(t')) so it stays positive. Both
losses are written in log-sum-exp / log-sigmoid form: extreme logits give large finite losses and
finite gradients, never inf or NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
SIGLIP_INIT_LOG_SCALE = math.log(10.0)  # SigLIP: t' = log 10
SIGLIP_INIT_BIAS = -10.0


def pairwise_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """(n, D) and (n, D) embeddings -> (n, n) logits exp(log_scale) * cosine similarity; row = image."""
    images = F.normalize(image_embeds, dim=-1)
    texts = F.normalize(text_embeds, dim=-1)
    return images @ texts.T * log_scale.exp()


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric softmax cross-entropy: mean of image->text and text->image classification losses."""
    logits = pairwise_logits(image_embeds, text_embeds, log_scale)
    targets = torch.arange(logits.shape[0], device=logits.device)
    # cross_entropy computes log_softmax with the max subtracted: stable for any logit size.
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, log_scale: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss: -sum_ij log sigmoid(z_ij * (logit_ij + b)) / n, z = +1 on matches, -1 elsewhere."""
    logits = pairwise_logits(image_embeds, text_embeds, log_scale) + bias
    n = logits.shape[0]
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    # logsigmoid(x) = -softplus(-x), computed without overflow for large |x|.
    return -F.logsigmoid(signs * logits).sum() / n
