"""The SigLIP-style dual encoder: shapes, padding, hand-over to PaliGemma, and that it learns."""

import pytest
import torch
from tiny_models import tiny_config

from paligemma.config import VisionConfig
from paligemma.contrastive import (
    DualEncoder,
    DualEncoderConfig,
    TextTowerConfig,
    pad_texts,
    retrieval_recall_at_1,
    zero_shot_predictions,
)
from paligemma.losses import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE
from paligemma.model import PaliGemma


def tiny_dual_encoder(loss="sigmoid", vision=None, seed=0) -> DualEncoder:
    torch.manual_seed(seed)
    vision = vision or VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, patch_size=8, image_size=32)
    text = TextTowerConfig(vocab_size=50, max_length=12, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2)
    return DualEncoder(DualEncoderConfig(vision=vision, text=text, embed_dim=16, loss=loss))


def test_embeddings_are_unit_vectors_of_the_shared_size():
    model = tiny_dual_encoder()
    images = model.encode_images(torch.randn(3, 3, 32, 32))
    ids, mask = pad_texts([[5, 6, 7], [8], [9, 10]], pad_id=0)
    texts = model.encode_texts(ids, mask)
    assert images.shape == texts.shape == (3, 16)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))


def test_sigmoid_model_starts_at_the_papers_temperature_and_bias():
    model = tiny_dual_encoder("sigmoid")
    assert model.log_scale.item() == pytest.approx(SIGLIP_INIT_LOG_SCALE)
    assert model.bias.item() == SIGLIP_INIT_BIAS and model.bias.requires_grad
    softmax = tiny_dual_encoder("softmax")
    assert not softmax.bias.requires_grad  # CLIP has no bias


def test_padding_does_not_change_a_text_embedding():
    model = tiny_dual_encoder().eval()
    alone = model.encode_texts(*pad_texts([[5, 6, 7]], pad_id=0))
    ids, mask = pad_texts([[5, 6, 7], [8, 9, 10, 11, 12, 13]], pad_id=0)  # row 0 padded with 3 pads
    torch.testing.assert_close(model.encode_texts(ids, mask)[:1], alone)
    ids[0, 3:] = 42  # whatever sits in the padding is ignored
    torch.testing.assert_close(model.encode_texts(ids, mask)[:1], alone)


def test_text_longer_than_the_tower_is_an_error():
    model = tiny_dual_encoder()
    with pytest.raises(ValueError, match="max_length"):
        model.encode_texts(*pad_texts([list(range(1, 20))], pad_id=0))
    with pytest.raises(ValueError, match="at least one token"):
        pad_texts([[1], []], pad_id=0)


def test_pretrained_tower_loads_into_paligemma_by_name():
    config = tiny_config("gemma")
    dual = tiny_dual_encoder(vision=config.vision)
    paligemma = PaliGemma(config)
    missing, unexpected = paligemma.load_state_dict(dual.vision_tower_state_dict(), strict=False)
    assert not unexpected
    assert not [k for k in missing if k.startswith("vision_tower.")]
    pixels = torch.randn(2, 3, config.vision.image_size, config.vision.image_size)
    torch.testing.assert_close(paligemma.vision_tower(pixels), dual.vision(pixels))


def test_recall_counts_identical_captions_as_interchangeable():
    images = torch.eye(3)
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 0 and 1 swapped
    assert retrieval_recall_at_1(images, texts, ["a", "b", "c"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert retrieval_recall_at_1(images, texts, ["a", "a", "c"]) == (1.0, 1.0)
    assert zero_shot_predictions(images, texts) == [1, 0, 2]


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_training_on_a_tiny_batch_lowers_the_loss_and_beats_chance(loss):
    torch.manual_seed(1)
    n = 12
    # Each image is one flat colour; its "caption" is a token naming that colour plus a shared token.
    colours = torch.rand(n, 3) * 2 - 1
    pixels = colours[:, :, None, None].expand(n, 3, 32, 32).contiguous() + 0.05 * torch.randn(n, 3, 32, 32)
    ids, mask = pad_texts([[1, 10 + i] for i in range(n)], pad_id=0)
    model = tiny_dual_encoder(loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        value = model(pixels, ids, mask)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        recall, _ = retrieval_recall_at_1(model.encode_images(pixels), model.encode_texts(ids, mask),
                                          [str(i) for i in range(n)])
    assert recall >= 0.5  # chance is 1/12
