"""The VQ-VAE encoder: big_vision's (AiT's) layout, and masks -> codes -> masks on the demo codec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import paligemma
from paligemma.demo.recipe import EVAL_SEED0, SCENE_SIZE
from paligemma.demo.scenes import generate_scene, mask_iou
from paligemma.segmentation import mask_in_box, mask_to_64
from paligemma.vqvae import MaskCodec, load_mask_codec

DEMO_CODEC = Path(paligemma.__file__).parent / "demo_model" / "mask_codec.safetensors"


def _ait_shapes(hidden_dim=16, downsample_ratio=16, codebook_dim=512, num_tokens=128, num_resnet_blocks=2):
    """Parameter shapes of AiT's `VQVAE(channels=1, residul_type='v1')` (SwinTransformer/AiT,
    vae/models/VQVAE.py), following its constructor step by step; the defaults are
    vae/configs/insseg/ait_insseg_vqvae.py's."""
    shapes = {"_vq_vae._embedding": (num_tokens, codebook_dim)}
    layer_num = int(np.log2(downsample_ratio) - 1)

    def conv(name, c_in, c_out, k, transposed=False):
        shapes[f"{name}.weight"] = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)

    def resblock(name, c):
        conv(f"{name}.net.0", c, c, 3), conv(f"{name}.net.2", c, c, 3), conv(f"{name}.net.4", c, c, 1)

    index, dim = 0, hidden_dim
    conv(f"encoder.{index}", 1, dim, 4)  # enc_layers = [Conv2d(channels, dim, 4, 2, 1), ReLU]
    index += 2
    for _ in range(layer_num):  # Conv2d(dim, 2 dim, 4, 2, 1), ReLU
        conv(f"encoder.{index}", dim, dim * 2, 4)
        index, dim = index + 2, dim * 2
    for _ in range(num_resnet_blocks):
        resblock(f"encoder.{index}", dim)
        index += 1
    conv(f"encoder.{index}", dim, codebook_dim, 1)

    dim = hidden_dim * downsample_ratio // 2
    conv("decoder.0", codebook_dim, dim, 1)  # dec_layers = [Conv2d(codebook_dim, dim, 1), ReLU]
    index = 2
    for _ in range(num_resnet_blocks):
        resblock(f"decoder.{index}", dim)
        index += 1
    conv(f"decoder.{index}", dim, dim, 4, transposed=True)  # ConvTranspose2d(dim, dim, 4, 2, 1), ReLU
    index += 2
    for _ in range(layer_num):
        conv(f"decoder.{index}", dim, dim // 2, 4, transposed=True)
        index, dim = index + 2, dim // 2
    conv(f"decoder.{index}", dim, 1, 1)
    return shapes


def test_default_codec_is_ait_instance_mask_vqvae():
    ours = {name: tuple(t.shape) for name, t in MaskCodec().state_dict().items()}
    assert ours == _ait_shapes()


def test_encoder_convs_keep_tf_same_sizes():
    """4x4 stride-2 'SAME' halves 64 -> 32 -> 16 -> 8 -> 4 like PyTorch's padding=1 in AiT."""
    codec = MaskCodec().eval()
    x = torch.zeros(1, 1, 64, 64)
    sizes = []
    with torch.no_grad():
        for layer in codec.encoder:
            x = layer(x)
            sizes.append(tuple(x.shape[1:]))
        reference = torch.nn.Conv2d(1, 16, 4, stride=2, padding=1)
        reference.load_state_dict(codec.encoder[0].state_dict())
        mask = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(codec.encoder[0](mask), reference(mask), rtol=0, atol=0)
    assert sizes[0] == (16, 32, 32) and sizes[6] == (128, 4, 4) and sizes[-1] == (512, 4, 4)


@pytest.fixture(scope="module")
def demo_codec():
    return load_mask_codec(DEMO_CODEC)


def test_demo_codec_has_an_encoder(demo_codec):
    assert demo_codec.encoder is not None
    assert demo_codec.config.encoder_channels == (8, 16, 32, 32)


def test_demo_codec_round_trips_held_out_shape_masks(demo_codec):
    """encode -> decode -> back into the box: IoU >= 0.9 on every object of 30 held-out scenes."""
    ious64, ious = [], []
    for seed in range(EVAL_SEED0, EVAL_SEED0 + 30):
        scene = generate_scene(seed, SCENE_SIZE)
        masks64 = np.stack([mask_to_64(obj.mask, obj.box) for obj in scene.objects])
        with torch.no_grad():
            codes = demo_codec.encode(masks64)
            assert torch.equal(codes, demo_codec.encode(masks64))
            decoded = demo_codec.decode(codes).numpy()
        for obj, truth64, mask64 in zip(scene.objects, masks64, decoded):
            ious64.append(mask_iou(mask64 > 0, truth64 > 0.5))
            ious.append(mask_iou(mask_in_box(mask64, obj.box, (SCENE_SIZE, SCENE_SIZE)), obj.mask))
    assert len(ious) > 50
    assert min(ious64) >= 0.9 and min(ious) >= 0.9, (min(ious64), min(ious))

