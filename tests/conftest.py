"""Shared pytest fixtures. Keep each fixture's name specific to what it provides; plain helpers
shared by several test files live in `tiny_models.py`, which tests import like any module."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from tiny_models import hub_preprocessor_config, tiny_paligemma_config, write_complete_checkpoint


def pytest_addoption(parser):
    parser.addoption("--update-doc-outputs", action="store_true",
                     help="tests/test_tour.py: rewrite each ```text block of docs/*.md that no longer matches what its "
                          "block prints, instead of failing (after replacing the demo model; review the diff)")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread runs them fastest, and on a shared 2-core machine several
    busy multi-threaded processes are 10-40x slower than single-threaded ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ---------------------------------------------------------------------- tokenizer and processor fixtures

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_SHAPES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="session")
def spm_corpus_lines() -> list[str]:
    """A tiny world of captions, task prompts and answers to train test tokenizers on."""
    lines = [f"a {c1} {s1} and a {c2} {s2}"
             for c1, s1, c2, s2 in itertools.product(_COLORS[:4], _SHAPES, _COLORS[4:], _SHAPES)]
    for shape in _SHAPES:
        lines += [f"detect {shape}", f"segment {shape}", f"answer en how many {shape}s are there?",
                  f"What color is the {shape}?", f"There are 3 {shape}s."]
    lines += ["caption en", "describe en", "ocr", "yes", "no"] + [str(i) for i in range(100)]
    return lines


@pytest.fixture(scope="session")
def spm_model_dir(tmp_path_factory, spm_corpus_lines):
    """(directory, SpmLayout) of a SentencePiece model built by `build_paligemma_spm`."""
    from paligemma.spm_builder import build_paligemma_spm

    directory = tmp_path_factory.mktemp("spm")
    layout = build_paligemma_spm(spm_corpus_lines, directory / "tokenizer.model", vocab_size=512)
    return directory, layout


@pytest.fixture(scope="session")
def spm_model_path(spm_model_dir) -> Path:
    return spm_model_dir[0] / "tokenizer.model"


@pytest.fixture(scope="session")
def spm_layout(spm_model_dir):
    return spm_model_dir[1]


@pytest.fixture(scope="session")
def processor_checkpoint_factory(tmp_path_factory, spm_model_path, spm_layout):
    """make(image_size=28, patch_size=14, preprocessor=True, tokenizer_file="tokenizer.model") -> checkpoint dir.

    The directory holds config.json (from `PaliGemmaConfig.to_hf_dict`), the test tokenizer and,
    unless preprocessor=False, a preprocessor_config.json shaped like the hub's.
    """
    cache: dict = {}

    def make(image_size: int = 28, patch_size: int = 14, preprocessor: bool = True,
             tokenizer_file: str = "tokenizer.model") -> Path:
        key = (image_size, patch_size, preprocessor, tokenizer_file)
        if key in cache:
            return cache[key]
        directory = tmp_path_factory.mktemp(f"ckpt{image_size}")
        vocab = ((spm_layout.vocab_size + 63) // 64) * 64  # padded to a multiple of 64, as the released models
        config = tiny_paligemma_config(vocab, spm_layout.image_id, image_size, patch_size)
        (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=1))
        if tokenizer_file == "tokenizer.model":
            (directory / "tokenizer.model").write_bytes(spm_model_path.read_bytes())
        else:
            from transformers import GemmaTokenizer

            GemmaTokenizer.from_pretrained(str(spm_model_path.parent)).backend_tokenizer.save(
                str(directory / "tokenizer.json"))
        if preprocessor:
            (directory / "preprocessor_config.json").write_text(json.dumps(hub_preprocessor_config(
                image_size, config.num_image_tokens)))
        cache[key] = directory
        return directory

    return make


# ---------------------------------------------------------------------- images

@pytest.fixture(scope="session")
def skimage_photos() -> dict:
    """Real photographs from scikit-image as PIL images: astronaut, camera (grayscale), coffee, chelsea."""
    import skimage.data
    from PIL import Image

    names = ("astronaut", "camera", "coffee", "chelsea")
    return {name: Image.fromarray(getattr(skimage.data, name)()) for name in names}


# ---------------------------------------------------------------------- complete checkpoints

@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory, spm_model_path, spm_layout) -> Path:
    """A complete tiny checkpoint directory: random Gemma weights (transformers-written), the test
    tokenizer and a hub-style preprocessor_config.json (28 px images, 4 image tokens)."""
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    write_complete_checkpoint(directory, "gemma", spm_model_path, spm_layout, kv_heads=2)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, spm_model_path, spm_layout) -> Path:
    """The fine-tuning tests' base: a complete tiny checkpoint folder with one KV head (28 px images,
    4 image tokens), one per test module, so a module may write next to it."""
    directory = tmp_path_factory.mktemp("ft-base")
    write_complete_checkpoint(directory, "gemma", spm_model_path, spm_layout, kv_heads=1)
    return directory
