"""Image loading and preprocessing, matching transformers' SigLIP image processor for PaliGemma.

Reference: transformers 5.23 `SiglipImageProcessorPil` (what `AutoImageProcessor` and
`PaliGemmaProcessor` pick when torchvision is not installed) configured by the hub's
`preprocessor_config.json`: convert to RGB, resize to image_size x image_size with PIL bicubic,
no crop, x 1/255, (x - 0.5) / 0.5, channels first. The same PIL and NumPy operations are run in the
same order, so the output is bit-identical to transformers for uint8 inputs.

How transformers turns each input into RGB, reproduced here:
- file paths and encoded bytes (transformers' `load_image`): EXIF orientation applied, then
  `convert("RGB")`, which drops alpha rather than compositing it (transparent pixels keep whatever
  colour they store); a palette image's transparent colour survives as `info["transparency"]`
  and is then composited like below.
- PIL images: no EXIF rotation (the caller already has the pixels). Images with an alpha band
  (RGBA, LA, PA) or a `transparency` entry (P, L or RGB with tRNS) are composited onto white;
  everything else goes through `convert("RGB")`: L and 1 replicated, P looked up, CMYK with
  PIL's naive formula (no ICC profile), and 16/32-bit I;16 / I / F *clipped* to 0..255 (not scaled: a
  16-bit photo comes out nearly white, exactly as in transformers).
- NumPy arrays: (H, W, C) or (C, H, W) with C in 1, 3, 4 (channels first wins when both ends fit,
  as in transformers); C=1 replicated, C=4 composited onto white in float64 and rounded.
  Extensions transformers does not have: (H, W) arrays are grayscale; float arrays must lie in
  [0, 1] and are rounded to uint8 (transformers quietly rescales them twice, giving near -1).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PaliGemmaError

DEFAULT_MAX_PIXELS = 64_000_000
# Pillow format names opened from files and bytes; PIL images and arrays are taken as they are.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, GIF, WebP, BMP, TIFF"
_BAND_ROWS = 256

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, io.IOBase]


class ImageError(PaliGemmaError, ValueError):
    """An image could not be read or is unusable; the message says what was wrong and what to do."""


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `source` and convert it to RGB exactly as transformers does (see module docstring).

    Returns an (H, W, 3) uint8 array of the upright image; its size is the `original_size` that
    detection boxes map back to. Raises `ImageError` for unreadable, empty or oversized images, and
    for files in a format outside `ALLOWED_FORMATS`.
    """
    rgb = _load_rgb(source, max_pixels)
    return np.asarray(rgb) if isinstance(rgb, Image.Image) else rgb


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header without decoding the pixels.

    Raises `ImageError` as `load_image` would for a format outside `ALLOWED_FORMATS`, an unreadable
    header or more than `max_pixels` pixels, so a caller can refuse a request before decoding anything.
    """
    with _open(io.BytesIO(data), f"image bytes ({len(data)} bytes)", max_pixels) as image:
        return image.size  # before EXIF rotation, which does not change the pixel count


def _load_rgb(source: ImageInput, max_pixels: int) -> Image.Image | np.ndarray:
    """`source` as upright RGB: a PIL image in mode RGB for encoded and PIL input, else an array."""
    if isinstance(source, Image.Image):
        _check_size(source.size, "PIL image", max_pixels)
        return _pil_to_rgb(source, "PIL image")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), f"image bytes ({len(source)} bytes)", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.startswith(("http://", "https://", "data:")):
            raise ImageError(f"{text[:60]!r} is a URL; images are not downloaded: fetch it and pass the bytes "
                             "or a path")
        path = Path(text)
        if not path.is_file():
            raise ImageError(f"image file {str(path)!r} does not exist or is not a file")
        with open(path, "rb") as handle:
            return _decode(handle, f"image file {str(path)!r}", max_pixels)
    if hasattr(source, "read"):
        return _decode(source, "image stream", max_pixels)
    raise ImageError(f"unsupported image type {type(source).__name__}: pass a PIL image, a file path, the file's "
                     "bytes or an (H, W, 3) uint8 NumPy array")


class PreprocessedImages(NamedTuple):
    pixel_values: torch.Tensor  # (N, 3, H, W) float32
    original_sizes: list[tuple[int, int]]  # (width, height) of each image before resizing


@dataclass(frozen=True)
class ImageProcessor:
    """Resize, rescale and normalise images into the vision tower's `pixel_values`.

    Fields mirror `preprocessor_config.json`; the defaults are the released PaliGemma values at 224 px.
    """

    height: int = 224
    width: int = 224
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if int(self.resample) not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"resample {self.resample} is not a PIL resampling filter (0-5; PaliGemma uses 3, "
                             "bicubic)")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 values (one per RGB channel), got {getattr(self, name)}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    @classmethod
    def from_preprocessor_config(cls, raw: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> "ImageProcessor":
        """Build from the dict of an HF `preprocessor_config.json` (SiglipImageProcessor fields).

        Settings this processor cannot honour (centre crop, padding, no RGB conversion, aspect-ratio
        sizes) raise instead of being ignored.
        """
        size = raw.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"preprocessor_config.json size {size!r} is not supported: PaliGemma resizes to a fixed "
                             "{'height': S, 'width': S}")
        for key, unsupported in (("do_center_crop", True), ("do_pad", True), ("do_convert_rgb", False)):
            if raw.get(key) is unsupported:
                raise ValueError(f"preprocessor_config.json sets {key}={unsupported}, which PaliGemma's processor "
                                 "does not do; remove it")
        mean, std = raw.get("image_mean", 0.5), raw.get("image_std", 0.5)
        return cls(
            height=int(size["height"]), width=int(size["width"]),
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            do_resize=bool(raw.get("do_resize", True)),
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=tuple(float(m) for m in (mean if isinstance(mean, list) else [mean] * 3)),
            image_std=tuple(float(s) for s in (std if isinstance(std, list) else [std] * 3)),
            max_pixels=max_pixels,
        )

    def resize(self, rgb: np.ndarray | Image.Image) -> np.ndarray:
        """Upright RGB (an (H, W, 3) uint8 array or a mode-RGB PIL image) -> the (height, width, 3)
        uint8 pixels that `preprocess` rescales. An image already at the model's size is returned
        as it is (PIL's resize to the same size is a copy), so resizing twice changes nothing."""
        if self.do_resize:
            image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
            return np.asarray(image.resize((self.width, self.height), resample=Image.Resampling(self.resample)))
        rgb = np.asarray(rgb)
        if rgb.shape[:2] != (self.height, self.width):
            raise ImageError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but the model needs {self.width}x{self.height} "
                             "and preprocessor_config.json has do_resize false: resize it first")
        return rgb

    def load_resized(self, source: ImageInput) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode `source` and resize it at once: (the `resize` pixels, the original (width, height)).

        For callers that keep images around (the server's queue): only model-size pixels are held,
        never the full-size ones, and `preprocess` of the result equals `preprocess` of `source`.
        """
        rgb = _load_rgb(source, self.max_pixels)
        size = rgb.size if isinstance(rgb, Image.Image) else (rgb.shape[1], rgb.shape[0])
        return self.resize(rgb), size

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, height, width) float32, in transformers' order of operations."""
        rgb = self.resize(rgb)
        x = rgb
        if self.do_rescale:
            # transformers multiplies in float64 and rounds to float32 once.
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32, copy=False)
        if self.do_normalize:
            x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images: Sequence[ImageInput]) -> PreprocessedImages:
        """Load and preprocess a list of images into one (N, 3, H, W) float32 batch."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ImageError("no images given")
        arrays, sizes = [], []
        for index, image in enumerate(images):
            try:
                rgb = load_image(image, self.max_pixels)
            except ImageError as err:
                if len(images) == 1:
                    raise
                raise ImageError(f"image {index}: {err}") from err
            sizes.append((rgb.shape[1], rgb.shape[0]))
            arrays.append(self.preprocess(rgb))
        return PreprocessedImages(torch.from_numpy(np.stack(arrays)), sizes)


# ---------------------------------------------------------------------- decoding and RGB conversion

def _open(stream: Any, what: str, max_pixels: int) -> Image.Image:
    """Parse the header only (format and size); refuse other formats and oversized images."""
    try:
        # Only the formats photos come in: other Pillow plugins (EPS runs Ghostscript, ...) are
        # attack surface that no PaliGemma user needs.
        image = Image.open(stream, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what} is too large for PIL's decompression-bomb guard ({err}); downscale it first") from err
    except UnidentifiedImageError:
        # PIL's message names the stream object (a heap address); say what is accepted instead.
        raise ImageError(f"{what} is not a readable image: empty, corrupt, or not in an accepted format "
                         f"({_FORMAT_NAMES}); convert it to PNG or JPEG") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"{what} is not a readable image (empty or corrupt): {err}") from err
    _check_size(image.size, what, max_pixels)
    return image


def _decode(stream: Any, what: str, max_pixels: int) -> Image.Image:
    """Decode to an upright mode-RGB PIL image, making no full-size copy that is not needed."""
    image = _open(stream, what, max_pixels)
    try:
        image.load()
        # transformers' load_image: rotate per EXIF, then a plain RGB conversion (of an RGB image, a copy).
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode != "RGB":
            image = image.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ImageError(f"{what} could not be decoded (truncated or corrupt file?): {err}") from err
    return _pil_to_rgb(image, what)


def _pil_to_rgb(image: Image.Image, what: str) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images: alpha is composited onto white."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            return _composite_on_white(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:
        raise ImageError(f"{what} (mode {image.mode}) could not be converted to RGB: {err}") from err


def _composite_on_white(image: Image.Image) -> Image.Image:
    """`alpha_composite(white, image.convert("RGBA")).convert("RGB")`, a band of rows at a time.

    Every step works pixel by pixel, so the bands give the same bytes as the whole image, while the
    three full-size RGBA intermediates (12 bytes a pixel: 300 MB at 25 MP) are never held at once.
    """
    out = Image.new("RGB", image.size)
    for top in range(0, image.height, _BAND_ROWS):
        band = image.crop((0, top, image.width, min(top + _BAND_ROWS, image.height))).convert("RGBA")
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert("RGB"), (0, top))
    return out


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first, by transformers' rule
    elif array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(f"array of shape {array.shape} is not an image: expected (H, W), (H, W, C) or (C, H, W) "
                         "with C = 1, 3 or 4")
    _check_size((array.shape[1], array.shape[0]), f"array of shape {array.shape}", max_pixels)
    array = _array_to_uint8(array)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4] / 255  # float64, as transformers
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ImageError(f"float image array has values in [{array.min()}, {array.max()}]; float images must lie "
                             "in [0, 1] (pass 0..255 data as uint8)")
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ImageError(f"{array.dtype} image array has values in [{array.min()}, {array.max()}]; scale it to "
                             "0..255 uint8 first (e.g. 16-bit data: (a >> 8).astype(np.uint8))")
        return array.astype(np.uint8)
    raise ImageError(f"image arrays must be uint8 (or float in [0, 1]), got dtype {array.dtype}")


def _check_size(size: tuple[int, int], what: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                         "(a guard against decompression bombs): downscale it, or raise max_pixels if you trust it")
