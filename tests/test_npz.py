"""big_vision .npz checkpoints: reading, writing, and `paligemma convert`.

The reference file here is written by `_big_vision_tree`, an inverse mapping derived in this test
from big_vision's module definitions (flax DenseGeneral kernels (D, H, d) and (H, d, D), Gemma's
einsums "BTD,NDH->BTNH", "BSD,2KDH->2BSKH", "BTNH,NHD->BTD", gating (2, E, F)), not from
paligemma.bigvision_npz, starting from transformers' own tiny random PaliGemma.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, random_batch, write_hf_checkpoint

from paligemma import CheckpointError, UsageError, load_model
from paligemma.bigvision_npz import BIG_VISION_VOCAB, expected_keys, npz_config, save_npz
from paligemma.cli import main as cli_main
from paligemma.config import PaliGemmaConfig
from paligemma.npz_io import NpzArrays, read_npz


def _big_vision_tree(hf_state: dict, config: PaliGemmaConfig, bf16: bool = False, scanned: bool = True) -> dict:
    """big_vision's flat params tree of a transformers PaliGemma state dict (5.x in-memory names)."""
    sd = {k.removeprefix("model."): v.detach().float().numpy() for k, v in hf_state.items()}
    v, t = config.vision, config.text
    D, E, d = v.hidden_size, t.hidden_size, t.head_dim
    out = {
        "img/embedding/kernel": sd["vision_tower.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": sd["vision_tower.embeddings.patch_embedding.bias"],
        "img/pos_embedding": sd["vision_tower.embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": sd["vision_tower.post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": sd["vision_tower.post_layernorm.bias"],
        "img/head/kernel": sd["multi_modal_projector.linear.weight"].T,
        "img/head/bias": sd["multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": sd["language_model.embed_tokens.weight"],
        "llm/final_norm/scale": sd["language_model.norm.weight"],
    }
    img_layers, llm_layers = [], []
    for i in range(v.num_hidden_layers):
        p = f"vision_tower.encoder.layers.{i}."
        a = "MultiHeadDotProductAttention_0/"
        heads = v.num_attention_heads
        layer = {"LayerNorm_0/scale": sd[p + "layer_norm1.weight"], "LayerNorm_0/bias": sd[p + "layer_norm1.bias"],
                 "LayerNorm_1/scale": sd[p + "layer_norm2.weight"], "LayerNorm_1/bias": sd[p + "layer_norm2.bias"],
                 "MlpBlock_0/Dense_0/kernel": sd[p + "mlp.fc1.weight"].T,
                 "MlpBlock_0/Dense_0/bias": sd[p + "mlp.fc1.bias"],
                 "MlpBlock_0/Dense_1/kernel": sd[p + "mlp.fc2.weight"].T,
                 "MlpBlock_0/Dense_1/bias": sd[p + "mlp.fc2.bias"],
                 a + "out/kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(heads, -1, D),
                 a + "out/bias": sd[p + "self_attn.out_proj.bias"]}
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            # q[n, h] = sum_d x[d] K[d, n, h] and HF q = x W^T viewed (n, h): K[d, n, h] = W[n*dh + h, d]
            layer[f"{a}{theirs}/kernel"] = sd[p + f"self_attn.{ours}_proj.weight"].T.reshape(D, heads, -1)
            layer[f"{a}{theirs}/bias"] = sd[p + f"self_attn.{ours}_proj.bias"].reshape(heads, -1)
        img_layers.append(layer)
    for i in range(t.num_hidden_layers):
        p = f"language_model.layers.{i}."

        def heads_in(name, n):  # w[n, e, h] = W[n*d + h, e]
            return sd[p + name].reshape(n, d, E).transpose(0, 2, 1)

        q, k, vv = (heads_in(f"self_attn.{x}_proj.weight", n) for x, n in (
            ("q", t.num_attention_heads), ("k", t.num_key_value_heads), ("v", t.num_key_value_heads)))
        layer = {"attn/attn_vec_einsum/w": sd[p + "self_attn.o_proj.weight"].T.reshape(t.num_attention_heads, d, E),
                 "mlp/gating_einsum": np.stack([sd[p + "mlp.gate_proj.weight"].T, sd[p + "mlp.up_proj.weight"].T]),
                 "mlp/linear": sd[p + "mlp.down_proj.weight"].T,
                 "pre_attention_norm/scale": sd[p + "input_layernorm.weight"]}
        if t.num_key_value_heads == t.num_attention_heads:
            layer["attn/qkv_einsum/w"] = np.stack([q, k, vv])
        else:
            layer["attn/q_einsum/w"], layer["attn/kv_einsum/w"] = q, np.stack([k, vv])
        if t.is_gemma2:
            layer["pre_ffw_norm/scale"] = sd[p + "pre_feedforward_layernorm.weight"]
            layer["post_attention_norm/scale"] = sd[p + "post_attention_layernorm.weight"]
            layer["post_ffw_norm/scale"] = sd[p + "post_feedforward_layernorm.weight"]
        else:
            layer["pre_ffw_norm/scale"] = sd[p + "post_attention_layernorm.weight"]  # Gemma 1's norm before the MLP
        llm_layers.append(layer)
    for prefix, layers, unscanned in (("img/Transformer/encoderblock", img_layers, "img/Transformer/encoderblock_{}/"),
                                      ("llm/layers", llm_layers, "llm/layers/{}/")):
        for name in layers[0]:
            if scanned:
                out[f"{prefix}/{name}"] = np.stack([layer[name] for layer in layers])
            else:
                out.update({unscanned.format(i) + name: layer[name] for i, layer in enumerate(layers)})
    out = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in out.items()}
    if bf16:  # as np.savez stores jax/ml_dtypes bfloat16: the upper 16 bits, as void
        out = {k: torch.from_numpy(a).bfloat16().view(torch.int16).numpy().view("V2") for k, a in out.items()}
    return out


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """name -> (config, HF checkpoint directory, transformers model) for every tiny config."""
    out = {}
    for name, config in TINY_CONFIGS.items():
        directory = tmp_path_factory.mktemp(name)
        out[name] = (config, directory, write_hf_checkpoint(config, directory, seed=3))
    return out


def _logits(model, config):
    batch = random_batch(config, seed=1)
    with torch.no_grad():
        return model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_npz_loads_to_the_same_model_as_the_hf_checkpoint(tmp_path, hf_checkpoints, name):
    config, directory, reference = hf_checkpoints[name]
    np.savez(tmp_path / "model.npz", **_big_vision_tree(reference.state_dict(), config))
    from_npz = load_model(tmp_path / "model.npz", config=config)
    from_hf = load_model(directory)
    ours, theirs = from_npz.state_dict(), from_hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    logits = _logits(from_npz, config)
    assert logits.abs().max() > 0.1
    torch.testing.assert_close(logits, _logits(from_hf, config), rtol=0, atol=0)


def test_float16_file_loads_as_float32_with_a_warning_unless_asked(tmp_path, hf_checkpoints):
    config, directory, reference = hf_checkpoints["gemma2-gqa-window6"]
    tree = _big_vision_tree(reference.state_dict(), config)
    np.savez(tmp_path / "f16.npz", **{k: v.astype(np.float16) for k, v in tree.items()})
    with pytest.warns(UserWarning, match="big_vision checkpoint stores its weights in float16: loading them as "
                                         "float32"):
        assert load_model(tmp_path / "f16.npz", config=config).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(tmp_path / "f16.npz", config=config, dtype=torch.float16).dtype == torch.float16


def test_bfloat16_unscanned_and_prefixed_files_read_the_same(tmp_path, hf_checkpoints):
    config, directory, reference = hf_checkpoints["gemma2-gqa-window6"]
    tree = _big_vision_tree(reference.state_dict(), config, bf16=True, scanned=False)
    np.savez(tmp_path / "b16.npz", **{"params/" + k: v for k, v in tree.items()})
    model = load_model(tmp_path / "b16.npz", config=config)
    assert model.dtype == torch.bfloat16
    expected = load_model(directory, dtype=torch.bfloat16).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_each_array_is_read_once(tmp_path, hf_checkpoints, monkeypatch):
    """Loading reads the file key by key, once each, so memory holds the model and one array."""
    config, _, reference = hf_checkpoints["gemma2-mha-32px"]
    np.savez(tmp_path / "model.npz", **_big_vision_tree(reference.state_dict(), config))
    reads, read = Counter(), NpzArrays.__getitem__
    monkeypatch.setattr(NpzArrays, "__getitem__", lambda self, key: reads.update([key]) or read(self, key))
    load_model(tmp_path / "model.npz", config=config)
    assert sorted(reads) == sorted(expected_keys(config)) and set(reads.values()) == {1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gemma-mqa", "gemma2-mha-32px"])
def test_hf_to_npz_to_hf_round_trip_is_exact(tmp_path, hf_checkpoints, name, dtype):
    config, directory, _ = hf_checkpoints[name]
    model = load_model(directory, dtype=dtype)
    save_npz(model, tmp_path / "out.npz")
    again = load_model(tmp_path / "out.npz", config=config)
    again.save_pretrained(tmp_path / "hf")
    final = load_model(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]) and torch.equal(value, final.state_dict()[key]), key
    # npz -> hf -> npz: the same arrays, bit for bit
    save_npz(final, tmp_path / "again.npz")
    first, second = read_npz(tmp_path / "out.npz"), read_npz(tmp_path / "again.npz")
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and first[key].tobytes() == second[key].tobytes(), key


def test_vocabulary_rows_past_the_file_are_the_mean_row(tmp_path, hf_checkpoints):
    config, directory, _ = hf_checkpoints["gemma-mqa"]
    model = load_model(directory)
    save_npz(model, tmp_path / "short.npz", vocab_size=200)
    assert read_npz(tmp_path / "short.npz")["llm/embedder/input_embedding"].shape == (200, config.text.hidden_size)
    table = load_model(tmp_path / "short.npz", config=config).language_model.embed_tokens.weight
    original = model.language_model.embed_tokens.weight
    assert torch.equal(table[:200], original[:200])
    torch.testing.assert_close(table[200:], original[:200].mean(0).expand(56, -1), rtol=0, atol=0)
    assert BIG_VISION_VOCAB == 256_000 + 1024 + 128


def test_released_vocabulary_is_trimmed_to_big_vision_size():
    config = PaliGemmaConfig.from_preset("paligemma-3b-224")
    small = dataclasses.replace(config, text=dataclasses.replace(config.text, hidden_size=4, num_hidden_layers=1,
                                                                 intermediate_size=4, num_attention_heads=1,
                                                                 num_key_value_heads=1, head_dim=2),
                                vision=dataclasses.replace(config.vision, hidden_size=4, intermediate_size=4,
                                                           num_hidden_layers=1, num_attention_heads=1, image_size=28))
    from paligemma.bigvision_npz import state_dict_to_big_vision
    from paligemma.model import PaliGemma
    arrays = state_dict_to_big_vision(PaliGemma(small).state_dict(), small)
    assert small.text.vocab_size == 257_216 and arrays["llm/embedder/input_embedding"].shape == (BIG_VISION_VOCAB, 4)


def test_wrong_config_and_bad_files_are_refused(tmp_path, hf_checkpoints):
    config, _, reference = hf_checkpoints["gemma-mqa"]
    tree = _big_vision_tree(reference.state_dict(), config)
    np.savez(tmp_path / "pg1.npz", **tree)
    gemma2 = TINY_CONFIGS["gemma2-gqa-window6"]
    with pytest.raises(CheckpointError, match="PaliGemma 1 checkpoint"):
        load_model(tmp_path / "pg1.npz", config=gemma2)
    with pytest.raises(CheckpointError, match=r"has shape.*expected 2 layers"):
        load_model(tmp_path / "pg1.npz", config=dataclasses.replace(
            config, text=dataclasses.replace(config.text, num_hidden_layers=2)))
    with pytest.raises(UsageError, match="preset name"):
        load_model(tmp_path / "pg1.npz")
    with pytest.raises(UsageError, match="config= is for big_vision"):
        load_model(tmp_path, config=config)
    missing = dict(tree)
    del missing["img/head/bias"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match=r"missing \['img/head/bias'\]"):
        load_model(tmp_path / "missing.npz", config=config)
    squashed = dict(tree)
    squashed["llm/layers/attn/q_einsum/w"] = tree["llm/layers/attn/q_einsum/w"][..., 0]
    np.savez(tmp_path / "squashed.npz", **squashed)
    with pytest.raises(CheckpointError, match=r"q_einsum/w has shape \(3, 4, 48\), which does not give"):
        load_model(tmp_path / "squashed.npz", config=config)
    wider = dataclasses.replace(config, vision=dataclasses.replace(config.vision, intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"fc1.weight: checkpoint \(64, 32\) vs model \(128, 32\)"):
        load_model(tmp_path / "pg1.npz", config=wider)
    np.savez(tmp_path / "pickled.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="allow_pickle=False"):
        read_npz(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        read_npz(tmp_path / "junk.npz")
    with pytest.raises(FileExistsError):
        save_npz(load_model(tmp_path / "pg1.npz", config=config), tmp_path / "pg1.npz")
    assert npz_config("paligemma2-10b-448").text.num_hidden_layers == 42


def test_convert_command_both_ways(tmp_path, hf_checkpoints, spm_model_path, capsys):
    config, directory, _ = hf_checkpoints["gemma2-gqa-window6"]
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    npz = tmp_path / "out.npz"
    assert cli_main(["convert", "--from", "hf", "--to", "npz", "--input", str(directory), "--out", str(npz)]) == 0
    assert cli_main(["convert", "--from", "hf", "--to", "npz", "--input", str(directory), "--out", str(npz)]) == 2
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "hf"
    assert cli_main(["convert", "--from", "npz", "--to", "hf", "--input", str(npz), "--config",
                     str(tmp_path / "config.json"), "--tokenizer", str(spm_model_path), "--out", str(out)]) == 0
    assert (out / "tokenizer.model").read_bytes() == spm_model_path.read_bytes()
    original, converted = load_model(directory).state_dict(), load_model(out).state_dict()
    for key in original:
        assert torch.equal(original[key], converted[key]), key
    assert cli_main(["convert", "--from", "npz", "--to", "hf", "--input", str(npz), "--out", str(tmp_path / "x")]) == 2
    assert "--config" in capsys.readouterr().err
