"""LoRA on the Gemma decoder through `peft` (an optional dependency, imported only here, lazily).

`apply_lora` injects adapters into the decoder's attention and MLP projections of our plain
nn.Module (the vision tower is left alone: its q/k/v_proj share names with the decoder's, so
targets are matched by a regex anchored on `language_model`). Everything else is frozen.

Adapters are saved in peft's own format: `adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<Hub parameter name>.lora_{A,B}.weight`, the names peft gives adapters
of transformers' PaliGemmaForConditionalGeneration. `merge_lora` folds them into a plain
`PaliGemma` (W + B @ A * alpha / r) whose `save_pretrained` any loader reads.

QLoRA: `quantize_base(model, "int8" | "int4")` first replaces the same decoder projections by frozen
`quantize.QuantizedLinear` layers (one per projection, unfused, under their HF names, so the adapters
and their file keep peft's names); the adapters, in float32, then wrap those. The quantized layer's
backward gives the input's gradient only (quantize.py). Merging dequantizes the base: the merged
float checkpoint holds dequantize(Q) + B @ A * alpha / r, which is exactly what the QLoRA model
computed with, up to float rounding (docs/finetune.md gives the measured error). On CUDA the base
is bitsandbytes' nf4 (`Linear4bit`, which peft wraps itself) where bitsandbytes is installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint_layout import hub_key
from ..errors import UsageError
from ..model import PaliGemma
from ..quantize import MODES as QUANTIZE_MODES
from ..quantize import QuantizedLinear, check_available
from ..safetensors_io import release_file_pages

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Full-match regex over module names: our names ("language_model.layers.0.self_attn.q_proj") and
# transformers' ("model.language_model.layers..." / "language_model.model.layers...") alike.
TARGET_REGEX = r".*language_model.*\.(" + "|".join(DECODER_TARGETS) + ")"
_PEFT_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the optional 'peft' package: `pip install peft`") from None
    return peft


def _decoder_projections(model: PaliGemma):
    """(owner module, attribute name) of every decoder projection LoRA targets."""
    for layer in model.language_model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name in DECODER_TARGETS:
                if hasattr(owner, name):
                    yield owner, name


def quantize_base(model: PaliGemma, mode: str, group_size: int | None = None) -> PaliGemma:
    """Replace (in place) the decoder projections by frozen quantized layers, the base of QLoRA: our
    `QuantizedLinear` on the CPU, bitsandbytes' nf4 `Linear4bit` (mode "int4" only) on CUDA."""
    if mode not in QUANTIZE_MODES:
        raise UsageError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if has_lora(model):
        raise ValueError("quantize the base before injecting LoRA adapters")
    if model.device.type == "cuda":
        return _quantize_base_bitsandbytes(model, mode)
    if model.device.type != "cpu":
        raise UsageError(f"quantized fine-tuning runs on the CPU (our kernels) or CUDA (bitsandbytes), "
                         f"not on {model.device}")
    check_available(mode)
    for owner, name in _decoder_projections(model):
        linear = getattr(owner, name)
        if linear.bias is not None:
            raise UsageError(f"cannot quantize {name}: it has a bias")
        weight = linear.weight.detach()
        setattr(owner, name, QuantizedLinear(weight, mode, group_size, [(name, weight.shape[0])]))
        release_file_pages(weight)  # its memory-mapped pages leave resident memory once dropped
    return model


def _quantize_base_bitsandbytes(model: PaliGemma, mode: str) -> PaliGemma:
    """CUDA: bitsandbytes' nf4 layers (QLoRA's own), which peft wraps with its bnb LoRA layers."""
    if mode != "int4":
        raise UsageError("on CUDA, quantized fine-tuning is bitsandbytes' nf4: use --quantize int4")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("--quantize on CUDA needs bitsandbytes (`pip install bitsandbytes`); our int8/int4 "
                         "kernels are CPU-only") from None
    for owner, name in _decoder_projections(model):
        linear = getattr(owner, name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4",
                                  compute_dtype=torch.bfloat16, device="cpu")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
        setattr(owner, name, layer.to(model.device))  # quantized as it moves to the GPU
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) or type(m).__name__ == "Linear4bit" for m in model.modules())


@functools.cache
def _quantized_lora_class():
    """peft's LoRA Linear over our QuantizedLinear: the base's output plus B(A(x)) * scaling, as for nn.Linear."""
    from peft.tuners.lora.layer import Linear

    class QuantizedLoraLinear(Linear):
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

    return QuantizedLoraLinear


def apply_lora(model: PaliGemma, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               base_model_name_or_path: str | None = None) -> PaliGemma:
    """Inject LoRA adapters (in place) into the decoder projections (plain or `quantize_base`'s quantized
    ones); freeze all base weights."""
    if rank <= 0:
        raise UsageError(f"LoRA rank must be positive, got {rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_REGEX,
                             bias="none", base_model_name_or_path=base_model_name_or_path)
    quantized = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    if quantized:
        config._register_custom_module({QuantizedLinear: _quantized_lora_class()})
    # peft puts each adapter on the device of its base's `qweight`, `weight` or first parameter: an int4
    # layer has none of these, so it lends its packed weights under that name while peft looks.
    lent = [module for module in quantized if module.mode == "int4"]
    for module in lent:
        module.qweight = module.packed
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    finally:
        for module in lent:
            del module.qweight
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            param.data = param.data.float()  # peft gives a bf16 base bf16 adapters: AdamW wants float32
    model.lora_config = config  # read back by save_adapter
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    if not has_lora(model):
        return {}
    from peft.tuners.lora import LoraLayer
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _peft_key(param_name: str) -> str:
    """'...q_proj.lora_A.default.weight' -> 'base_model.model.language_model.model....q_proj.lora_A.weight'."""
    return _PEFT_PREFIX + hub_key(param_name.replace(f".{ADAPTER_NAME}.", "."))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's file names."""
    return {_peft_key(name): param.detach().cpu().contiguous()
            for name, param in model.named_parameters() if ".lora_" in name}


def save_adapter(model: nn.Module, directory: str | Path) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` (peft's layout) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    model.lora_config.save_pretrained(str(directory))
    save_file(adapter_state_dict(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def load_adapter(model: PaliGemma, directory: str | Path) -> PaliGemma:
    """Inject the adapters saved in `directory` into a base model (in place) and fill their weights."""
    peft = _peft()
    directory = Path(directory)
    config = peft.LoraConfig.from_pretrained(str(directory))
    if not has_lora(model):
        apply_lora(model, rank=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   base_model_name_or_path=config.base_model_name_or_path)
    ours = {_peft_key(name): name for name, _ in model.named_parameters() if ".lora_" in name}
    stored = load_file(directory / ADAPTER_WEIGHTS)
    missing, unexpected = sorted(set(ours) - set(stored)), sorted(set(stored) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} does not match the model's adapters "
                         f"(missing: {missing[:4]}, unexpected: {unexpected[:4]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in stored.items():
            params[ours[key]].copy_(tensor)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our plain parameter names -> tensors with every adapter folded in (W + delta); others shared."""
    layers = _lora_layers(model)
    dtype = model.language_model.embed_tokens.weight.dtype
    adapted_bases = tuple(f"{name}.base_layer." for name in layers)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or name.startswith(adapted_bases):
            continue  # adapters, and adapted bases: written merged below (a quantized base saves other names)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor  # widening.py's float32 norms
    with torch.no_grad():
        for name, layer in layers.items():
            base = _float_weight(layer.get_base_layer(), dtype)
            state[f"{name}.weight"] = (base.float() + layer.get_delta_weight(ADAPTER_NAME).float()).to(base.dtype)
            if getattr(layer.get_base_layer(), "bias", None) is not None:
                state[f"{name}.bias"] = layer.get_base_layer().bias
    return state


def _float_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """An adapted layer's (N, K) weight: a linear's own, or a quantized base's dequantized into `dtype`."""
    if isinstance(base, QuantizedLinear):
        return base.dequantize(dtype)
    if type(base).__name__ == "Linear4bit":  # bitsandbytes
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)
    return base.weight


def merge_lora(model: PaliGemma) -> PaliGemma:
    """A plain `PaliGemma` with the adapters merged in; `model` itself is left unchanged.

    Unadapted tensors are shared with `model`, not copied.
    """
    state = merged_state_dict(model)
    with torch.device("meta"):
        plain = PaliGemma(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.train(model.training)

