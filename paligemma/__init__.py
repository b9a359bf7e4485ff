"""PaliGemma 1 and 2 from scratch in PyTorch.

    import paligemma, torch
    model = paligemma.load_model("path/to/checkpoint", dtype=torch.bfloat16)
    out = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                token_type_ids=token_type_ids, labels=labels)
"""

from .config import ConfigError, PaliGemmaConfig, TextConfig, VisionConfig, PRESETS
from .hub import CheckpointError
from .kv_cache import KVCache
from .model import PaliGemma, PaliGemmaOutput
from .weights import load_model, save_model

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "PRESETS", "PaliGemma", "PaliGemmaConfig", "PaliGemmaOutput",
    "TextConfig", "VisionConfig", "load_model", "save_model",
]
__version__ = "0.1.0"
