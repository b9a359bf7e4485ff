"""CLIP and SigLIP losses against their textbook formulas, and at extreme logits."""

import math

import pytest
import torch

from paligemma.losses import (
    CLIP_INIT_LOG_SCALE,
    SIGLIP_INIT_BIAS,
    SIGLIP_INIT_LOG_SCALE,
    clip_loss,
    pairwise_logits,
    siglip_loss,
)


def _embeddings(n=5, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def test_pairwise_logits_are_scaled_cosine_similarities():
    images, texts = _embeddings()
    logits = pairwise_logits(images, texts, torch.tensor(math.log(3.0), dtype=torch.float64))
    i, j = 1, 3
    cosine = images[i] @ texts[j] / (images[i].norm() * texts[j].norm())
    torch.testing.assert_close(logits[i, j], 3.0 * cosine)


def test_clip_loss_matches_the_direct_formula():
    images, texts = _embeddings()
    log_scale = torch.tensor(CLIP_INIT_LOG_SCALE, dtype=torch.float64)
    logits = pairwise_logits(images, texts, log_scale)
    n = logits.shape[0]
    # -1/n sum_i log( e^{l_ii} / sum_j e^{l_ij} ), for rows (images) and columns (texts)
    rows = -sum(math.log(math.exp(logits[i, i]) / sum(math.exp(logits[i, j]) for j in range(n))) for i in range(n)) / n
    cols = -sum(math.log(math.exp(logits[i, i]) / sum(math.exp(logits[j, i]) for j in range(n))) for i in range(n)) / n
    assert clip_loss(images, texts, log_scale).item() == pytest.approx((rows + cols) / 2, rel=1e-12)


def test_siglip_loss_matches_the_direct_formula():
    images, texts = _embeddings(seed=1)
    log_scale = torch.tensor(SIGLIP_INIT_LOG_SCALE, dtype=torch.float64)
    bias = torch.tensor(SIGLIP_INIT_BIAS, dtype=torch.float64)
    logits = pairwise_logits(images, texts, log_scale) + bias
    n = logits.shape[0]
    direct = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            direct -= math.log(1 / (1 + math.exp(-z * logits[i, j].item())))
    assert siglip_loss(images, texts, log_scale, bias).item() == pytest.approx(direct / n, rel=1e-12)


def test_siglip_initialisation_is_the_papers():
    assert math.exp(SIGLIP_INIT_LOG_SCALE) == pytest.approx(10.0) and SIGLIP_INIT_BIAS == -10.0


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_extreme_logits_stay_finite_with_finite_gradients(loss_name):
    images, texts = _embeddings(n=4)
    images, texts = images.float().requires_grad_(), texts.float()
    log_scale = torch.tensor(12.0, requires_grad=True)  # scale e^12 ~ 160000: logits far past exp's range
    bias = torch.tensor(-50.0, requires_grad=True)
    loss = clip_loss(images, texts, log_scale) if loss_name == "clip" else siglip_loss(images, texts, log_scale, bias)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(images.grad).all() and torch.isfinite(log_scale.grad)
    assert bias.grad is None if loss_name == "clip" else torch.isfinite(bias.grad)  # CLIP has no bias


def test_perfect_alignment_gives_small_losses():
    base = torch.eye(6, dtype=torch.float64)
    assert clip_loss(base, base, torch.tensor(5.0, dtype=torch.float64)) < 1e-3
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-70.0, dtype=torch.float64)
    assert siglip_loss(base, base, scale, bias) < 1e-3
