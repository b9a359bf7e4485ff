"""`load_model`: a checkpoint directory or Hub repo id -> a PaliGemma in eval mode, optionally laid out for inference.

The model is built on the meta device (no memory), then filled from the memory-mapped safetensors
files (checkpoint_layout.load_weights), so peak memory stays near one copy of the weights. This is
the one module that joins reading with the inference layout: it sits above both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint_layout import load_weights
from .config import PaliGemmaConfig
from .hub import resolve_checkpoint
from .inference import optimize_for_inference
from .model import PaliGemma


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None, optimize: bool = False) -> PaliGemma:
    """Load a PaliGemma checkpoint directory (or Hub repo id) in HF layout, in eval mode.

    dtype=None keeps the checkpoint's dtype (the one most of its weights are stored in).
    optimize=True rewrites the model for fast inference (fused, prepacked matrices; see inference.py):
    same outputs, but it can no longer be trained. quantize="int8" | "int4" (CPU) also makes the
    decoder's weights and the LM head weight-only quantized, implying optimize.
    """
    directory = resolve_checkpoint(path)
    config = PaliGemmaConfig.from_json_file(directory / "config.json")
    with torch.device("meta"):
        model = PaliGemma(config)
    load_weights(model, directory, dtype, device)  # the model holds the only references: optimizing frees them
    if quantize is not None or optimize:
        optimize_for_inference(model, quantize=quantize)
    return model.eval()
