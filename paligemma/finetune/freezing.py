"""Which parameters train: freeze whole parts of the model, or train the decoder's attention only.

| name | parameters frozen |
|---|---|
| vision | vision_tower.* (SigLIP) |
| projector | multi_modal_projector.* |
| embeddings | language_model.embed_tokens.* (also the tied LM head) |
| decoder | the rest of language_model.* (layers and final norm; not the embeddings) |

`attention_only` is big_vision's fine-tuning colab recipe: everything frozen except
`language_model.layers.*.self_attn.*`.
"""

from __future__ import annotations

from torch import nn

from ..errors import UsageError

FREEZABLE = ("vision", "projector", "embeddings", "decoder")


def _part(name: str) -> str | None:
    if name.startswith("vision_tower."):
        return "vision"
    if name.startswith("multi_modal_projector."):
        return "projector"
    if name.startswith("language_model.embed_tokens."):
        return "embeddings"
    if name.startswith("language_model."):
        return "decoder"
    return None  # an untied lm_head: trained with the decoder unless attention_only


def set_trainable(model: nn.Module, freeze=(), attention_only: bool = False) -> None:
    """Set `requires_grad` on every parameter of a PaliGemma from the freezing options."""
    freeze = set(freeze)
    unknown = freeze - set(FREEZABLE)
    if unknown:
        raise UsageError(f"unknown part(s) to freeze {sorted(unknown)}; choose from {list(FREEZABLE)}")
    for name, param in model.named_parameters():
        if attention_only:
            trainable = name.startswith("language_model.layers.") and ".self_attn." in name
        else:
            trainable = _part(name) not in freeze
        param.requires_grad_(trainable)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
