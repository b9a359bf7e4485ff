"""Loaders under attack and careless input (issue 18, items 10 and 11): index files that point outside the
checkpoint folder, odd numbers in config.json, absurd sizes, stray safetensors files, float16 weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import random_batch, tiny_config, write_hf_checkpoint

import paligemma
from paligemma import CheckpointError, ConfigError, PaliGemmaConfig
from paligemma.safetensors_io import INDEX_FILE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config("gemma2", kv_heads=2, window=6)
    directory = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(config, directory)
    return config, directory


def _logits(model, config):
    batch = random_batch(config)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _sharded(checkpoint, folder):
    """A copy of the checkpoint saved as several shards with an index; returns (folder, index dict)."""
    _, directory = checkpoint
    paligemma.load_model(directory).save_pretrained(folder, max_shard_bytes=20_000)
    return folder, json.loads((folder / INDEX_FILE).read_text())


def _point_index(folder, index, old: str, new: str) -> None:
    index["weight_map"] = {key: new if name == old else name for key, name in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))


# ---------------------------------------------------------------------- item 10: the index stays in its folder

@pytest.mark.parametrize("how", ["parent", "absolute", "subfolder", "symlink"])
def test_index_cannot_name_files_outside_the_checkpoint_folder(checkpoint, tmp_path, how):
    folder, index = _sharded(checkpoint, tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shutil.move(shard, outside)  # a complete, loadable shard, just not in the folder
    if how == "parent":
        _point_index(folder, index, shard.name, f"../elsewhere/{shard.name}")
    elif how == "absolute":
        _point_index(folder, index, shard.name, str(outside))
    elif how == "subfolder":
        _point_index(folder, index, shard.name, f"sub/../../elsewhere/{shard.name}")
    else:
        os.symlink(outside, shard)  # the name is plain, the file is not in the folder
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        paligemma.load_model(folder)


def test_a_shard_index_that_names_no_string_is_invalid(checkpoint, tmp_path):
    folder, index = _sharded(checkpoint, tmp_path / "ckpt")
    index["weight_map"] = {key: 7 for key in index["weight_map"]}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a valid safetensors index.*file names"):
        paligemma.load_model(folder)


def test_hub_cache_snapshot_links_into_its_blobs_still_load(checkpoint, tmp_path):
    # huggingface_hub stores snapshots/<rev>/<file> as links to ../../blobs/<hash>: that must keep working.
    config, directory = checkpoint
    repo = tmp_path / "models--google--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, name in enumerate(["config.json", "model.safetensors"]):
        shutil.copy(directory / name, repo / "blobs" / f"blob{number}")
        os.symlink(f"../../blobs/blob{number}", snapshot / name)
    loaded = paligemma.load_model(snapshot)
    torch.testing.assert_close(_logits(loaded, config), _logits(paligemma.load_model(directory), config))


# ---------------------------------------------------------------------- item 11: odd numbers in config.json

def _edited(checkpoint, path: str, value) -> dict:
    _, directory = checkpoint
    raw = json.loads((directory / "config.json").read_text())
    *parents, last = path.split(".")
    target = raw
    for key in parents:
        target = target[key]
    target[last] = value
    return raw


@pytest.mark.parametrize("path", ["text_config.num_hidden_layers", "text_config.vocab_size",
                                  "vision_config.hidden_size", "image_token_index", "pad_token_id",
                                  "eos_token_id", "text_config.num_image_tokens", "vocab_size", "projection_dim"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e30, 2**40, 2.5, "12", [], None])
def test_bad_integer_fields_are_named(checkpoint, tmp_path, path, value):
    raw = _edited(checkpoint, path, value)
    if value is None and path in ("pad_token_id", "eos_token_id", "vocab_size",
                                  "projection_dim", "text_config.num_image_tokens"):
        PaliGemmaConfig.from_hf_dict(raw)  # optional fields: null means "not given", which is fine
        return
    with pytest.raises(ConfigError, match=f"'{path}'|{path} "):
        PaliGemmaConfig.from_hf_dict(raw)
    # The same file through the loader (json writes inf and nan as Infinity and NaN, as a sloppy tool would).
    _, directory = checkpoint
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(directory / "model.safetensors", folder)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        paligemma.load_model(folder)


def test_bad_values_in_lists_and_eos_lists_are_named(checkpoint):
    with pytest.raises(ConfigError, match="eos_token_id"):
        PaliGemmaConfig.from_hf_dict(_edited(checkpoint, "eos_token_id", []))
    with pytest.raises(ConfigError, match="eos_token_id"):
        PaliGemmaConfig.from_hf_dict(_edited(checkpoint, "eos_token_id", [math.nan]))
    assert PaliGemmaConfig.from_hf_dict(_edited(checkpoint, "eos_token_id", [1, 107])).eos_token_id == 1
    with pytest.raises(ConfigError, match="text_config.layer_types"):
        PaliGemmaConfig.from_hf_dict(_edited(checkpoint, "text_config.layer_types", [{}, [], 3]))


def test_cli_reports_a_bad_config_field_as_a_user_error(checkpoint, tmp_path, capsys):
    from paligemma.cli import main

    _, directory = checkpoint
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_edited(checkpoint, "text_config.num_hidden_layers", math.inf)))
    shutil.copy(directory / "model.safetensors", folder)
    from paligemma.cli_common import EXAMPLE_IMAGE

    assert main(["generate", "--model", str(folder), "--image", str(EXAMPLE_IMAGE), "--prompt", "caption en"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "text_config.num_hidden_layers" in err and "Traceback" not in err


@pytest.mark.parametrize("path, value, checkpoint_has", [
    ("text_config.num_hidden_layers", 6000, "3 decoder layers"),
    ("vision_config.num_hidden_layers", 5000, "2 vision layers"),
])
def test_absurd_layer_counts_are_caught_before_the_model_is_built(checkpoint, tmp_path, monkeypatch, path, value,
                                                                    checkpoint_has):
    _, directory = checkpoint
    folder = tmp_path / "ckpt"
    folder.mkdir()
    raw = _edited(checkpoint, path, value)
    del raw["text_config"]["layer_types"]  # else that list's length gives the game away
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(directory / "model.safetensors", folder)

    def never(*args, **kwargs):
        raise AssertionError("the model was built before config.json was checked against the checkpoint")

    monkeypatch.setattr("paligemma.loading.PaliGemma", never)
    with pytest.raises(CheckpointError, match=f"{path} is {value} but the checkpoint holds {checkpoint_has}"):
        paligemma.load_model(folder)


# ---------------------------------------------------------------------- item 11: stray safetensors files

def _codec_file(folder):
    from paligemma.cli_common import DEMO_MASK_CODEC

    shutil.copy(DEMO_MASK_CODEC, folder / "mask_codec.safetensors")


def test_mask_codec_is_never_taken_for_the_weights(checkpoint, tmp_path):
    _, directory = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    _codec_file(tmp_path)
    with pytest.raises(CheckpointError, match="holds no model weights.*mask_codec.safetensors"):
        paligemma.load_model(tmp_path)


def test_folder_with_only_a_pickle_says_so(checkpoint, tmp_path):
    _, directory = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    _codec_file(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle files \\(pytorch_model.bin\\)"):
        paligemma.load_model(tmp_path)


def test_an_oddly_named_weights_file_is_found_next_to_other_safetensors_files(checkpoint, tmp_path):
    config, directory = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    shutil.copy(directory / "model.safetensors", tmp_path / "weights.safetensors")
    _codec_file(tmp_path)
    torch.testing.assert_close(_logits(paligemma.load_model(tmp_path), config),
                               _logits(paligemma.load_model(directory), config), rtol=0, atol=0)


# ---------------------------------------------------------------------- item 11: float16 checkpoints

def test_float16_checkpoint_is_upcast_unless_float16_is_asked_for(checkpoint, tmp_path):
    config, directory = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    half = {k: v.to(torch.float16) for k, v in load_file(directory / "model.safetensors").items()}
    save_file(half, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="float16.*float32") as caught:
        model = paligemma.load_model(tmp_path)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert model.dtype == torch.float32
    state = model.state_dict()
    assert all(torch.equal(state[key.replace("vision_tower.vision_model.", "vision_tower.")
                                 .replace("language_model.model.", "language_model.")], value.float())
               for key, value in half.items() if not key.startswith("language_model.lm_head"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit float16: kept, and no warning
        assert paligemma.load_model(tmp_path, dtype=torch.float16).dtype == torch.float16
        assert paligemma.load_model(directory).dtype == torch.float32  # float32 stays as it is, silently
