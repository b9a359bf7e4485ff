"""What the decoding tests (beam search, log-probs, scoring, constraints) share: a tiny random model
loaded in ours and in transformers, and three photographs of different sizes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import write_complete_checkpoint

import paligemma

PHOTOS = ("astronaut", "coffee", "chelsea")


def tiny_pair(directory, family: str, spm_model_path, spm_layout, eos_scale: float | None = None):
    """(our model, processor, transformers' model) on the same random lively weights. `eos_scale`
    enlarges the <eos> row of the tied embedding, so that answers end at different lengths."""
    reference = write_complete_checkpoint(directory, family, spm_model_path, spm_layout, kv_heads=2, window=12)
    if eos_scale is not None:
        with torch.no_grad():
            reference.get_input_embeddings().weight[spm_layout.eos_id] *= eos_scale  # tied: the LM head's row too
        reference.save_pretrained(directory)
    return paligemma.load_model(directory), paligemma.load_processor(directory), reference


def photos(skimage_photos, count: int = 3) -> list:
    return [skimage_photos[PHOTOS[i % len(PHOTOS)]] for i in range(count)]


def tiny_pair_fixture(tag: str, eos_scale: float | None = None):
    """A module-scoped fixture giving `tiny_pair` for Gemma 1 and for Gemma 2: `loaded = tiny_pair_fixture("x")`."""
    @pytest.fixture(scope="module", params=["gemma", "gemma2"])
    def loaded(request, tmp_path_factory, spm_model_path, spm_layout):
        return tiny_pair(tmp_path_factory.mktemp(f"{tag}-{request.param}"), request.param, spm_model_path, spm_layout,
                         eos_scale)
    return loaded


def photos_fixture():
    """A fixture giving `photos(skimage_photos)`: `images = photos_fixture()`."""
    @pytest.fixture
    def images(skimage_photos):
        return photos(skimage_photos)
    return images


def written_answers(answer):
    """A stand-in for `generate_detailed` from a function `answer(model, processor, images, prompts,
    max_new_tokens)` that writes the answers' text: results without log-probs (a box then scores 1)."""
    def generate_detailed(model, processor, images, prompts, max_new_tokens):
        texts = answer(model, processor, images, prompts, max_new_tokens)
        return [paligemma.GenerationResult(text, [], "eos", 0) for text in texts]

    return generate_detailed
