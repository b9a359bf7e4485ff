"""Config parsing, released presets, and the strict checkpoint loader / saver."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import random_batch, tiny_config, write_hf_checkpoint

import paligemma
from paligemma import CheckpointError, ConfigError, PaliGemma, PaliGemmaConfig
from paligemma.config import PRESETS
from paligemma.embedding import new_embedding

# config.json of google/paligemma-3b-pt-224 and google/paligemma2-3b-pt-448 as published.
HUB_PG1_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1,
                    "torch_dtype": "float32", "vocab_size": 257216},
    "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}
HUB_PG2_448 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2304,
    "text_config": {"hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
                    "num_image_tokens": 1024, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "torch_dtype": "bfloat16", "vocab_size": 257216},
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 448, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_image_tokens": 1024, "num_positions": 1024, "patch_size": 14, "projection_dim": 2304,
                      "torch_dtype": "bfloat16", "vision_use_head": False},
}


# ---------------------------------------------------------------------- config

def test_hub_configs_parse_to_the_presets():
    pg1 = PaliGemmaConfig.from_hf_dict(HUB_PG1_224)
    pg2 = PaliGemmaConfig.from_hf_dict(HUB_PG2_448)
    assert (pg1.vision, pg1.text) == (PaliGemmaConfig.from_preset("paligemma-3b-224").vision,
                                      PaliGemmaConfig.from_preset("paligemma-3b-224").text)
    preset = PaliGemmaConfig.from_preset("google/paligemma2-3b-pt-448")
    assert (pg2.vision, pg2.text) == (preset.vision, preset.text)
    assert pg2.num_image_tokens == 1024 and pg2.text.attention_scale == 256 ** -0.5
    assert pg2.text.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert pg2.text.final_logit_softcapping == 30.0 and pg2.text.attn_logit_softcapping == 50.0


def test_config_round_trips_through_transformers():
    from transformers import PaliGemmaConfig as HFConfig
    for name in ("paligemma-3b-896", "paligemma2-28b-224"):
        config = PaliGemmaConfig.from_preset(name)
        hf = HFConfig(**config.to_hf_dict())
        again = PaliGemmaConfig.from_hf_dict(hf.to_dict())
        assert (again.vision, again.text) == (config.vision, config.text)


@pytest.mark.parametrize("path, message", [
    (("text_config", "num_key_value_heads"), "text_config.num_key_value_heads"),
    (("vision_config", "patch_size"), "vision_config.patch_size"),
    (("text_config",), "'text_config'"),
])
def test_missing_field_is_named(path, message):
    raw = json.loads(json.dumps(HUB_PG1_224))
    target = raw
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(ConfigError, match=message):
        PaliGemmaConfig.from_hf_dict(raw)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["text_config"].update(num_image_tokens=1024), "num_image_tokens"),
    (lambda r: r.update(projection_dim=1024), "projection_dim"),
    (lambda r: r["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda r: r["text_config"].update(model_type="llama"), "model_type"),
    (lambda r: r["text_config"].update(hidden_size="2048"), "text_config.hidden_size"),
    (lambda r: r["vision_config"].update(image_size=225), "image_size"),
    (lambda r: r["text_config"].update(sliding_window=4096), "Gemma 2 feature"),
    (lambda r: r.update(image_token_index=300000), "image_token_index"),
])
def test_inconsistent_config_is_an_error(edit, message):
    raw = json.loads(json.dumps(HUB_PG1_224))
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        PaliGemmaConfig.from_hf_dict(raw)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="paligemma-3b-224"):
        PaliGemmaConfig.from_preset("paligemma-7b-224")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_on_meta_with_transformers_parameter_count(name):
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig.from_preset(name)
    with torch.device("meta"):
        ours = PaliGemma(config)
        reference = PaliGemmaForConditionalGeneration(HFConfig(**config.to_hf_dict()))
    assert ours.num_parameters() == reference.num_parameters()


def test_released_parameter_counts():
    with torch.device("meta"):
        pg1 = PaliGemma(PaliGemmaConfig.from_preset("paligemma-3b-224"))
        pg2 = PaliGemma(PaliGemmaConfig.from_preset("paligemma2-3b-224"))
    assert pg1.num_parameters() == 2_923_466_480  # transformers' figure, 257216 embedding rows
    assert pg1.num_parameters() - 64 * 2048 == 2_923_335_408  # keras-hub's, counting 257152 rows
    assert pg2.num_parameters() - 64 * 2304 == 3_032_094_960  # keras-hub's PaliGemma 2 3B figure


# ---------------------------------------------------------------------- loading

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config("gemma2", kv_heads=2, window=6)
    directory = tmp_path_factory.mktemp("ckpt")
    reference = write_hf_checkpoint(config, directory)
    return config, directory, reference


def _logits(model, config):
    batch = random_batch(config)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _copy_with(tmp_path, directory, tensors=None, config=None):
    """A copy of the checkpoint with its tensors and/or config replaced."""
    tmp_path.mkdir(exist_ok=True)
    tensors = tensors if tensors is not None else load_file(directory / "model.safetensors")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    raw = config if config is not None else (directory / "config.json").read_text()
    (tmp_path / "config.json").write_text(raw)
    return tmp_path


def test_loaded_model_has_no_meta_tensors_and_keeps_dtype(checkpoint, tmp_path):
    config, directory, _ = checkpoint
    model = paligemma.load_model(directory)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.dtype == torch.float32 and not model.training
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(directory / "model.safetensors").items()}
    assert paligemma.load_model(_copy_with(tmp_path, directory, tensors)).dtype == torch.bfloat16


def test_loading_does_not_import_the_compiler(checkpoint):
    """Building on the meta device skips nn.Embedding's initializer, which there imports torch._dynamo
    (~1.5 s of every process's first load); anywhere else the table is initialized as nn.Embedding's."""
    _, directory, _ = checkpoint
    code = ("import sys, paligemma; paligemma.load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
    torch.manual_seed(0)
    ours = new_embedding(300, 40)
    torch.manual_seed(0)
    assert torch.equal(ours.weight, torch.nn.Embedding(300, 40).weight)
    with torch.device("meta"):
        empty = new_embedding(300, 40)
    assert empty.weight.is_meta and empty.weight.shape == (300, 40) and empty.weight.requires_grad


def test_sharded_checkpoint_round_trip(checkpoint, tmp_path):
    config, directory, _ = checkpoint
    model = paligemma.load_model(directory)
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(_logits(paligemma.load_model(tmp_path), config), _logits(model, config), atol=0, rtol=0)


def test_saving_over_the_checkpoint_it_was_loaded_from(checkpoint, tmp_path):
    # The loaded weights are views of the files' memory maps: each new file is written aside and renamed
    # over the old one, stale shards and index go, and no temporary file is left behind.
    config, directory, _ = checkpoint
    target = _copy_with(tmp_path / "ckpt", directory)
    model = paligemma.load_model(target)
    expected = _logits(model, config)
    model.save_pretrained(target, max_shard_bytes=20_000)
    model = paligemma.load_model(target)
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(_logits(paligemma.load_model(target), config), expected, atol=0, rtol=0)


def test_released_file_pages_read_back_the_same_weights(checkpoint, tmp_path):
    # Quantized loading hands the mapped pages of the float weights back to the OS (release_file_pages);
    # anything still in use reads the file's bytes again, so values are unchanged.
    from paligemma.safetensors_io import read_tensors, release_file_pages
    config, directory, _ = checkpoint
    big = {"w": torch.randn(64, 1024), "small": torch.randn(3)}  # 256 KB: whole pages inside the tensor
    save_file(big, tmp_path / "model.safetensors")
    mapped = read_tensors(tmp_path / "model.safetensors", [("w", "w"), ("small", "small")], torch.float32, "cpu")
    expected = mapped["w"].clone()
    released = release_file_pages(mapped["w"])
    assert 0 < released <= expected.numel() * 4 and released % 4096 == 0
    assert torch.equal(mapped["w"], expected)
    assert release_file_pages(expected) == 0  # not a view of a checkpoint map: left alone
    assert release_file_pages(mapped["small"]) == 0  # no whole page inside it
    # A model loaded from the map still gives the same outputs after every weight's pages are released.
    model = paligemma.load_model(directory)
    before = _logits(model, config)
    assert sum(release_file_pages(p) for p in model.parameters()) > 0
    torch.testing.assert_close(_logits(model, config), before, atol=0, rtol=0)


def test_transformers_5_in_memory_layout_and_stored_tied_head(checkpoint, tmp_path):
    config, directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        key = key.replace("vision_tower.vision_model.", "model.vision_tower.")
        key = key.replace("language_model.model.", "model.language_model.")
        key = key.replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[key] = value
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    model = paligemma.load_model(_copy_with(tmp_path, directory, renamed))
    torch.testing.assert_close(_logits(model, config), _logits(paligemma.load_model(directory), config))


def test_saved_model_loads_in_transformers_with_identical_outputs(checkpoint, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    config, directory, _ = checkpoint
    ours = paligemma.load_model(directory)
    ours.save_pretrained(tmp_path)
    reference = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = random_batch(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=0)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing: language_model\.layers\.1\.mlp\.up_proj\.weight"):
        paligemma.load_model(_copy_with(tmp_path, directory, tensors))


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    tensors["vision_tower.vision_model.head.probe"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected: vision_tower\.vision_model\.head\.probe"):
        paligemma.load_model(_copy_with(tmp_path, directory, tensors))


def test_wrong_shape_is_named(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    tensors = load_file(directory / "model.safetensors")
    key = "multi_modal_projector.linear.weight"
    tensors[key] = tensors[key][:-1].clone()
    with pytest.raises(CheckpointError, match=r"wrong shape: multi_modal_projector\.linear\.weight"):
        paligemma.load_model(_copy_with(tmp_path, directory, tensors))


def test_missing_shard_is_reported(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    paligemma.load_model(directory).save_pretrained(tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        paligemma.load_model(tmp_path)


def test_corrupt_config_json(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    with pytest.raises(ConfigError, match="not valid JSON"):
        paligemma.load_model(_copy_with(tmp_path, directory, config='{"model_type": "paligemma", '))


def test_corrupt_safetensors_file(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    target = _copy_with(tmp_path, directory)
    (target / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        paligemma.load_model(target)


def test_pickle_checkpoint_is_refused_without_unpickling(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    # A pickle that would create a file if it were ever loaded.
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (tmp_path / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="pickle"):
        paligemma.load_model(tmp_path)
    assert not marker.exists()


def test_unknown_local_path_and_offline_hub(monkeypatch, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        paligemma.load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="google/paligemma-3b-pt-224"):
        paligemma.load_model("google/paligemma-3b-pt-224")
