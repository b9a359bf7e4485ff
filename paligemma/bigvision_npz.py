"""big_vision PaliGemma `.npz` checkpoints (Kaggle, the fine-tuning colab) <-> our parameter names.

big_vision keeps PaliGemma as one params tree (big_vision/models/proj/paligemma/paligemma.py: a ViT
`img` and a Gemma `llm`), saved flat with "/"-joined names (`big_vision.utils.tree_flatten_with_names`,
the colab's `npsave`), some files with a leading "params/". Layers are scanned, so each per-layer
tensor is stacked on a leading layer axis L:

| big_vision key | shape | ours (HF names) |
|---|---|---|
| img/embedding/kernel | (p, p, C, D) | vision_tower.embeddings.patch_embedding.weight (D, C, p, p) |
| img/pos_embedding | (1, N, D) | vision_tower.embeddings.position_embedding.weight (N, D) |
| img/Transformer/encoderblock/LayerNorm_0, _1 | (L, D) | encoder.layers.i.layer_norm1, layer_norm2 |
| .../MultiHeadDotProductAttention_0/{query,key,value}/kernel | (L, D, H, d) | self_attn.{q,k,v}_proj.weight (H*d, D) |
| .../MultiHeadDotProductAttention_0/out/kernel | (L, H, d, D) | self_attn.out_proj.weight (D, H*d) |
| .../MlpBlock_0/Dense_0, Dense_1 kernel | (L, D, F), (L, F, D) | mlp.fc1, fc2 (transposed) |
| img/Transformer/encoder_norm | (D,) | vision_tower.post_layernorm |
| img/head/kernel | (D, E) | multi_modal_projector.linear.weight (E, D) |
| llm/embedder/input_embedding | (V, E) | language_model.embed_tokens.weight (tied LM head) |
| llm/layers/attn/q_einsum/w | (L, H, E, d) | self_attn.q_proj.weight (H*d, E) |
| llm/layers/attn/kv_einsum/w | (L, 2, K, E, d) | self_attn.k_proj, v_proj (K*d, E) |
| llm/layers/attn/qkv_einsum/w (when K == H) | (L, 3, H, E, d) | q_proj, k_proj, v_proj |
| llm/layers/attn/attn_vec_einsum/w | (L, H, d, E) | self_attn.o_proj.weight (E, H*d) |
| llm/layers/mlp/gating_einsum | (L, 2, E, F) | mlp.gate_proj, up_proj (F, E) |
| llm/layers/mlp/linear | (L, F, E) | mlp.down_proj (E, F) |
| llm/layers/pre_attention_norm/scale | (L, E) | input_layernorm |
| llm/layers/pre_ffw_norm/scale | (L, E) | Gemma 1: post_attention_layernorm; Gemma 2: pre_feedforward_layernorm |
| llm/layers/post_{attention,ffw}_norm | (L, E) | Gemma 2: post_attention_layernorm, post_feedforward_layernorm |
| llm/final_norm/scale | (E,) | language_model.norm.weight |

Sources: big_vision's models/vit.py, models/ppp/gemma.py (Einsum shapes "BTD,NDH->BTNH",
"BSD,2KDH->2BSKH", "BTNH,NHD->BTD"; `gating_einsum` (2, E, F); RMSNorm's (1 + scale) is Gemma's as in
transformers) and transformers' convert_paligemma_weights_to_hf.py / convert_paligemma2_weights_to_hf.py,
whose `slice_state_dict` this table follows. Unscanned trees (`encoderblock_0/...`, `llm/layers/0/...`)
are stacked on reading.

Vocabulary: big_vision's PaliGemma embedder has 257152 rows (Gemma's 256000 + 1024 `<loc>` + 128
`<seg>`); transformers' checkpoints append `<image>` and pad to 257216. Reading pads missing rows with
the mean embedding row (transformers' conversion samples them around that mean: those ids are never
the answer of a trained model and `<image>`'s row is replaced by image features); writing keeps at most
`BIG_VISION_VOCAB` rows, so a file from a released-shape model loads in big_vision as is.

Dtypes: float32, float16, and bfloat16 stored the way numpy saves jax/ml_dtypes bfloat16 arrays (raw
2-byte void, `|V2`). Reading and writing the files is npz_io.py's (`np.load(allow_pickle=False)` only,
one array in memory at a time). Nothing here knows the model class: `load_npz_weights` fills a model
built by loading.py, as checkpoint_layout.load_weights does.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from .checkpoint_layout import default_dtype
from .config import PaliGemmaConfig
from .errors import UsageError
from .hub import CheckpointError
from .npz_io import NpzArrays, as_float, majority_dtype, to_numpy, write_npz

BIG_VISION_VOCAB = 257_152  # rows of big_vision's PaliGemma embedder (see module docstring)

# ---------------------------------------------------------------------- the mapping, both ways
#
# Each entry: our name (with {i} for the layer), big_vision key, and the transform of one slice
# (layer i of a stacked array) into our layout. The inverse layout is produced by `_to_big_vision`.

_IMG = "img/Transformer/encoderblock/"
_ATT = _IMG + "MultiHeadDotProductAttention_0/"
_LLM = "llm/layers/"


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _heads_in(a: np.ndarray) -> np.ndarray:
    """(D, H, d) kernel -> (H*d, D) weight."""
    return a.reshape(a.shape[0], -1).T


def _heads_out(a: np.ndarray) -> np.ndarray:
    """(H, d, D) kernel -> (D, H*d) weight."""
    return a.reshape(-1, a.shape[-1]).T


def _einsum_in(a: np.ndarray) -> np.ndarray:
    """(H, E, d) einsum weight -> (H*d, E)."""
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def _einsum_out(a: np.ndarray) -> np.ndarray:
    """(H, d, E) einsum weight -> (E, H*d)."""
    return a.transpose(2, 0, 1).reshape(a.shape[2], -1)


def _same(a: np.ndarray) -> np.ndarray:
    return a


_VISION_GLOBAL = [
    ("vision_tower.embeddings.patch_embedding.weight", "img/embedding/kernel", lambda a: a.transpose(3, 2, 0, 1)),
    ("vision_tower.embeddings.patch_embedding.bias", "img/embedding/bias", _same),
    ("vision_tower.embeddings.position_embedding.weight", "img/pos_embedding", lambda a: a.reshape(-1, a.shape[-1])),
    ("vision_tower.post_layernorm.weight", "img/Transformer/encoder_norm/scale", _same),
    ("vision_tower.post_layernorm.bias", "img/Transformer/encoder_norm/bias", _same),
    ("multi_modal_projector.linear.weight", "img/head/kernel", _t),
    ("multi_modal_projector.linear.bias", "img/head/bias", _same),
]
_VISION_LAYER = [
    ("layer_norm1.weight", _IMG + "LayerNorm_0/scale", _same),
    ("layer_norm1.bias", _IMG + "LayerNorm_0/bias", _same),
    ("layer_norm2.weight", _IMG + "LayerNorm_1/scale", _same),
    ("layer_norm2.bias", _IMG + "LayerNorm_1/bias", _same),
    ("mlp.fc1.weight", _IMG + "MlpBlock_0/Dense_0/kernel", _t),
    ("mlp.fc1.bias", _IMG + "MlpBlock_0/Dense_0/bias", _same),
    ("mlp.fc2.weight", _IMG + "MlpBlock_0/Dense_1/kernel", _t),
    ("mlp.fc2.bias", _IMG + "MlpBlock_0/Dense_1/bias", _same),
    ("self_attn.out_proj.weight", _ATT + "out/kernel", _heads_out),
    ("self_attn.out_proj.bias", _ATT + "out/bias", _same),
] + [entry for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")) for entry in (
    (f"self_attn.{ours}_proj.weight", f"{_ATT}{theirs}/kernel", _heads_in),
    (f"self_attn.{ours}_proj.bias", f"{_ATT}{theirs}/bias", lambda a: a.reshape(-1)),
)]
_TEXT_LAYER = [
    ("self_attn.o_proj.weight", _LLM + "attn/attn_vec_einsum/w", _einsum_out),
    ("mlp.down_proj.weight", _LLM + "mlp/linear", _t),
    ("input_layernorm.weight", _LLM + "pre_attention_norm/scale", _same),
]
_GEMMA1_NORMS = [("post_attention_layernorm.weight", _LLM + "pre_ffw_norm/scale", _same)]
_GEMMA2_NORMS = [
    ("pre_feedforward_layernorm.weight", _LLM + "pre_ffw_norm/scale", _same),
    ("post_attention_layernorm.weight", _LLM + "post_attention_norm/scale", _same),
    ("post_feedforward_layernorm.weight", _LLM + "post_ffw_norm/scale", _same),
]
_EMBEDDING = "llm/embedder/input_embedding"
_FINAL_NORM = "llm/final_norm/scale"
# Slices of the einsum tensors: (key, index into the stacked axis after the layer) -> our name.
_QKV = _LLM + "attn/qkv_einsum/w"
_Q = _LLM + "attn/q_einsum/w"
_KV = _LLM + "attn/kv_einsum/w"
_GATING = _LLM + "mlp/gating_einsum"


def _layer_rules(config: PaliGemmaConfig) -> list[tuple[str, str, Callable]]:
    """(our name with {i}, big_vision key, transform of layer i's slice) for every plain per-layer tensor."""
    rules = [(f"vision_tower.encoder.layers.{{i}}.{ours}", key, fn) for ours, key, fn in _VISION_LAYER]
    norms = _GEMMA2_NORMS if config.text.is_gemma2 else _GEMMA1_NORMS
    rules += [(f"language_model.layers.{{i}}.{ours}", key, fn) for ours, key, fn in _TEXT_LAYER + norms]
    return rules


def _split_rules(config: PaliGemmaConfig) -> list[tuple[str, str, int]]:
    """(our name with {i}, big_vision key, index on the axis after the layer) for the tensors big_vision fuses."""
    prefix = "language_model.layers.{i}."
    if config.text.num_key_value_heads == config.text.num_attention_heads:  # big_vision's MHA branch
        qkv = [(prefix + f"self_attn.{n}_proj.weight", _QKV, j) for j, n in enumerate("qkv")]
    else:
        qkv = [(prefix + "self_attn.q_proj.weight", _Q, -1),
               (prefix + "self_attn.k_proj.weight", _KV, 0), (prefix + "self_attn.v_proj.weight", _KV, 1)]
    return qkv + [(prefix + "mlp.gate_proj.weight", _GATING, 0), (prefix + "mlp.up_proj.weight", _GATING, 1)]


def _global_rules() -> list[tuple[str, str, Callable]]:
    return _VISION_GLOBAL + [("language_model.norm.weight", _FINAL_NORM, _same)]


def expected_keys(config: PaliGemmaConfig) -> set[str]:
    """The big_vision keys (scanned layout) a PaliGemma with `config` has."""
    keys = {key for _, key, _ in _global_rules() + _layer_rules(config)} | {_EMBEDDING}
    return keys | {key for _, key, _ in _split_rules(config)}


# ---------------------------------------------------------------------- npz -> our tensors

def big_vision_to_state_dict(arrays: Mapping[str, np.ndarray], config: PaliGemmaConfig,
                             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (HF names; the tied LM head left out) from a big_vision params tree, flat and scanned.

    Strict: a missing, unexpected or misshapen key raises CheckpointError naming them. dtype=None keeps
    the file's dtype (the one most of its values are stored in), but float16 becomes float32 with a warning.
    """
    _check_keys(arrays, config)
    if dtype is None:
        dtype = default_dtype(majority_dtype(arrays), "the big_vision checkpoint stores its weights")
    layers = {"img": config.vision.num_hidden_layers, "llm": config.text.num_hidden_layers}
    # big_vision key -> [(our name, transform, which part of the array)]: each key is read once.
    jobs: dict[str, list[tuple[str, Callable, object]]] = {}
    for ours, key, fn in _global_rules():
        jobs.setdefault(key, []).append((ours, fn, ...))
    for ours, key, fn in _layer_rules(config):
        jobs.setdefault(key, []).extend((ours.format(i=i), fn, i) for i in range(layers[key[:3]]))
    for ours, key, index in _split_rules(config):
        fn = _t if key == _GATING else _einsum_in
        jobs.setdefault(key, []).extend((ours.format(i=i), fn, i if index < 0 else (i, index))
                                        for i in range(layers[key[:3]]))
    state: dict[str, torch.Tensor] = {}
    for key, tensors in jobs.items():
        array = arrays[key]
        if tensors[0][2] is not ...:
            _check_layers(key, array, layers[key[:3]])
        for ours, fn, part in tensors:
            try:  # one layer's slice at a time: a bfloat16 file is widened a slice, not a tensor, at a time
                state[ours] = _tensor(fn(as_float(array[part])), dtype)
            except (ValueError, IndexError) as err:
                raise CheckpointError(f"{key} has shape {array.shape}, which does not give {ours} ({err})") from None
        del array  # the next key's array replaces it: memory stays near one copy of the weights
    state["language_model.embed_tokens.weight"] = _padded_embedding(as_float(arrays[_EMBEDDING]), config, dtype)
    return state


def _padded_embedding(table: np.ndarray, config: PaliGemmaConfig, dtype: torch.dtype) -> torch.Tensor:
    """(V_file, E) -> (vocab_size, E): missing rows are the mean row (module docstring, "Vocabulary")."""
    vocab = config.text.vocab_size
    if table.ndim != 2 or table.shape[0] > vocab:
        raise CheckpointError(f"{_EMBEDDING} has shape {table.shape}; the config wants at most {vocab} rows "
                              f"of width {config.text.hidden_size}")
    tensor = _tensor(table, torch.float32)
    if table.shape[0] < vocab:
        tensor = torch.cat([tensor, tensor.mean(0, keepdim=True).expand(vocab - table.shape[0], -1)])
    return tensor.to(dtype)


# ---------------------------------------------------------------------- our tensors -> npz

def state_dict_to_big_vision(state: Mapping[str, torch.Tensor], config: PaliGemmaConfig,
                             vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """The big_vision params tree (flat, scanned) of our state dict; bfloat16 comes out as `|V2` raw bits.

    vocab_size: embedding rows to write; default min(vocab, BIG_VISION_VOCAB) (module docstring).
    """
    if not config.tie_word_embeddings:
        raise CheckpointError("big_vision's PaliGemma ties the LM head to the embedding; this model's is untied")
    vocab_size = min(config.text.vocab_size, BIG_VISION_VOCAB) if vocab_size is None else vocab_size
    if not 0 < vocab_size <= config.text.vocab_size:
        raise CheckpointError(f"vocab_size must be 1..{config.text.vocab_size}, got {vocab_size}")
    state = {name: t for name, t in state.items() if name != "lm_head.weight"}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"the model has no tensor {name}: not a PaliGemma with this config")
        used.add(name)
        return state[name].detach().cpu()

    out: dict[str, np.ndarray] = {}
    for ours, key, _ in _global_rules():
        out[key] = _to_big_vision(key, take(ours), config)
    for ours, key, _ in _layer_rules(config):
        count = config.vision.num_hidden_layers if key.startswith("img/") else config.text.num_hidden_layers
        out[key] = np.stack([_to_big_vision(key, take(ours.format(i=i)), config) for i in range(count)])
    fused: dict[str, dict[int, list[np.ndarray]]] = {}
    for ours, key, index in _split_rules(config):
        per_layer = [_to_big_vision(key, take(ours.format(i=i)), config) for i in range(config.text.num_hidden_layers)]
        fused.setdefault(key, {})[index] = per_layer
    for key, parts in fused.items():
        if -1 in parts:  # q_einsum: no fused axis
            out[key] = np.stack(parts[-1])
        else:  # (L, 2 or 3, ...): layer first, then the fused axis
            out[key] = np.stack([np.stack([parts[j][i] for j in sorted(parts)])
                                 for i in range(config.text.num_hidden_layers)])
    out[_EMBEDDING] = to_numpy(take("language_model.embed_tokens.weight")[:vocab_size])
    left = sorted(set(state) - used)
    if left:
        raise CheckpointError(f"tensors with no big_vision place: {', '.join(left[:8])}")
    return out


def _to_big_vision(key: str, weight: torch.Tensor, config: PaliGemmaConfig) -> np.ndarray:
    """One tensor (one layer's) in our layout -> big_vision's layout for `key` (the inverse of the rules)."""
    a = to_numpy(weight)
    vision, text = config.vision, config.text
    if key == "img/embedding/kernel":
        return a.transpose(2, 3, 1, 0)  # (D, C, p, p) -> (p, p, C, D)
    if key == "img/pos_embedding":
        return a[None]
    if key in ("img/head/kernel", _IMG + "MlpBlock_0/Dense_0/kernel", _IMG + "MlpBlock_0/Dense_1/kernel",
               _LLM + "mlp/linear", _GATING):
        return a.T
    if key.startswith(_ATT):
        heads, head_dim = vision.num_attention_heads, vision.head_dim
        if key.endswith("out/kernel"):
            return a.T.reshape(heads, head_dim, -1)
        if key.endswith("/kernel"):
            return a.T.reshape(-1, heads, head_dim)
        if not key.endswith("out/bias"):
            return a.reshape(heads, head_dim)
    if key in (_Q, _KV, _QKV):  # (n*d, E) -> (n, E, d)
        return a.reshape(-1, text.head_dim, a.shape[-1]).transpose(0, 2, 1)
    if key == _LLM + "attn/attn_vec_einsum/w":  # (E, H*d) -> (H, d, E)
        return a.reshape(a.shape[0], text.num_attention_heads, text.head_dim).transpose(1, 2, 0)
    return a


# ---------------------------------------------------------------------- files

def load_npz_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> None:
    """Fill `model` (a PaliGemma built on the meta device from the checkpoint's config) from a big_vision .npz."""
    if not model.config.tie_word_embeddings:
        raise CheckpointError("big_vision's PaliGemma ties the LM head to the embedding; use a tied config")
    with NpzArrays(path) as arrays:
        state = big_vision_to_state_dict(arrays, model.config, dtype)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    misshapen = [f"{name}: checkpoint {tuple(state[name].shape)} vs model {shape}"
                 for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if misshapen:
        raise CheckpointError(f"{path} does not match the config: {'; '.join(misshapen[:8])}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)


def save_npz(model: nn.Module, path: str | os.PathLike, vocab_size: int | None = None, overwrite: bool = False) -> None:
    """Write `model` (a PaliGemma, not quantized) as a big_vision .npz in its own dtype."""
    write_npz(state_dict_to_big_vision(model.state_dict(), model.config, vocab_size), path, overwrite)


# ---------------------------------------------------------------------- checks and dtypes

def _check_keys(arrays: Mapping[str, np.ndarray], config: PaliGemmaConfig) -> None:
    expected = expected_keys(config)
    missing = sorted(expected - arrays.keys())
    unexpected = sorted(arrays.keys() - expected)
    if not (missing or unexpected):
        return
    hint = ""
    has_post_norms = _LLM + "post_ffw_norm/scale" in arrays
    if has_post_norms != config.text.is_gemma2:
        hint = (" (the file is a PaliGemma 2 checkpoint: Gemma 2's post-norms are there)" if has_post_norms else
                " (the file is a PaliGemma 1 checkpoint: it has no Gemma 2 post-norms)")
    raise CheckpointError(f"the big_vision checkpoint does not match the config{hint}: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")


def _check_layers(key: str, stacked: np.ndarray, count: int) -> None:
    if stacked.ndim == 0 or stacked.shape[0] != count:
        raise CheckpointError(f"{key} has shape {stacked.shape}: expected {count} layers stacked on the first axis")


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # A copy: a view would keep the whole stacked array it slices alive.
    return torch.from_numpy(np.array(a, order="C", copy=True)).to(dtype)


def npz_config(config: PaliGemmaConfig | str | os.PathLike | None) -> PaliGemmaConfig:
    """The config of a big_vision checkpoint (the file holds none): a PaliGemmaConfig, a preset name
    ("paligemma2-3b-224", see config.PRESETS) or an HF config.json path."""
    if isinstance(config, PaliGemmaConfig):
        return config
    if config is None:
        raise UsageError("a big_vision .npz holds no config: pass config= a preset name like 'paligemma-3b-224' "
                         "or 'paligemma2-10b-448' (paligemma.PRESETS), or a config.json")
    if str(config).endswith(".json"):
        return PaliGemmaConfig.from_json_file(config)
    return PaliGemmaConfig.from_preset(str(config))
