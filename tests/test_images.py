"""Image loading and preprocessing: bit-exact parity with transformers' SigLIP image processor.

The reference is `SiglipImageProcessorPil` (the PIL backend), configured by the hub's
preprocessor_config.json. Tolerance: none; every case below is compared with torch.equal.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import hub_preprocessor_config

from paligemma.images import DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, load_image

transformers = pytest.importorskip("transformers")


def hf_processor(image_size: int):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(**hub_preprocessor_config(image_size, (image_size // 14) ** 2))


def ours(image_size: int) -> ImageProcessor:
    return ImageProcessor.from_preprocessor_config(hub_preprocessor_config(image_size, (image_size // 14) ** 2))


def hf_pixels(image, image_size: int = 28) -> torch.Tensor:
    return hf_processor(image_size)(image, return_tensors="pt")["pixel_values"]


def assert_same_as_hf(image, image_size: int = 28, hf_input=None):
    got = ours(image_size)([image]).pixel_values
    want = hf_pixels(image if hf_input is None else hf_input, image_size)
    assert got.dtype == torch.float32 and got.shape == (1, 3, image_size, image_size)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def with_alpha(image: Image.Image) -> Image.Image:
    """RGBA copy with a diagonal alpha ramp: fully transparent in one corner, opaque in the other."""
    w, h = image.size
    ramp = (np.add.outer(np.arange(h) / h, np.arange(w) / w) * 127.5).astype(np.uint8)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(ramp))
    return rgba


# ---------------------------------------------------------------------- PIL images

def test_default_auto_image_processor_is_the_pil_backend(processor_checkpoint_factory):
    """What PaliGemmaProcessor picks in this environment (torchvision absent); the reference here."""
    pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision installed: transformers then defaults to its torchvision backend")
    image_processor = AutoImageProcessor.from_pretrained(str(processor_checkpoint_factory(28)))
    assert type(image_processor).__name__ == "SiglipImageProcessorPil"


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee", "chelsea"])
@pytest.mark.parametrize("image_size", [28, 224])
def test_photographs_match_hf(skimage_photos, name, image_size):
    assert_same_as_hf(skimage_photos[name], image_size)


def test_batch_keeps_order_and_original_sizes(skimage_photos):
    photos = [skimage_photos[n] for n in ("coffee", "camera", "chelsea")]
    out = ours(28)(photos)
    assert out.pixel_values.shape == (3, 3, 28, 28)
    assert out.original_sizes == [(600, 400), (512, 512), (451, 300)]
    assert torch.equal(out.pixel_values, hf_pixels(photos))
    assert out.pixel_values.min() >= -1 and out.pixel_values.max() <= 1


def _mode_variants(photo: Image.Image) -> dict[str, Image.Image]:
    small = photo.resize((60, 40))
    gray16 = np.asarray(small.convert("L"), dtype=np.uint16) * 200  # 0..51000: 16-bit range
    palette = small.quantize(16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    rgb_t = small.copy()
    rgb_t.info["transparency"] = tuple(np.asarray(small)[0, 0].tolist())
    return {
        "RGB": small, "L": small.convert("L"), "1": small.convert("1"), "RGBA": with_alpha(small),
        "LA": with_alpha(small).convert("LA"), "P": palette, "P+transparency": palette_t,
        "PA": with_alpha(small).convert("PA"), "RGB+transparency": rgb_t, "CMYK": small.convert("CMYK"),
        "I;16": Image.fromarray(gray16), "I": Image.fromarray(gray16).convert("I"),
        "F": Image.fromarray(gray16.astype(np.float32) / 100),
    }


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "RGBA", "LA", "P", "P+transparency", "PA", "RGB+transparency",
                                  "CMYK", "I;16", "I", "F"])
def test_pil_modes_match_hf(skimage_photos, mode):
    assert_same_as_hf(_mode_variants(skimage_photos["astronaut"])[mode])


def test_pil_alpha_is_composited_onto_white():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (load_image(transparent) == 255).all()


def test_pil_16_bit_is_clipped_like_hf():
    """PIL's I;16 -> RGB conversion clips to 255 instead of scaling; transformers inherits that."""
    image = Image.fromarray(np.array([[0, 100, 300, 60000]], dtype=np.uint16))
    assert load_image(image)[0, :, 0].tolist() == [0, 100, 255, 255]


def test_pil_image_is_not_exif_rotated(skimage_photos):
    """transformers rotates only what it opens itself (paths); a PIL image is taken as given."""
    rotated = Image.open(io.BytesIO(_exif_rotated_jpeg(skimage_photos["chelsea"])))
    assert load_image(rotated).shape[:2] == (rotated.height, rotated.width)
    assert_same_as_hf(rotated)


# ---------------------------------------------------------------------- files and bytes

def _exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image.resize((64, 32)), "JPEG", exif=exif, quality=90)


def _file_variants(photo: Image.Image) -> dict[str, bytes]:
    modes = _mode_variants(photo)
    return {
        "png-rgb": encode(modes["RGB"], "PNG"), "jpeg-rgb": encode(modes["RGB"], "JPEG"),
        "png-rgba": encode(modes["RGBA"], "PNG"), "png-la": encode(modes["LA"], "PNG"),
        "png-p-transparency": encode(modes["P"], "PNG", transparency=3),
        "gif": encode(modes["P"], "GIF"), "png-16bit": encode(modes["I;16"], "PNG"),
        "jpeg-cmyk": encode(modes["CMYK"], "JPEG"), "jpeg-gray": encode(modes["L"], "JPEG"),
        "jpeg-exif-rotated": _exif_rotated_jpeg(photo), "webp-rgba": encode(modes["RGBA"], "WEBP", lossless=True),
        "bmp": encode(modes["RGB"], "BMP"), "tiff-cmyk": encode(modes["CMYK"], "TIFF"),
    }


@pytest.mark.parametrize("kind", ["png-rgb", "jpeg-rgb", "png-rgba", "png-la", "png-p-transparency", "gif",
                                  "png-16bit", "jpeg-cmyk", "jpeg-gray", "jpeg-exif-rotated", "webp-rgba", "bmp",
                                  "tiff-cmyk"])
def test_files_match_hf(tmp_path, skimage_photos, kind):
    data = _file_variants(skimage_photos["astronaut"])[kind]
    path = tmp_path / f"image.{kind.split('-')[0]}"
    path.write_bytes(data)
    assert_same_as_hf(str(path), hf_input=str(path))  # str path
    assert_same_as_hf(path, hf_input=str(path))  # pathlib.Path
    assert_same_as_hf(data, hf_input=str(path))  # the file's bytes
    assert_same_as_hf(io.BytesIO(data), hf_input=str(path))  # a stream


def test_file_alpha_is_dropped_not_composited(tmp_path):
    """transformers' load_image converts files with convert("RGB"): the stored colour shows through."""
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(path)
    assert load_image(path)[0, 0].tolist() == [10, 20, 30]
    assert load_image(Image.open(path))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied_to_files_and_original_size(skimage_photos):
    data = _exif_rotated_jpeg(skimage_photos["chelsea"])  # stored 64x32, orientation 6 = rotate 90
    out = ours(28)([data])
    assert out.original_sizes == [(32, 64)]
    assert load_image(data).shape == (64, 32, 3)


# ---------------------------------------------------------------------- NumPy arrays

@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW1", "HWC-rgba", "CHW-rgba", "HWC-int64"])
def test_arrays_match_hf(skimage_photos, layout):
    rgb = np.asarray(skimage_photos["coffee"].resize((50, 30)))
    rgba = np.asarray(with_alpha(Image.fromarray(rgb)))
    array = {"HWC": rgb, "CHW": rgb.transpose(2, 0, 1), "HW1": rgb[..., :1], "HWC-rgba": rgba,
             "CHW-rgba": rgba.transpose(2, 0, 1), "HWC-int64": rgb.astype(np.int64)}[layout]
    assert_same_as_hf(array)


def test_grayscale_2d_array_is_gray(skimage_photos):
    """transformers rejects (H, W) arrays; here they are grayscale, same as (H, W, 1)."""
    gray = np.asarray(skimage_photos["camera"])
    assert torch.equal(ours(28)([gray]).pixel_values, hf_pixels(gray[..., None]))


def test_float_array_in_unit_range_is_rounded_to_uint8(skimage_photos):
    rgb = np.asarray(skimage_photos["chelsea"])
    as_float = rgb.astype(np.float32) / 255
    assert torch.equal(ours(28)([as_float]).pixel_values, ours(28)([rgb]).pixel_values)


# ---------------------------------------------------------------------- other settings

def test_other_preprocessor_settings_match_hf(skimage_photos):
    config = hub_preprocessor_config(32, 4)
    config.update(resample=2, rescale_factor=1 / 256, image_mean=[0.48145466, 0.4578275, 0.40821073],
                  image_std=[0.26862954, 0.26130258, 0.27577711])
    from transformers import SiglipImageProcessorPil

    photo = skimage_photos["coffee"]
    want = SiglipImageProcessorPil(**config)(photo, return_tensors="pt")["pixel_values"]
    assert torch.equal(ImageProcessor.from_preprocessor_config(config)([photo]).pixel_values, want)


@pytest.mark.parametrize("key,value", [("do_center_crop", True), ("do_pad", True), ("do_convert_rgb", False),
                                       ("size", {"shortest_edge": 224})])
def test_unsupported_preprocessor_settings_raise(key, value):
    config = hub_preprocessor_config(224, 256)
    config[key] = value
    with pytest.raises(ValueError, match=key if key != "size" else "shortest_edge"):
        ImageProcessor.from_preprocessor_config(config)


def test_no_resize_requires_the_model_size():
    processor = ImageProcessor(height=8, width=8, do_resize=False)
    assert processor([np.zeros((8, 8, 3), np.uint8)]).pixel_values.shape == (1, 3, 8, 8)
    with pytest.raises(ImageError, match="do_resize false"):
        processor([np.zeros((9, 8, 3), np.uint8)])


# ---------------------------------------------------------------------- bad inputs

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,message", [
    (b"", "not a readable image"),
    (b"this is not an image at all", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
])
def test_corrupt_bytes_raise(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise(tmp_path, skimage_photos, fmt):
    data = encode(skimage_photos["astronaut"], fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_decompression_bombs_raise_before_decoding():
    with pytest.raises(ImageError, match="over the limit of 64,000,000"):
        load_image(_png_header_only(9000, 9000))  # 81 MP: under PIL's own guard, over ours
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(_png_header_only(30000, 30000))  # 900 MP: PIL refuses to open it
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_pixel_limit_is_configurable(skimage_photos):
    photo = skimage_photos["chelsea"]  # 451 x 300
    with pytest.raises(ImageError, match="451x300"):
        ImageProcessor(max_pixels=100_000)([photo])
    with pytest.raises(ImageError, match="pixels, over the limit"):
        load_image(np.zeros((400, 400, 3), np.uint8), max_pixels=100_000)
    assert ImageProcessor(max_pixels=200_000)([photo]).pixel_values.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("source,message", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((5, 0), np.uint8), "empty"),
    (np.zeros((5, 5, 2), np.uint8), "not an image"),
    (np.zeros((2, 5, 5, 3), np.uint8), "not an image"),
    (np.full((5, 5, 3), 1.5, np.float32), r"must lie\s+in \[0, 1\]"),
    (np.full((5, 5, 3), np.nan, np.float32), r"must lie\s+in \[0, 1\]"),
    (np.full((5, 5, 3), 4000, np.uint16), "scale it to 0..255"),
    (np.zeros((5, 5, 3), bool), "must be uint8"),
    (Image.new("RGB", (0, 0)), "empty"),
    (12, "unsupported image type int"),
    (torch.zeros(3, 5, 5), "unsupported image type Tensor"),
    ("https://example.com/cat.jpg", "is a URL"),
    ("/no/such/image.png", "does not exist"),
])
def test_bad_inputs_raise(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_image_error_is_a_value_error_and_names_the_index(skimage_photos):
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ImageError, match="image 1: image bytes"):
        ours(28)([skimage_photos["coffee"], b"junk"])
    with pytest.raises(ImageError, match="no images"):
        ours(28)([])
