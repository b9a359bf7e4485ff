"""Turn images and prompts (and training suffixes) into model inputs, as transformers' PaliGemmaProcessor.

Each sample is laid out as

    <image> x (num_image_tokens * images) <bos> prompt "\\n" | suffix <eos>
    token_type_ids:   0 ...                                0  | 1 ...      1
    labels:        -100 ...                             -100  | suffix ids, eos

exactly as transformers 5.23 builds it. transformers tokenizes `"<bos>" + prompt + "\\n"` as one
string; here the prompt and its "\\n" are encoded together too, so the pieces agree even when the
prompt ends in whitespace. The ids are identical to transformers' for the same tokenizer files;
only the padding side is chosen here rather than taken from the tokenizer:

- without suffixes (generation) batches are LEFT-padded, so every prompt ends at the last column
  and generated tokens line up. transformers pads on the tokenizer's `padding_side`, "left" for
  `GemmaTokenizer` (the hub checkpoints' tokenizer_config.json names it). Without that file,
  AutoTokenizer builds a generic tokenizer with padding_side "right" and no pad token at all.
- with suffixes (training) batches are RIGHT-padded: every sample starts at position 0 and the
  pads trail the last label, so positions need no offsets.

Pads are `pad_id` with attention_mask 0, token_type_ids 0 and labels -100.

Prompts written the transformers way, starting with one "<image>" per image ("<image>answer en
what is this?", as many tutorials do), are accepted with a warning: transformers' PaliGemmaProcessor
(`prepare_inputs_layout`) puts `<bos>` right after the last "<image>" and expands each "<image>" to
the image's tokens, which is this layout with the leading "<image>"s removed and the rest of the
prompt kept as typed (a space after "<image>" stays part of the prompt). An "<image>" anywhere else,
or a count that differs from the prompt's images, is refused. (transformers applies its rule to
every prompt of a batch once one has "<image>", mangling prompts without it; here each prompt is
read on its own.)
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, PaliGemmaConfig, read_json
from .errors import UsageError
from .hub import resolve_checkpoint
from .images import DEFAULT_MAX_PIXELS, ImageInput, ImageProcessor
from .model import IGNORE_INDEX
from .tokenizer import IMAGE_TOKEN, Tokenizer, TokenizerError


class ProcessorOutput(dict):
    """The model inputs (a dict of tensors) plus `original_sizes`: per prompt, each image's (width, height)."""

    def __init__(self, tensors: dict[str, torch.Tensor], original_sizes: list[list[tuple[int, int]]]):
        super().__init__(tensors)
        self.original_sizes = original_sizes

    def to(self, device: torch.device | str) -> "ProcessorOutput":
        """A copy with every tensor moved to `device`."""
        return ProcessorOutput({k: v.to(device) for k, v in self.items()}, self.original_sizes)


class Processor:
    """Prompts + images -> `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values` (+ `labels`)."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens

    def __call__(self, images, prompts: str | Sequence[str], suffixes: str | Sequence[str] | None = None,
                 padding_side: str | None = None, max_length: int | None = None,
                 with_pixels: bool = True) -> ProcessorOutput:
        """Build a batch.

        images: one image per prompt (a list, or a single image for a single prompt), or a list
            of lists for several images per prompt. An image is a PIL image, path, bytes or array.
        prompts: a str or list of str, e.g. "caption en", "detect cat". A leading "<image>" per image
            (transformers' style) is accepted with a warning and removed; no "<image>" elsewhere.
        suffixes: training targets, one per prompt; adds `labels`.
        padding_side: "left" or "right"; default left without suffixes, right with them.
        max_length: raise UsageError if a sample is longer (nothing is ever truncated).
        with_pixels: False skips loading and resizing the images (no `pixel_values`; original sizes
            are None): for callers that already hold the images' features. `images` then only
            says how many images each prompt has.
        """
        prompts = self._check_texts(prompts, "prompts", leading_image_tokens=True)
        image_lists = self._group_images(images, len(prompts))
        prompts = _strip_leading_image_tokens(prompts, [len(image_list) for image_list in image_lists])
        if suffixes is not None:
            suffixes = self._check_texts(suffixes, "suffixes")
            if len(suffixes) != len(prompts):
                raise UsageError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts: give one suffix per prompt")
        if padding_side is None:
            padding_side = "left" if suffixes is None else "right"
        if padding_side not in ("left", "right"):
            raise UsageError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

        sequences = []  # (ids, number of prefix ids) per sample
        for index, (prompt, image_list) in enumerate(zip(prompts, image_lists)):
            prefix = self.encode_prefix(prompt, num_images=len(image_list))
            suffix = [] if suffixes is None else self.encode_suffix(suffixes[index])
            if max_length is not None and len(prefix) + len(suffix) > max_length:
                image_tokens = self.num_image_tokens * len(image_list)
                raise UsageError(f"sample {index} is {len(prefix) + len(suffix)} tokens ({image_tokens} of them image "
                                 f"tokens) but max_length is {max_length}: shorten the text or raise max_length "
                                 "(nothing is truncated)")
            sequences.append((prefix + suffix, len(prefix)))

        tensors = self._pad(sequences, padding_side, with_labels=suffixes is not None)
        if not with_pixels:
            return ProcessorOutput(tensors, [[None] * len(image_list) for image_list in image_lists])
        flat_images = [image for image_list in image_lists for image in image_list]
        pixels = self.image_processor(flat_images)
        tensors["pixel_values"] = pixels.pixel_values
        sizes, start = [], 0
        for image_list in image_lists:
            sizes.append(pixels.original_sizes[start:start + len(image_list)])
            start += len(image_list)
        return ProcessorOutput(tensors, sizes)

    def encode_prefix(self, prompt: str, num_images: int = 1) -> list[int]:
        """Ids of `<image>` x (num_image_tokens * num_images), `<bos>`, prompt, "\\n"."""
        return ([self.tokenizer.image_id] * (self.num_image_tokens * num_images) + [self.tokenizer.bos_id]
                + self.tokenizer.encode(prompt + "\n"))

    def encode_suffix(self, suffix: str) -> list[int]:
        """Ids of the training target followed by `<eos>`."""
        return self.tokenizer.encode(suffix, add_eos=True)

    def decode(self, ids, skip_special_tokens: bool = True, keep_loc_seg: bool = True) -> str:
        """`Tokenizer.decode` of one sequence."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, keep_loc_seg=keep_loc_seg)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, keep_loc_seg: bool = True) -> list[str]:
        """`decode` of each row of a 2-D tensor or list of lists."""
        return [self.decode(row, skip_special_tokens, keep_loc_seg) for row in sequences]

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_texts(texts, name: str, leading_image_tokens: bool = False) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        elif texts is None or not isinstance(texts, (list, tuple)):
            raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")
        if not texts:
            raise UsageError(f"{name} is empty: give at least one")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{index}] must be a str, got {type(text).__name__}")
            if IMAGE_TOKEN in text and not (leading_image_tokens and text.startswith(IMAGE_TOKEN)):
                raise UsageError(f"{name}[{index}] contains {IMAGE_TOKEN!r}; pass images with `images=` and the "
                                 "processor inserts the image tokens itself")
        return list(texts)

    @staticmethod
    def _group_images(images, num_prompts: int) -> list[list[ImageInput]]:
        """Normalise `images` to one non-empty list of images per prompt."""
        if images is None:
            raise UsageError("images are required: PaliGemma needs at least one image per prompt")
        if _is_image(images):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise TypeError("images must be an image, a list of images or a list of lists, "
                            f"got {type(images).__name__}")
        nested = [isinstance(item, (list, tuple)) for item in images]
        if any(nested) and not all(nested):
            raise UsageError("images mixes single images and lists: give one image per prompt, or one list per prompt")
        grouped = [list(item) for item in images] if images and all(nested) else [[item] for item in images]
        if len(grouped) != num_prompts:
            raise UsageError(f"got {len(grouped)} image(s) or image lists for {num_prompts} prompt(s): give one "
                             "image per prompt, or a list of images per prompt for several images per prompt")
        for index, group in enumerate(grouped):
            if not group:
                raise UsageError(f"prompt {index} has no images: every prompt needs at least one")
        return grouped

    def _pad(self, sequences: list[tuple[list[int], int]], side: str, with_labels: bool) -> dict[str, torch.Tensor]:
        batch, length = len(sequences), max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((batch, length), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        token_type_ids = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, prefix_len) in enumerate(sequences):
            start = length - len(ids) if side == "left" else 0
            input_ids[row, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, start:start + len(ids)] = 1
            token_type_ids[row, start + prefix_len:start + len(ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if with_labels:
            out["labels"] = input_ids.masked_fill(token_type_ids == 0, IGNORE_INDEX)
        return out


def load_processor(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Processor:
    """The processor of a checkpoint directory or Hub repo id (resolved as `load_model` resolves it).

    Reads config.json (image size, image token id), tokenizer.model or tokenizer.json, and
    preprocessor_config.json when present (its size, resample, rescale and mean/std are used; the
    size must agree with config.json). `max_pixels` bounds the images it will decode.
    """
    path = resolve_checkpoint(path)
    config = PaliGemmaConfig.from_json_file(path / "config.json")
    tokenizer = Tokenizer.from_pretrained(path, image_token_index=config.image_token_index)
    for name, ours in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                       ("pad_token_id", tokenizer.pad_id)):
        if getattr(config, name) != ours:
            raise TokenizerError(f"config.json {name} is {getattr(config, name)} but the tokenizer's is {ours}")

    size = config.vision.image_size
    preprocessor_file = path / "preprocessor_config.json"
    if not preprocessor_file.is_file():
        return Processor(tokenizer, ImageProcessor(height=size, width=size, max_pixels=max_pixels),
                         config.num_image_tokens)
    raw = read_json(preprocessor_file)
    try:
        image_processor = ImageProcessor.from_preprocessor_config(raw, max_pixels=max_pixels)
    except (ValueError, TypeError) as err:  # a setting ImageProcessor cannot take, named in the message
        raise ConfigError(f"{err} (in {preprocessor_file})") from None
    if (image_processor.height, image_processor.width) != (size, size):
        raise ConfigError(f"{preprocessor_file} resizes to {image_processor.height}x{image_processor.width} but "
                          f"config.json's vision image_size is {size}")
    seq_length = raw.get("image_seq_length")
    if seq_length is not None and seq_length != config.num_image_tokens:
        raise ConfigError(f"{preprocessor_file} image_seq_length is {seq_length} but config.json implies "
                          f"{config.num_image_tokens} image tokens")
    return Processor(tokenizer, image_processor, config.num_image_tokens)


def _strip_leading_image_tokens(prompts: list[str], images_per_prompt: list[int]) -> list[str]:
    """Each prompt without its leading "<image>"s (one per image, as transformers reads them); warns once."""
    out = []
    for index, (prompt, count) in enumerate(zip(prompts, images_per_prompt)):
        rest = prompt
        while rest.startswith(IMAGE_TOKEN):
            rest = rest[len(IMAGE_TOKEN):]
        found = (len(prompt) - len(rest)) // len(IMAGE_TOKEN)
        if IMAGE_TOKEN in rest:
            raise UsageError(f"prompts[{index}] has {IMAGE_TOKEN!r} after its text; only leading {IMAGE_TOKEN!r} "
                             "tokens (one per image) are understood: pass the images with `images=`")
        if found and found != count:
            raise UsageError(f"prompts[{index}] starts with {found} {IMAGE_TOKEN!r} token(s) but has {count} "
                             "image(s): write one per image, or none (the processor inserts them)")
        out.append(rest)
    if out != prompts:
        warnings.warn(f"prompts starting with {IMAGE_TOKEN!r} (transformers' style): the processor inserts the image "
                      f"tokens itself, so the leading {IMAGE_TOKEN!r} are dropped and the rest kept as typed",
                      UserWarning, stacklevel=3)
    return out


def _is_image(value) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, str, bytes, bytearray, memoryview, os.PathLike, io.IOBase))
