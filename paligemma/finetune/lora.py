"""LoRA on the Gemma decoder through `peft` (an optional dependency, imported only here, lazily).

`apply_lora` injects adapters into the decoder's attention and MLP projections of our plain
nn.Module (the vision tower is left alone: its q/k/v_proj share names with the decoder's, so
targets are matched by a regex anchored on `language_model`). Everything else is frozen.

Adapters are saved in peft's own format: `adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<Hub parameter name>.lora_{A,B}.weight`, the names peft gives adapters
of transformers' PaliGemmaForConditionalGeneration. `merge_lora` folds them into a plain
`PaliGemma` (W + B @ A * alpha / r) whose `save_pretrained` any loader reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint_layout import hub_key
from ..errors import UsageError
from ..model import PaliGemma

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


def apply_lora(model: PaliGemma, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               base_model_name_or_path: str | None = None) -> PaliGemma:
    """Inject LoRA adapters (in place) into the decoder projections; freeze all base weights."""
    if rank <= 0:
        raise UsageError(f"LoRA rank must be positive, got {rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_REGEX,
                             bias="none", base_model_name_or_path=base_model_name_or_path)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
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
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.get_base_layer().weight
            state[f"{name}.weight"] = base + layer.get_delta_weight(ADAPTER_NAME).to(base.dtype)
    return state


def merge_lora(model: PaliGemma) -> PaliGemma:
    """A plain `PaliGemma` with the adapters merged in; `model` itself is left unchanged.

    Unadapted tensors are shared with `model`, not copied.
    """
    state = merged_state_dict(model)
    with torch.device("meta"):
        plain = PaliGemma(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.train(model.training)

