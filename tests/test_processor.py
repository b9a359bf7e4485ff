"""Processor: ids, masks, labels and pixels identical to transformers' PaliGemmaProcessor (5.23)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma.config import ConfigError
from paligemma.errors import PaliGemmaError, UsageError
from paligemma.images import ImageError
from paligemma.processor import Processor, ProcessorOutput, load_processor
from paligemma.tokenizer import TokenizerError

transformers = pytest.importorskip("transformers")
# transformers' own PaliGemmaProcessor trips a NumPy 2 deprecation when it builds labels.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def photos(skimage_photos):
    return [skimage_photos[n] for n in ("astronaut", "camera", "coffee", "chelsea")]


@pytest.fixture(scope="module")
def hf_processor_factory(processor_checkpoint_factory):
    """transformers' PaliGemmaProcessor on the same files, with the GemmaTokenizer the hub's tokenizer_config asks."""
    from transformers import GemmaTokenizer, PaliGemmaProcessor, SiglipImageProcessorPil

    cache = {}

    def make(image_size=28, patch_size=14):
        if (image_size, patch_size) not in cache:
            directory = str(processor_checkpoint_factory(image_size, patch_size))
            cache[image_size, patch_size] = PaliGemmaProcessor(
                image_processor=SiglipImageProcessorPil.from_pretrained(directory),
                tokenizer=GemmaTokenizer.from_pretrained(directory))
        return cache[image_size, patch_size]

    return make


def hf_batch(hf, images, prompts, suffixes=None, padding_side="left"):
    out = hf(images=images, text=prompts, suffix=suffixes, padding="longest", padding_side=padding_side,
             return_tensors="pt")
    return {k: torch.as_tensor(v) for k, v in out.items()}


def assert_same(ours: dict, theirs: dict, with_labels: bool):
    keys = ["input_ids", "attention_mask", "token_type_ids", "pixel_values"] + (["labels"] if with_labels else [])
    assert sorted(ours) == sorted(keys)
    for key in keys:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


# ---------------------------------------------------------------------- parity

@pytest.mark.parametrize("image_size,patch_size", [(28, 14), (32, 16), (224, 14)])
def test_single_prompt_matches_hf(processor_checkpoint_factory, hf_processor_factory, photos, image_size, patch_size):
    processor = load_processor(processor_checkpoint_factory(image_size, patch_size))
    hf = hf_processor_factory(image_size, patch_size)
    ours = processor(photos[0], "caption en")
    assert_same(ours, hf_batch(hf, photos[0], "caption en"), with_labels=False)
    n = (image_size // patch_size) ** 2
    ids = ours["input_ids"][0].tolist()
    assert ids[:n] == [processor.tokenizer.image_id] * n and ids[n] == processor.tokenizer.bos_id
    assert ids[-1] == processor.tokenizer.piece_to_id("\n")
    assert ours.original_sizes == [[(512, 512)]]


PROMPTS = ["caption en", "detect circle ; star", "answer en What color is the star?", ""]
SUFFIXES = ["a red circle and a blue square", "<loc0010><loc0020><loc0300><loc0400> circle", "blue", "yes"]


def test_batch_is_left_padded_and_matches_hf(processor_checkpoint_factory, hf_processor_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    hf = hf_processor_factory(28)
    ours = processor(photos, PROMPTS)
    assert_same(ours, hf_batch(hf, photos, PROMPTS), with_labels=False)
    lengths = ours["attention_mask"].sum(1)
    assert lengths.unique().numel() > 1  # the prompts really differ in length
    assert (ours["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends in the last column
    assert ours.original_sizes == [[(512, 512)], [(512, 512)], [(600, 400)], [(451, 300)]]
    assert hf.tokenizer.padding_side == "left"  # GemmaTokenizer's own default


def test_suffixes_are_right_padded_and_match_hf(processor_checkpoint_factory, hf_processor_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    ours = processor(photos, PROMPTS, suffixes=SUFFIXES)
    assert_same(ours, hf_batch(hf_processor_factory(28), photos, PROMPTS, SUFFIXES, padding_side="right"),
                with_labels=True)
    assert (ours["attention_mask"][:, 0] == 1).all()
    for row in range(len(PROMPTS)):
        ids, types, labels = ours["input_ids"][row], ours["token_type_ids"][row], ours["labels"][row]
        real = ours["attention_mask"][row].bool()
        suffix = ids[real & (types == 1)].tolist()
        assert suffix == processor.tokenizer.encode(SUFFIXES[row]) + [processor.tokenizer.eos_id]
        assert labels[types == 1].tolist() == suffix and (labels[types == 0] == -100).all()
    # Loc tokens in a suffix are single ids.
    assert sum(processor.tokenizer.is_loc(i) for i in ours["input_ids"][1].tolist()) == 4


@pytest.mark.parametrize("side", ["left", "right"])
def test_either_padding_side_can_be_forced(processor_checkpoint_factory, hf_processor_factory, photos, side):
    processor = load_processor(processor_checkpoint_factory(28))
    hf = hf_processor_factory(28)
    assert_same(processor(photos, PROMPTS, padding_side=side), hf_batch(hf, photos, PROMPTS, padding_side=side), False)
    assert_same(processor(photos, PROMPTS, SUFFIXES, padding_side=side),
                hf_batch(hf, photos, PROMPTS, SUFFIXES, padding_side=side), True)


def test_several_images_per_prompt_match_hf(processor_checkpoint_factory, hf_processor_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    images = [[photos[0], photos[1]], [photos[2]], [photos[3], photos[2], photos[1]]]
    prompts = ["caption en", "describe en", "ocr"]
    ours = processor(images, prompts)
    assert_same(ours, hf_batch(hf_processor_factory(28), images, prompts), with_labels=False)
    assert ours["pixel_values"].shape == (6, 3, 28, 28)
    image_tokens = (ours["input_ids"] == processor.tokenizer.image_id).sum(1).tolist()
    assert image_tokens == [8, 4, 12]
    assert [len(s) for s in ours.original_sizes] == [2, 1, 3]
    with_suffix = processor(images, prompts, suffixes=["a", "b", "c"])
    assert_same(with_suffix, hf_batch(hf_processor_factory(28), images, prompts, ["a", "b", "c"], "right"), True)


def test_special_strings_in_prompts_match_hf(processor_checkpoint_factory, hf_processor_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    prompts = ["answer en <eos> and <bos>?", "segment <seg005> star\n"]
    assert_same(processor(photos[:2], prompts), hf_batch(hf_processor_factory(28), photos[:2], prompts), False)


def test_image_inputs_of_every_kind(processor_checkpoint_factory, hf_processor_factory, photos, tmp_path):
    processor = load_processor(processor_checkpoint_factory(28))
    path = tmp_path / "coffee.png"
    photos[2].save(path)
    images = [path, str(path), path.read_bytes(), np.asarray(photos[2])]
    ours = processor(images, ["caption en"] * 4)
    want = hf_batch(hf_processor_factory(28), [photos[2]] * 4, ["caption en"] * 4)
    assert_same(ours, want, with_labels=False)


# ---------------------------------------------------------------------- loading

def test_without_preprocessor_config_uses_config_image_size(processor_checkpoint_factory, photos):
    plain = load_processor(processor_checkpoint_factory(32, 16, preprocessor=False))
    hub = load_processor(processor_checkpoint_factory(32, 16))
    assert plain.image_processor == hub.image_processor
    assert plain.num_image_tokens == 4
    assert torch.equal(plain(photos[0], "x")["pixel_values"], hub(photos[0], "x")["pixel_values"])


def test_tokenizer_json_checkpoint(processor_checkpoint_factory, hf_processor_factory, photos):
    pytest.importorskip("tokenizers")
    processor = load_processor(processor_checkpoint_factory(tokenizer_file="tokenizer.json"))
    assert_same(processor(photos, PROMPTS, SUFFIXES),
                hf_batch(hf_processor_factory(28), photos, PROMPTS, SUFFIXES, padding_side="right"), True)


def _broken_copy(source, tmp_path, edit):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    edit(target)
    return target


def _edit_json(name, **changes):
    def edit(directory):
        raw = json.loads((directory / name).read_text())
        raw.update(changes)
        (directory / name).write_text(json.dumps(raw))
    return edit


@pytest.mark.parametrize("edit,error,message", [
    (_edit_json("preprocessor_config.json", size={"height": 56, "width": 56}), ConfigError, "resizes to 56x56"),
    (_edit_json("preprocessor_config.json", image_seq_length=9), ConfigError, "image_seq_length is 9"),
    (_edit_json("preprocessor_config.json", do_pad=True), ConfigError, r"do_pad=True.*\(in .*preprocessor_config"),
    (_edit_json("config.json", image_token_index=7), TokenizerError, "do not belong together|is the piece"),
    (_edit_json("config.json", bos_token_id=5), TokenizerError, "bos_token_id is 5"),
    (lambda d: (d / "tokenizer.model").unlink(), TokenizerError, "neither tokenizer.model nor tokenizer.json"),
    (lambda d: (d / "config.json").unlink(), ConfigError, "config.json"),
    (lambda d: (d / "preprocessor_config.json").write_text("{oops"), ConfigError, "not valid JSON"),
])
def test_inconsistent_checkpoints_raise(processor_checkpoint_factory, tmp_path, edit, error, message):
    with pytest.raises(error, match=message) as info:
        load_processor(_broken_copy(processor_checkpoint_factory(28), tmp_path, edit))
    assert isinstance(info.value, PaliGemmaError)  # what the command line reports as a user error


def test_hub_repo_id_resolves_like_load_model(processor_checkpoint_factory, monkeypatch):
    """A repo id goes through hub.resolve_checkpoint (here: a fake snapshot_download, no network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = processor_checkpoint_factory(28)
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from_hub = load_processor("google/paligemma-3b-pt-224")
    assert asked == ["google/paligemma-3b-pt-224"]
    local = load_processor(directory)
    assert from_hub.num_image_tokens == local.num_image_tokens
    assert from_hub.encode_prefix("caption en") == local.encode_prefix("caption en")


# ---------------------------------------------------------------------- outputs and helpers

def test_output_helpers_and_decode(processor_checkpoint_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    batch = processor(photos[:2], ["detect star", "caption en"], suffixes=["<loc0001><loc0002><loc0003><loc0004> star",
                                                                           "a red circle"])
    assert isinstance(batch, ProcessorOutput) and isinstance(processor, Processor)
    moved = batch.to("cpu")
    assert isinstance(moved, ProcessorOutput) and moved.original_sizes == batch.original_sizes
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    assert processor.batch_decode(batch["input_ids"]) == [
        "detect star\n<loc0001><loc0002><loc0003><loc0004> star", "caption en\na red circle"]
    assert processor.decode(batch["input_ids"][0], keep_loc_seg=False) == "detect star\n star"
    assert processor.decode(batch["input_ids"][1], skip_special_tokens=False).startswith("<image>" * 4 + "<bos>")


def test_max_length_raises_instead_of_truncating(processor_checkpoint_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    length = processor(photos[0], "caption en", suffixes="a red circle")["input_ids"].shape[1]
    fits = processor(photos[0], "caption en", suffixes="a red circle", max_length=length)
    assert fits["input_ids"].shape[1] == length
    message = rf"sample 0 is {length} tokens \(4 of them image tokens\).*nothing is truncated"
    with pytest.raises(UsageError, match=message):
        processor(photos[0], "caption en", suffixes="a red circle", max_length=length - 1)


# ---------------------------------------------------------------------- prompts written the transformers way

IMAGE_PROMPTS = ["<image>caption en", "<image> answer en What color is the star?", "<image>detect circle ; star",
                 "<image>"]


def test_leading_image_token_prompts_match_hf(processor_checkpoint_factory, hf_processor_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    hf = hf_processor_factory(28)
    with pytest.warns(UserWarning, match="transformers' style"):
        ours = processor(photos, IMAGE_PROMPTS)
    assert_same(ours, hf_batch(hf, photos, IMAGE_PROMPTS), with_labels=False)
    with pytest.warns(UserWarning, match="transformers' style"):
        with_suffixes = processor(photos, IMAGE_PROMPTS, suffixes=SUFFIXES)
    assert_same(with_suffixes, hf_batch(hf, photos, IMAGE_PROMPTS, SUFFIXES, padding_side="right"), with_labels=True)
    # The space typed after "<image>" is part of the prompt, in transformers and here.
    spaced, unspaced = (processor(photos[1], text)["input_ids"] for text in (" answer en x", "answer en x"))
    assert not torch.equal(spaced, unspaced)


def test_one_leading_image_token_per_image_matches_hf(processor_checkpoint_factory, hf_processor_factory, photos):
    processor = load_processor(processor_checkpoint_factory(28))
    images = [[photos[0], photos[1]], [photos[2]]]
    prompts = ["<image><image>caption en", "<image>caption es"]
    with pytest.warns(UserWarning):
        ours = processor(images, prompts)
    assert_same(ours, hf_batch(hf_processor_factory(28), images, prompts), with_labels=False)


@pytest.mark.parametrize("call,error,message", [
    (lambda p, im: p([im, im], ["a", "b", "c"]), UsageError, r"got 2 image\(s\) or image lists for 3 prompt\(s\)"),
    (lambda p, im: p(im, ["a", "b"]), UsageError, r"got 1 image\(s\) or image lists for 2 prompt\(s\)"),
    (lambda p, im: p([im], []), UsageError, "prompts is empty"),
    (lambda p, im: p(im, None), TypeError, "prompts must be a str"),
    (lambda p, im: p(im, ["a", 3]), TypeError, r"prompts\[1\] must be a str"),
    (lambda p, im: p(None, "a"), UsageError, "images are required"),
    (lambda p, im: p([], "a"), UsageError, r"got 0 image\(s\)"),
    (lambda p, im: p([[im], im], ["a", "b"]), UsageError, "mixes single images and lists"),
    (lambda p, im: p([[im], []], ["a", "b"]), UsageError, "prompt 1 has no images"),
    (lambda p, im: p({"image": im}, "a"), TypeError, "images must be"),
    (lambda p, im: p(im, "caption <image>"), UsageError, "contains '<image>'"),
    (lambda p, im: p(im, "<image>caption <image>"), UsageError, "has '<image>' after its text"),
    (lambda p, im: p(im, "<image><image>caption"), UsageError, r"starts with 2 '<image>' token\(s\) but has 1"),
    (lambda p, im: p(im, "a", suffixes="<image>b"), UsageError, r"suffixes\[0\] contains '<image>'"),
    (lambda p, im: p([im, im], ["a", "b"], suffixes=["x"]), UsageError, "got 1 suffixes for 2 prompts"),
    (lambda p, im: p(im, "a", suffixes=[None]), TypeError, r"suffixes\[0\] must be a str"),
    (lambda p, im: p(im, "a", padding_side="middle"), UsageError, "padding_side"),
    (lambda p, im: p(b"not an image", "a"), ImageError, "not a readable image"),
])
def test_bad_calls_raise(processor_checkpoint_factory, photos, call, error, message):
    processor = load_processor(processor_checkpoint_factory(28))
    with pytest.raises(error, match=message):
        call(processor, Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
