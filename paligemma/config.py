"""Model configuration: plain dataclasses, read from an HF `config.json` or from a named preset.

No torch here. Fields use Hugging Face's names so that a `config.json` maps onto them directly.
Fields that released configs leave out take the defaults of transformers' own config classes
(GemmaConfig, Gemma2Config, SiglipVisionConfig); the structural ones (sizes, layer and head counts,
the decoder family) have no sensible default and must be present.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PaliGemmaError


class ConfigError(PaliGemmaError, ValueError):
    """A config.json field is missing, of the wrong type, or inconsistent with another field."""


def read_json(path: str | os.PathLike, error: type[Exception] = ConfigError, missing: str = "") -> Any:
    """The parsed JSON file at `path`. A missing file or one that is not UTF-8 JSON raises `error`
    naming the file (`missing` is added to the "does not exist" message, e.g. what needs the file)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist{missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}") from None


# Names of GELU variants that all mean the tanh approximation used by Gemma and SigLIP.
# Gemma 1 configs on the hub say "gelu"; transformers reads that as the tanh approximation too.
_TANH_GELU_NAMES = {"gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast"}

DECODER_FAMILIES = ("gemma", "gemma2")


@dataclass
class VisionConfig:
    """SigLIP vision tower (So400m/14 in every released PaliGemma)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        _check_positive(self, "vision_config", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "patch_size", "image_size", "num_channels"])
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size ({self.hidden_size}) is not a multiple of "
                              f"vision_config.num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config.image_size ({self.image_size}) is not a multiple of "
                              f"vision_config.patch_size ({self.patch_size})")
        if self.hidden_act not in _TANH_GELU_NAMES:
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported; "
                              f"SigLIP uses the tanh GELU ({sorted(_TANH_GELU_NAMES)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Image tokens per image: (image_size / patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """Gemma 1 (`model_type: gemma`) or Gemma 2 (`model_type: gemma2`) decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    hidden_act: str = "gelu_pytorch_tanh"
    # Gemma 2 only (None for Gemma 1). Defaults are filled in by family in __post_init__.
    query_pre_attn_scalar: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self):
        if self.model_type not in DECODER_FAMILIES:
            raise ConfigError(f"text_config.model_type is {self.model_type!r}; expected one of {DECODER_FAMILIES}")
        _check_positive(self, "text_config", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "head_dim",
                                              "max_position_embeddings"])
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"text_config.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                              f"text_config.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim ({self.head_dim}) must be even for rotary embeddings")
        act = self.hidden_act
        if act not in _TANH_GELU_NAMES and not (act == "gelu" and self.model_type == "gemma"):
            raise ConfigError(f"text_config.hidden_act {act!r} is not supported; Gemma uses the tanh GELU")
        if self.model_type == "gemma2":
            self.query_pre_attn_scalar = 256 if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
            if self.layer_types is None:
                # Gemma 2 alternates local (sliding window) and global layers, starting with local.
                self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(self.num_hidden_layers)]
        else:
            for name in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"text_config.{name} is a Gemma 2 feature but model_type is 'gemma'")
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"text_config.layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        if not all(isinstance(kind, str) for kind in self.layer_types):
            raise ConfigError(f"text_config.layer_types must be a list of strings, got {self.layer_types!r}")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ConfigError(f"text_config.layer_types has unknown entries {sorted(unknown)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("text_config.layer_types has sliding_attention layers but sliding_window is not set")

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attention_scale(self) -> float:
        """Gemma 2 scales queries by query_pre_attn_scalar^-0.5; Gemma 1 by head_dim^-0.5."""
        return (self.query_pre_attn_scalar if self.is_gemma2 else self.head_dim) ** -0.5

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None


@dataclass
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 257152
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    # The dtype the checkpoint says it was saved in (informational; the loader reads the tensors' own dtype).
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not 0 <= self.image_token_index < self.text.vocab_size:
            raise ConfigError(f"image_token_index ({self.image_token_index}) is outside the vocabulary "
                              f"(text_config.vocab_size = {self.text.vocab_size})")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def projection_dim(self) -> int:
        return self.text.hidden_size

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "PaliGemmaConfig":
        """Build from the dict of an HF PaliGemma `config.json`; errors name the offending field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in (None, "paligemma"):
            raise ConfigError(f"config.json model_type is {model_type!r}, not 'paligemma'")
        text_raw = _required(raw, "text_config", dict, "")
        vision_raw = _required(raw, "vision_config", dict, "")

        text_raw = dict(text_raw)
        if "hidden_activation" in text_raw and "hidden_act" not in text_raw:
            text_raw["hidden_act"] = text_raw["hidden_activation"]
        if text_raw.get("hidden_act") is None:
            text_raw["hidden_act"] = "gelu_pytorch_tanh"
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling")
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default":
                raise ConfigError(f"text_config rope_type {rope.get('rope_type')!r} is not supported (Gemma uses "
                                  "plain RoPE)")
            if "rope_theta" in rope:
                text_raw.setdefault("rope_theta", rope["rope_theta"])
        text_required = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads"]
        if text_raw.get("model_type") == "gemma2":
            # Absent means Gemma2Config's default; an explicit null switches the feature off, as in transformers.
            for key, default in _GEMMA2_DEFAULTS.items():
                text_raw.setdefault(key, default)
        text = TextConfig(**_pick(text_raw, TextConfig, text_required, "text_config."))

        vision_raw = dict(vision_raw)
        if vision_raw.get("vision_use_head"):
            raise ConfigError("vision_config.vision_use_head is true; PaliGemma's vision tower has no pooling head")
        vision_required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "patch_size"]
        vision = VisionConfig(**_pick(vision_raw, VisionConfig, vision_required, "vision_config."))

        # Cross-checks between the three places sizes are repeated in an HF config.
        for where, value in (("projection_dim", _optional_int(raw, "projection_dim", "projection_dim")),
                             ("vision_config.projection_dim",
                              _optional_int(vision_raw, "projection_dim", "vision_config.projection_dim"))):
            if value is not None and value != text.hidden_size:
                raise ConfigError(f"{where} ({value}) must equal text_config.hidden_size ({text.hidden_size}): "
                                  "the projector maps image features into the decoder's width")
        for where, value in (("text_config.num_image_tokens",
                              _optional_int(text_raw, "num_image_tokens", "text_config.num_image_tokens")),
                             ("vision_config.num_image_tokens",
                              _optional_int(vision_raw, "num_image_tokens", "vision_config.num_image_tokens"))):
            if value is not None and value != vision.num_patches:
                raise ConfigError(f"{where} ({value}) does not match (image_size / patch_size)^2 = "
                                  f"({vision.image_size} / {vision.patch_size})^2 = {vision.num_patches}")
        top_vocab = _optional_int(raw, "vocab_size", "vocab_size")
        if top_vocab is not None and top_vocab > text.vocab_size:
            raise ConfigError(f"vocab_size ({top_vocab}) is larger than text_config.vocab_size ({text.vocab_size})")

        image_token_index = _optional_int(raw, "image_token_index", "image_token_index",
                                          _optional_int(raw, "image_token_id", "image_token_id", 257152))
        known = {"text_config", "vision_config", "image_token_index", "image_token_id", "pad_token_id",
                 "eos_token_id", "bos_token_id", "tie_word_embeddings", "torch_dtype", "dtype"}
        raw_eos = raw.get("eos_token_id")
        eos = {"eos_token_id": raw_eos[0]} if isinstance(raw_eos, list) and raw_eos else raw  # a list: the first id
        # Absent or null: transformers' defaults.
        return cls(
            vision=vision, text=text,
            image_token_index=image_token_index,
            pad_token_id=_optional_int(raw, "pad_token_id", "pad_token_id", 0),
            eos_token_id=_optional_int(eos, "eos_token_id", "eos_token_id", 1),
            bos_token_id=_optional_int(raw, "bos_token_id", "bos_token_id", 2),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "PaliGemmaConfig":
        return cls.from_hf_dict(read_json(path, ConfigError, ": a checkpoint directory needs a config.json"))

    def to_hf_dict(self) -> dict:
        """The HF `config.json` dict; transformers' PaliGemmaConfig reads it back to the same model."""
        text = {k: v for k, v in asdict(self.text).items() if v is not None}
        text["hidden_activation"] = text["hidden_act"]
        text["num_image_tokens"] = self.num_image_tokens
        if not self.text.is_gemma2:
            del text["layer_types"]
        vision = asdict(self.vision)
        vision.update(model_type="siglip_vision_model", vision_use_head=False, num_image_tokens=self.num_image_tokens,
                      projection_dim=self.projection_dim)
        out = dict(self.extra)
        out.update(
            architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
            text_config=text, vision_config=vision, projection_dim=self.projection_dim,
            hidden_size=self.text.hidden_size, vocab_size=self.text.vocab_size,
            image_token_index=self.image_token_index, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        return out

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_preset(cls, name: str) -> "PaliGemmaConfig":
        """A released shape by name, e.g. "paligemma-3b-224" or "paligemma2-10b-448"."""
        try:
            family, size, resolution = _parse_preset_name(name)
        except (KeyError, ValueError):
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
        text = TextConfig(**_DECODERS[(family, size)])
        vision = VisionConfig(image_size=resolution)
        return cls(vision=vision, text=text)


_GEMMA2_DEFAULTS = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                    "sliding_window": 4096}

# Decoder shapes of the released checkpoints (REFERENCE.md, "Released configurations").
_VOCAB = 257216
_DECODERS: dict[tuple[str, str], dict] = {
    ("paligemma", "3b"): dict(model_type="gemma", vocab_size=_VOCAB, hidden_size=2048, intermediate_size=16384,
                              num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1),
    ("paligemma2", "3b"): dict(model_type="gemma2", vocab_size=_VOCAB, hidden_size=2304, intermediate_size=9216,
                               num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                               query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0, sliding_window=4096),
    ("paligemma2", "10b"): dict(model_type="gemma2", vocab_size=_VOCAB, hidden_size=3584, intermediate_size=14336,
                                num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                                query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                final_logit_softcapping=30.0, sliding_window=4096),
    ("paligemma2", "28b"): dict(model_type="gemma2", vocab_size=_VOCAB, hidden_size=4608, intermediate_size=36864,
                                num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                query_pre_attn_scalar=144, attn_logit_softcapping=50.0,
                                final_logit_softcapping=30.0, sliding_window=4096),
}
_RESOLUTIONS = (224, 448, 896)
PRESETS: tuple[str, ...] = tuple(f"{family}-{size}-{res}" for (family, size) in _DECODERS for res in _RESOLUTIONS)


def _parse_preset_name(name: str) -> tuple[str, str, int]:
    # Accept hub-style names too: "google/paligemma2-3b-pt-448" -> ("paligemma2", "3b", 448).
    parts = [p for p in name.rsplit("/", 1)[-1].lower().split("-") if p not in ("pt", "mix", "ft")]
    family, size, resolution = parts
    resolution = int(resolution)
    if (family, size) not in _DECODERS or resolution not in _RESOLUTIONS:
        raise KeyError(name)
    return family, size, resolution


# ---------------------------------------------------------------------- helpers

def _required(raw: dict, key: str, kind: type, prefix: str):
    if key not in raw or raw[key] is None:
        raise ConfigError(f"config.json is missing required field '{prefix}{key}'")
    if not isinstance(raw[key], kind):
        raise ConfigError(f"config.json field '{prefix}{key}' must be a {kind.__name__}, "
                          f"got {type(raw[key]).__name__}")
    return raw[key]


def _pick(raw: dict, cls: type, required: list[str], prefix: str) -> dict:
    """The dataclass fields present in `raw`, after checking the required ones are there with sane types."""
    for key in required:
        if key not in raw or raw[key] is None:
            raise ConfigError(f"config.json is missing required field '{prefix}{key}'")
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw or raw[f.name] is None:
            continue
        value = raw[f.name]
        expected = f.type if isinstance(f.type, str) else f.type.__name__
        if expected.startswith("int"):
            value = _as_int(value, prefix + f.name)
        elif expected.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config.json field '{prefix}{f.name}' must be a number, got {value!r}")
            value = float(value)
        elif expected.startswith("str") and not isinstance(value, str):
            raise ConfigError(f"config.json field '{prefix}{f.name}' must be a string, got {value!r}")
        elif expected.startswith("list") and not isinstance(value, list):
            raise ConfigError(f"config.json field '{prefix}{f.name}' must be a list, got {value!r}")
        kwargs[f.name] = value
    return kwargs


# Every integer in a config is a size, count or token id: anything larger is a broken or hostile file.
_MAX_INT = 2**31 - 1


def _as_int(value, name: str) -> int:
    """`value` as an int if it is a whole number within +-_MAX_INT (5.0 is 5), else a ConfigError naming `name`."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise ConfigError(f"config.json field '{name}' must be an integer, got {value!r}")
    if abs(value) > _MAX_INT:
        raise ConfigError(f"config.json field '{name}' is {value!r}, out of range (at most {_MAX_INT})")
    return int(value)


def _optional_int(raw: dict, key: str, name: str, default: int | None = None) -> int | None:
    """raw[key] as an int (see `_as_int`), or `default` when it is absent or null."""
    return default if raw.get(key) is None else _as_int(raw[key], name)


def _check_positive(obj, prefix: str, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{prefix}.{name} must be a positive integer, got {value!r}")
