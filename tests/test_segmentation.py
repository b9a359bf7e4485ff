"""Mask codec (big_vision's VQ-VAE) and `segment` answers: shapes, a numpy re-implementation of
big_vision's Flax/TF math on an npz in `vae-oid.npz`'s layout, safetensors round trip, a codec trained
for a few seconds round-tripping simple masks, strict answer parsing, mask placement and drawing."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from decoding_helpers import written_answers
from PIL import Image

import paligemma
from paligemma.drawing import draw_masks
from paligemma.segmentation import Segmentation, format_segmentations, mask_in_box, mask_to_64, parse_segmentations
from paligemma.vqvae import (
    MaskCodec,
    MaskCodecConfig,
    codec_from_state_dict,
    fit_mask_codec,
    load_mask_codec,
    save_mask_codec,
)

SMALL = MaskCodecConfig(num_codes=128, embed_dim=8, hidden=16, encoder_channels=(4, 4, 8, 8))
# The demo model's codec: package data, so a missing file fails the tests that use it.
SHIPPED_CODEC = Path(paligemma.__file__).parent / "demo_model" / "mask_codec.safetensors"


def _loc(*values):
    return "".join(f"<loc{v:04d}>" for v in values)


def _seg(*values):
    return "".join(f"<seg{v:03d}>" for v in values)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# ---------------------------------------------------------------------- a numpy big_vision, written from its code

def _np_conv(x, kernel_hwio, stride, pads):
    """lax/tf cross-correlation of NHWC `x` with an HWIO kernel, explicit ((top, bottom), (left, right)) pads."""
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw = kernel_hwio.shape[:2]
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel_hwio.shape[3]))
    for u in range(kh):
        for v in range(kw):
            window = x[:, u:u + stride * (ho - 1) + 1:stride, v:v + stride * (wo - 1) + 1:stride]
            out += np.einsum("bhwc,co->bhwo", window, kernel_hwio[u, v])
    return out


def _tf_same(size, k, s):
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _np_conv_transpose(x, kernel, stride, padding):
    """lax.conv_transpose(transpose_kernel=True) as Flax's ConvTranspose calls it: the input dilated by
    `stride`, padded by `padding`, correlated with the kernel flipped in space and in/out swapped."""
    b, h, w, c = x.shape
    dilated = np.zeros((b, (h - 1) * stride + 1, (w - 1) * stride + 1, c))
    dilated[:, ::stride, ::stride] = x
    return _np_conv(dilated, kernel[::-1, ::-1].swapaxes(2, 3), 1, ((padding, padding), (padding, padding)))


def _flax_params(ckpt):
    """big_vision's `_get_params`: every PyTorch kernel transposed (2, 3, 1, 0)."""
    return {name[:-len(".weight")]: (np.transpose(w, (2, 3, 1, 0)), ckpt[name[:-len("weight")] + "bias"])
            for name, w in ckpt.items() if name.endswith(".weight")}


def _np_resblock(p, x, prefix, same):
    original = x
    for i, act in ((0, True), (2, True), (4, False)):
        kernel, bias = p[f"{prefix}.net.{i}"]
        k = kernel.shape[0]
        pads = (_tf_same(x.shape[1], k, 1), _tf_same(x.shape[2], k, 1)) if same else ((k // 2,) * 2,) * 2
        x = _np_conv(x, kernel, 1, pads) + bias
        x = np.maximum(x, 0) if act else x
    return x + original


def _np_decode(ckpt, codes):
    """big_vision's `reconstruct_masks`: Flax `Decoder` over `_quantized_values_from_codebook_indices`."""
    p = _flax_params(ckpt)
    x = ckpt["_vq_vae._embedding"][np.asarray(codes).reshape(-1)].reshape(len(codes), 4, 4, -1).astype(np.float64)
    x = np.maximum(_np_conv(x, p["decoder.0"][0], 1, ((0, 0), (0, 0))) + p["decoder.0"][1], 0)
    x = _np_resblock(p, x, "decoder.2", same=False)
    x = _np_resblock(p, x, "decoder.3", same=False)
    for i in (4, 6, 8, 10):
        x = np.maximum(_np_conv_transpose(x, p[f"decoder.{i}"][0], 2, 2) + p[f"decoder.{i}"][1], 0)
    x = _np_conv(x, p["decoder.12"][0], 1, ((0, 0), (0, 0))) + p["decoder.12"][1]
    return x[..., 0]  # (B, 64, 64)


def _np_encode(ckpt, masks):
    """big_vision's TF `encode_to_codebook_indices` -> (codes (B, 16), encoder output (B, 16, D))."""
    p = _flax_params(ckpt)
    x = 2.0 * (np.asarray(masks, dtype=np.float64)[..., None] - 0.5)

    def conv(x, name, stride):
        kernel, bias = p[name]
        k = kernel.shape[0]
        return _np_conv(x, kernel, stride, (_tf_same(x.shape[1], k, stride), _tf_same(x.shape[2], k, stride))) + bias

    for n in range(4):
        x = np.maximum(conv(x, f"encoder.{2 * n}", 2), 0)
    for n in range(2):
        x = _np_resblock(p, x, f"encoder.{8 + n}", same=True)
    flat = conv(x, "encoder.10", 1).reshape(-1, ckpt["_vq_vae._embedding"].shape[1])
    e = ckpt["_vq_vae._embedding"].astype(np.float64)
    distances = (flat**2).sum(1, keepdims=True) + (e**2).sum(1) - 2 * flat @ e.T
    return distances.argmin(1).reshape(-1, 16), flat.reshape(len(masks), 16, -1)


def _big_vision_checkpoint(config, seed=0, with_encoder=True):
    """Random float32 tensors with `vae-oid.npz`'s names and PyTorch layouts, written out by hand."""
    rng = np.random.default_rng(seed)
    ckpt = {"_vq_vae._embedding": rng.normal(size=(config.num_codes, config.embed_dim))}

    def conv(name, c_out, c_in, k, transposed=False):
        shape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
        ckpt[f"{name}.weight"] = rng.normal(size=shape) * math.sqrt(2 / (c_in * k * k / (4 if transposed else 1)))
        ckpt[f"{name}.bias"] = rng.normal(size=c_out) * 0.1

    def resblock(name, c):
        conv(f"{name}.net.0", c, c, 3), conv(f"{name}.net.2", c, c, 3), conv(f"{name}.net.4", c, c, 1)

    h = config.hidden
    conv("decoder.0", h, config.embed_dim, 1)
    resblock("decoder.2", h), resblock("decoder.3", h)
    for i, (c_in, c_out) in enumerate(zip((h, h, h // 2, h // 4), (h, h // 2, h // 4, h // 8))):
        conv(f"decoder.{4 + 2 * i}", c_out, c_in, 4, transposed=True)
    conv("decoder.12", 1, h // 8, 1)
    if with_encoder:
        enc = config.encoder_channels
        for i, (c_in, c_out) in enumerate(zip((1,) + enc[:-1], enc)):
            conv(f"encoder.{2 * i}", c_out, c_in, config.encoder_kernel)
        resblock("encoder.8", enc[-1]), resblock("encoder.9", enc[-1])
        conv("encoder.10", config.embed_dim, enc[-1], config.encoder_out_kernel)
    return {k: v.astype(np.float32) for k, v in ckpt.items()}


def _shapes_64():
    """Six simple 64x64 masks (as the in-box part of an object): full, ellipse, halves, triangles."""
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    return np.stack([np.ones((64, 64), bool), (yy - 32) ** 2 + (xx - 32) ** 2 <= 30**2, yy < 32, xx < 32,
                     xx > yy, yy < 64 - xx])


# ---------------------------------------------------------------------- codec shapes and checks

def test_default_config_is_the_vae_oid_architecture():
    codec = MaskCodec()
    shapes = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    assert shapes["_vq_vae._embedding"] == (128, 512)
    assert shapes["decoder.0.weight"] == (128, 512, 1, 1)
    assert shapes["decoder.2.net.0.weight"] == (128, 128, 3, 3) and shapes["decoder.3.net.4.weight"] == (128, 128, 1, 1)
    assert [shapes[f"decoder.{i}.weight"] for i in (4, 6, 8, 10)] == [
        (128, 128, 4, 4), (128, 64, 4, 4), (64, 32, 4, 4), (32, 16, 4, 4)]  # ConvTranspose2d: (in, out, k, k)
    assert shapes["decoder.12.weight"] == (1, 16, 1, 1)
    assert sorted({k.split(".")[1] for k in shapes if k.startswith("encoder.")}, key=int) == [
        "0", "2", "4", "6", "8", "9", "10"]


def test_decode_and_encode_shapes():
    codec = MaskCodec(SMALL)
    with torch.no_grad():
        masks = codec.decode(torch.randint(0, 128, (3, 16)))
        codes = codec.encode(np.random.default_rng(0).random((5, 64, 64)) > 0.5)
    assert masks.shape == (3, 64, 64) and masks.dtype == torch.float32
    assert codes.shape == (5, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 128
    assert codec.decode(torch.zeros(0, 16, dtype=torch.long)).shape == (0, 64, 64)


@pytest.mark.parametrize("codes, match", [([[0] * 15], r"\(batch, 16\)"), ([[0] * 16, [128] * 16], "0..127"),
                                          ([[-1] + [0] * 15], "0..127")])
def test_decode_rejects_bad_codes(codes, match):
    with pytest.raises(ValueError, match=match):
        MaskCodec(SMALL).decode(codes)


def test_encode_rejects_wrong_mask_size():
    with pytest.raises(ValueError, match="64, 64"):
        MaskCodec(SMALL).encode(np.zeros((1, 32, 32)))


# ---------------------------------------------------------------------- big_vision's npz layout

@pytest.mark.parametrize("config", [
    MaskCodecConfig(),  # vae-oid.npz's shapes
    # odd kernels: TF 'SAME' pads stride-2 convs asymmetrically (0 before, 1 after)
    MaskCodecConfig(num_codes=32, embed_dim=12, hidden=16, encoder_channels=(4, 8, 8, 16), encoder_kernel=3,
                    encoder_out_kernel=3),
], ids=["vae-oid", "odd-kernels"])
def test_npz_in_big_vision_layout_matches_numpy_big_vision(tmp_path, config):
    ckpt = _big_vision_checkpoint(config)
    np.savez(tmp_path / "vae.npz", **ckpt)
    codec = load_mask_codec(tmp_path / "vae.npz")
    assert codec.config == config and codec.encoder is not None

    codes = np.random.default_rng(1).integers(0, config.num_codes, (3, 16))
    codes[0] = np.arange(16) % config.num_codes  # every grid cell distinct: a transposed grid would show
    with torch.no_grad():
        ours = codec.decode(codes).double().numpy()
    reference = _np_decode(ckpt, codes)
    assert np.abs(reference).max() > 1e-2  # not a vacuous comparison
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

    masks = np.zeros((3, 64, 64), np.float32)
    masks[0, 5:40, 10:60] = 1
    masks[1] = np.random.default_rng(2).random((64, 64))
    masks[2, :, :17] = 1
    ref_codes, ref_z = _np_encode(ckpt, masks)
    with torch.no_grad():
        z = codec.encode_vectors(torch.from_numpy(masks)).double().numpy()
        our_codes = codec.encode(masks).numpy()
    np.testing.assert_allclose(z, ref_z, rtol=1e-4, atol=1e-4 * np.abs(ref_z).max())
    np.testing.assert_array_equal(our_codes, ref_codes)


def test_decoder_only_npz_and_ignored_quantizer_state(tmp_path):
    ckpt = _big_vision_checkpoint(SMALL, with_encoder=False)
    ckpt["_vq_vae._ema_w"] = np.zeros((128, 8), np.float32)  # VQ training state, if a file carries it
    np.savez(tmp_path / "dec.npz", **ckpt)
    codec = load_mask_codec(tmp_path / "dec.npz")
    assert codec.encoder is None
    with torch.no_grad():
        np.testing.assert_allclose(codec.decode([[3] * 16]).double().numpy(), _np_decode(ckpt, [[3] * 16]),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="no encoder"):
        codec.encode(np.zeros((1, 64, 64)))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("decoder.12.bias"), "missing.*decoder.12.bias"),
    (lambda c: c.update({"decoder.14.weight": np.zeros(1, np.float32)}), "unexpected.*decoder.14.weight"),
    (lambda c: c.update({"encoder.8.net.0.weight": np.zeros((8, 8, 5, 5), np.float32)}), "misshapen.*encoder.8.net"),
    (lambda c: c.pop("_vq_vae._embedding"), "not a big_vision mask VQ-VAE"),
])
def test_mismatched_checkpoint_is_refused_naming_the_tensor(edit, match):
    ckpt = _big_vision_checkpoint(SMALL)
    edit(ckpt)
    with pytest.raises(ValueError, match=match):
        codec_from_state_dict(ckpt)


def test_safetensors_round_trip(tmp_path):
    codec = codec_from_state_dict(_big_vision_checkpoint(SMALL, seed=3))
    save_mask_codec(codec, tmp_path / "codec.safetensors")
    again = load_mask_codec(tmp_path / "codec.safetensors")
    assert again.config == codec.config
    for (name, a), (name_b, b) in zip(codec.state_dict().items(), again.state_dict().items()):
        assert name == name_b and torch.equal(a, b)
    codes = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(codec.decode(codes), again.decode(codes))
    with pytest.raises(ValueError, match=".npz.*safetensors"):
        load_mask_codec(tmp_path / "codec.bin")


# ---------------------------------------------------------------------- a trained codec round-trips masks

@pytest.fixture(scope="module")
def trained_codec():
    """A few seconds of training on six shapes (seeds 0-3 at 200 steps: every IoU >= 0.98; 150 steps
    already gave >= 0.76). Round trips below are checked with margin, as training is seed-sensitive."""
    torch.manual_seed(0)
    codec = MaskCodec(MaskCodecConfig(num_codes=32, embed_dim=16, hidden=64, encoder_channels=(8, 16, 32, 64)))
    losses = fit_mask_codec(codec, torch.from_numpy(_shapes_64()).float(), steps=200, batch_size=8,
                            generator=torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0] / 3
    return codec


def test_trained_codec_round_trips_simple_masks(trained_codec):
    masks = _shapes_64()
    with torch.no_grad():
        codes = trained_codec.encode(masks)
        assert torch.equal(codes, trained_codec.encode(masks))  # deterministic
        decoded = (trained_codec.decode(codes) > 0).numpy()
    ious = [_iou(d, m) for d, m in zip(decoded, masks)]
    assert min(ious) > 0.8 and np.mean(ious) > 0.9, ious


def test_format_then_parse_round_trips_masks_in_image_pixels(trained_codec):
    width, height = 200, 120
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    ellipse = ((xx - 60) / 40) ** 2 + ((yy - 50) / 30) ** 2 <= 1  # fills its box [20, 20, 100, 80]
    upper = (yy < 100) & (xx >= 120) & (xx < 190) & (yy >= 60) & (yy - 60 < (xx - 120) * 40 / 70)
    objects = [("egg", [20, 20, 100, 80], ellipse), ("a wedge", [120, 60, 190, 100], upper)]
    answer = format_segmentations(objects, (width, height), trained_codec)
    assert answer.count("<seg") == 32 and " ; " in answer and answer.endswith("a wedge")
    result = parse_segmentations(answer, (width, height), trained_codec)
    assert result.errors == []
    assert [s.label for s in result.objects] == ["egg", "a wedge"]
    for segmentation, (_, box, mask) in zip(result.objects, objects):
        assert segmentation.mask.shape == (height, width) and segmentation.mask.dtype == bool
        assert segmentation.box == pytest.approx(box, abs=0.2)
        assert _iou(segmentation.mask, mask) > 0.8


def test_mask_to_64_crops_the_box_and_rounds_it():
    mask = np.zeros((100, 100), bool)
    mask[10:30, 40:80] = True
    crop = mask_to_64(mask, [40.2, 9.6, 79.8, 30.4])  # rounds to [40, 10, 80, 30]: the box exactly
    assert crop.shape == (64, 64) and crop.dtype == np.float32 and crop.min() == 1.0
    with pytest.raises(ValueError, match="covers no whole pixel"):
        mask_to_64(mask, [5.2, 5.0, 5.4, 9.0])


def test_format_rejects_bad_labels_and_mask_shapes(trained_codec):
    mask = np.ones((10, 20), bool)
    with pytest.raises(ValueError, match="would not parse back"):
        format_segmentations([("a ; b", [0, 0, 5, 5], mask)], (20, 10), trained_codec)
    with pytest.raises(ValueError, match="height, width"):
        format_segmentations([("a", [0, 0, 5, 5], mask.T)], (20, 10), trained_codec)
    assert format_segmentations([], (20, 10), trained_codec) == ""


# ---------------------------------------------------------------------- parsing answers

@pytest.fixture(scope="module")
def small_codec():
    torch.manual_seed(1)
    return MaskCodec(SMALL).eval()


def test_parse_objects_boxes_and_masks(small_codec):
    codes_a, codes_b = list(range(16)), [127 - i for i in range(16)]
    answer = f"{_loc(102, 51, 818, 409)}{_seg(*codes_a)} red cat ; {_loc(0, 512, 1023, 1023)}{_seg(*codes_b)}"
    result = parse_segmentations(answer, (640, 480), small_codec)
    assert result.errors == []
    a, b = result.objects
    assert isinstance(a, Segmentation) and a.label == "red cat" and b.label == ""
    assert a.box == pytest.approx([51 / 1023 * 640, 102 / 1023 * 480, 409 / 1023 * 640, 818 / 1023 * 480])
    assert a.codes == codes_a and b.codes == codes_b
    with torch.no_grad():
        decoded = small_codec.decode([codes_a, codes_b]).numpy()
    for obj, m64 in zip((a, b), decoded):
        assert obj.mask.shape == (480, 640) and obj.mask.dtype == bool
        np.testing.assert_array_equal(obj.mask, mask_in_box(m64, obj.box, (640, 480)))
        x0, y0, x1, y1 = (int(v) for v in obj.box)
        outside = obj.mask.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any()


@pytest.mark.parametrize("answer", ["", "  ", "\n"])
def test_blank_answer_has_no_objects_and_no_errors(answer, small_codec):
    result = parse_segmentations(answer, (10, 10), small_codec)
    assert result.objects == [] and result.errors == []


SIXTEEN = _seg(*range(16))


@pytest.mark.parametrize("segment, reason", [
    (f"{_loc(1, 2, 3)}{SIXTEEN} cat", "expected 4 location tokens, found 3"),
    (f"{_loc(1, 2, 3, 4, 5)}{SIXTEEN} cat", "expected 4 location tokens, found 5"),
    (f"{_loc(1, 2, 3, 4)}{_seg(*range(15))} cat", "expected 16 segmentation tokens, found 15"),
    (f"{_loc(1, 2, 3, 4)}{_seg(*range(17))} cat", "expected 16 segmentation tokens, found 17"),
    (f"{_loc(1, 2, 3, 4)} cat", "expected 16 segmentation tokens, found 0"),  # a detect answer
    (f"{_loc(1, 2, 3, 4)}{_seg(*range(15), 128)} cat", "segmentation values must be 0..127"),
    (f"<loc0001><loc0002><loc0003><loc1024>{SIXTEEN} cat", "0..1023"),
    (f"{_loc(500, 2, 400, 4)}{SIXTEEN} cat", "min > max"),
    (f"{_loc(5, 2, 5, 40)}{SIXTEEN} cat", "zero width or height"),
    (f"{_loc(1, 7, 30, 7)}{SIXTEEN} cat", "zero width or height"),
    (f"{SIXTEEN}{_loc(1, 2, 3, 4)} cat", "location tokens after segmentation tokens"),
    (f"{_loc(1, 2)}{SIXTEEN}{_loc(3, 4)} cat", "location tokens after segmentation tokens"),
    (f"cat {_loc(1, 2, 3, 4)}{SIXTEEN}", "text before the location tokens"),
    (f"{_loc(1, 2, 3, 4)}{SIXTEEN} cat <seg001>", "tokens inside the label"),
    ("a cat on a mat", "text without location or segmentation tokens"),
])
def test_malformed_objects_are_reported_and_the_rest_kept(segment, reason, small_codec):
    good = f"{_loc(10, 20, 30, 40)}{SIXTEEN} dog"
    result = parse_segmentations(f"{good} ; {segment} ; {good}", (100, 100), small_codec)
    assert [s.label for s in result.objects] == ["dog", "dog"]
    assert len(result.errors) == 1 and reason in result.errors[0] and repr(segment) in result.errors[0]


def test_stray_separator_is_an_error(small_codec):
    result = parse_segmentations(f"{_loc(10, 20, 30, 40)}{SIXTEEN} dog ;", (100, 100), small_codec)
    assert len(result.objects) == 1 and result.errors == ["empty object (stray ';'): ''"]


def test_codes_past_a_smaller_codebook_are_errors():
    codec = MaskCodec(MaskCodecConfig(num_codes=32, embed_dim=8, hidden=16, encoder_channels=(4, 4, 8, 8)))
    result = parse_segmentations(f"{_loc(1, 2, 3, 4)}{_seg(*range(15), 40)} x", (10, 10), codec)
    assert result.objects == [] and "0..31" in result.errors[0]


def test_bad_image_size_raises(small_codec):
    with pytest.raises(ValueError, match="width, height"):
        parse_segmentations("", (0, 10), small_codec)


# ---------------------------------------------------------------------- mask placement

def test_mask_in_box_resizes_into_the_truncated_pixel_box():
    m64 = np.full((64, 64), -1.0, np.float32)
    m64[:, :32] = 1.0  # left half inside
    full = mask_in_box(m64, [10.7, 5.2, 50.9, 25.99], (60, 30))  # whole pixels: x 10..50, y 5..25
    assert full.shape == (30, 60) and full.dtype == bool
    assert full[5:25, 10:30].all() and not full[5:25, 30:50].any()
    assert full.sum() == 20 * 20
    assert not mask_in_box(np.ones((64, 64)), [3.1, 3.2, 3.9, 8.0], (10, 10)).any()  # under one pixel wide


def test_mask_in_box_matches_pil_bilinear_then_threshold():
    m64 = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    full = mask_in_box(m64, [3.0, 4.0, 103.0, 54.0], (120, 60))
    expected = np.asarray(Image.fromarray(m64).resize((100, 50), Image.Resampling.BILINEAR)) > 0
    np.testing.assert_array_equal(full[4:54, 3:103], expected)


# ---------------------------------------------------------------------- drawing

def test_draw_masks_tints_masks_and_saves(tmp_path):
    image = Image.new("RGB", (80, 40), "white")
    mask = np.zeros((40, 80), bool)
    mask[10:30, 10:40] = True
    segmentation = Segmentation("cat", [10.0, 10.0, 40.0, 30.0], mask, list(range(16)))
    drawn = draw_masks(image, [segmentation], tmp_path / "out.png")
    assert (tmp_path / "out.png").exists() and drawn.size == image.size
    assert drawn.getpixel((25, 20)) != (255, 255, 255)  # tinted inside
    assert drawn.getpixel((70, 35)) == (255, 255, 255)  # untouched outside
    assert image.getpixel((25, 20)) == (255, 255, 255)  # the input is not modified
    with pytest.raises(ValueError, match="mask is"):
        draw_masks(image, [Segmentation("x", [0, 0, 1, 1], mask.T, [])])


def test_mask_rle_round_trip():
    from paligemma.segmentation import mask_to_rle, rle_to_mask

    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        rle = mask_to_rle(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        assert np.array_equal(rle_to_mask(rle), mask)
    assert mask_to_rle(np.array([[True, True, False]]))["counts"] == [0, 2, 1]


# ---------------------------------------------------------------------- the demo's codec and segmentation score

def test_segmentation_as_json_is_the_documented_record():
    from paligemma.segmentation import rle_to_mask

    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    record = Segmentation("cat", [1.0, 1.0, 3.0, 2.0], mask, list(range(16))).as_json()
    assert record == {"label": "cat", "box": [1.0, 1.0, 3.0, 2.0], "mask_rle": {"size": [3, 4], "counts": [5, 2, 5]}}
    assert np.array_equal(rle_to_mask(record["mask_rle"]), mask)


def _rect(x0, y0, x1, y1, size=(10, 10)):
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_match_masks_greedy_one_to_one():
    from paligemma.demo.evaluate import match_masks

    a, b = _rect(0, 0, 4, 4), _rect(6, 6, 10, 10)
    assert match_masks([], []) == [] and match_masks([], [a]) == []
    assert match_masks([a, b], []) == [0.0, 0.0]  # nothing predicted: both objects count 0
    assert match_masks([a, b], [b, a]) == [1.0, 1.0]  # order of the predictions does not matter
    assert match_masks([a, b], [a]) == [1.0, 0.0]  # a missing object counts 0
    assert match_masks([a], [_rect(0, 0, 4, 2), a, b]) == [1.0]  # extra predictions lower nothing
    assert match_masks([a], [_rect(5, 5, 6, 6)]) == [0.0]  # no overlap, no match
    # One prediction overlapping two objects goes to the one it overlaps most; the other gets its own.
    left, right = _rect(0, 0, 5, 4), _rect(5, 0, 10, 4)
    wide = _rect(1, 0, 10, 4)  # IoU 16/40 with left, 20/36 with right
    assert match_masks([left, right], [wide]) == [0.0, pytest.approx(20 / 36)]
    assert match_masks([left, right], [wide, _rect(0, 0, 4, 4)]) == [pytest.approx(16 / 20), pytest.approx(20 / 36)]
    # Ties go to the earlier true mask.
    same = _rect(0, 0, 4, 4)
    assert match_masks([same, same.copy()], [same]) == [1.0, 0.0]


def test_greedy_match_of_boxes_takes_pairs_at_the_threshold_or_above():
    from paligemma.demo.evaluate import IOU_THRESHOLD, greedy_match
    from paligemma.demo.scenes import iou

    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    half, less = (0, 0, 10, 5), (20, 0, 30, 4.9)  # IoU 0.5 with the first box, 0.49 with the second
    assert greedy_match(truth, [half, less], iou, IOU_THRESHOLD) == [0.5, 0.0]
    assert greedy_match(truth, [less, half], iou, 0.4) == [0.5, pytest.approx(0.49)]
    assert greedy_match(truth, [(0, 0, 30, 10)], iou) == [pytest.approx(1 / 3), 0.0]  # one box, the earlier object


def test_demo_eval_scores_segment_answers(monkeypatch):
    """evaluate_demo end to end with answers written from the scenes themselves (a perfect model):
    the segmentation score is then the codec's ceiling through the answer text, the rest 100%."""
    from paligemma.demo import evaluate, scenes
    from paligemma.demo.recipe import EVAL_SEED0
    from paligemma.vqvae import load_mask_codec

    codec = load_mask_codec(SHIPPED_CODEC)
    seed0, n = EVAL_SEED0 + 40_000, 6
    by_image = {scenes.generate_scene(seed0 + i).image.tobytes(): scenes.generate_scene(seed0 + i) for i in range(n)}
    prompts_seen = []

    def perfect(model, processor, images, prompts, max_new_tokens):
        prompts_seen.extend(prompts)
        answers = []
        for image, prompt in zip(images, prompts):
            answers.append(dict(scenes.scene_examples(by_image[image.tobytes()], codec))[prompt])
        return answers

    monkeypatch.setattr(evaluate, "generate_detailed", written_answers(perfect))
    without = evaluate.evaluate_demo(None, None, num_scenes=n, seed0=seed0)
    assert not any(p.startswith("segment") for p in prompts_seen)
    assert without.segmentation_miou is None and "segmentation_miou" not in without.as_dict()
    assert "segment" not in without.table()

    prompts_seen.clear()
    scores = evaluate.evaluate_demo(None, None, num_scenes=n, seed0=seed0, codec=codec)
    present = sum(len({o.shape for o in by_image[k].objects}) for k in by_image)
    assert sum(p.startswith("segment ") for p in prompts_seen) == present  # present shapes only
    assert (scores.detection_recall, scores.counting_accuracy, scores.caption_exact_match) == (1.0, 1.0, 1.0)
    assert scores.malformed_segment_answers == 0
    assert scores.segment_predictions == sum(len(s.objects) for s in by_image.values())
    assert 0.9 < scores.segmentation_miou < 1.0
    assert scores.as_dict()["segmentation_miou"] == scores.segmentation_miou
    assert "| segmentation mean mask IoU |" in scores.table()

    # An empty answer for every segment prompt: every object scores 0.
    monkeypatch.setattr(evaluate, "generate_detailed", written_answers(lambda m, p, images, prompts, max_new_tokens: [
        "" if q.startswith("segment") else a for q, a in zip(prompts, perfect(m, p, images, prompts, 0))]))
    assert evaluate.evaluate_demo(None, None, num_scenes=n, seed0=seed0, codec=codec).segmentation_miou == 0.0


def test_shipped_demo_codec_and_its_training_script(tmp_path, capsys):
    import json

    from paligemma.demo.train_mask_codec import CODEC_CONFIG, main, reconstruction_iou

    assert SHIPPED_CODEC.stat().st_size < 2 * 1024 * 1024
    codec = load_mask_codec(SHIPPED_CODEC)
    assert codec.config == CODEC_CONFIG
    scores = reconstruction_iou(codec, num_scenes=10)
    assert min(scores["box"].values()) > 0.98 and scores["answer"]["all"] > 0.9, scores

    # The script end to end, a few steps: seeded, so two runs write the same weights. (Not always the
    # same bytes: safetensors writes the header's metadata entries in no fixed order.)
    from safetensors.torch import load_file

    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        assert main(["--out", str(out), "--steps", "12", "--train-scenes", "8", "--eval-scenes", "2"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["bytes"] == out.stat().st_size and set(report["reconstruction_iou"]["box"]) >= {"all"}
        outputs.append(load_file(out))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    assert load_mask_codec(tmp_path / "a.safetensors").config == CODEC_CONFIG
