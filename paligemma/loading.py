"""`load_model`: a checkpoint directory or Hub repo id -> a PaliGemma in eval mode, optionally laid out for inference.

The model is built on the meta device (no memory), then filled from the memory-mapped safetensors
files (checkpoint_layout.load_weights), so peak memory stays near one copy of the weights. This is
the one module that joins reading with the inference layout: it sits above both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .bigvision_npz import load_npz_weights, npz_config
from .checkpoint_layout import checkpoint_headers, load_weights
from .config import PaliGemmaConfig
from .errors import UsageError
from .hub import resolve_checkpoint
from .inference import optimize_for_inference
from .model import PaliGemma
from .quantized_checkpoint import load_quantized_model, quantization_scheme


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None, optimize: bool | None = None,
               config: PaliGemmaConfig | str | None = None) -> PaliGemma:
    """Load a PaliGemma checkpoint directory (or Hub repo id) in HF layout, in eval mode.

    A path ending in .npz is a big_vision checkpoint (bigvision_npz.py); it holds no config, so
    `config` names it: a preset ("paligemma-3b-224", "paligemma2-3b-448", ...), a config.json path or
    a PaliGemmaConfig.

    dtype=None keeps the checkpoint's dtype (the one most of its weights are stored in), but
    float16 becomes float32 with a warning (Gemma overflows in float16); dtype=torch.float16 keeps it.
    optimize=True rewrites the model for fast inference (fused, prepacked matrices; see inference.py):
    same outputs, but it can no longer be trained; None (the default) is False for a float checkpoint.
    quantize="int8" | "int4" (CPU) also makes the decoder's weights and the LM head weight-only
    quantized, implying optimize.

    A quantized checkpoint (written by `save_pretrained` of a quantized model or `paligemma quantize`;
    quantized_checkpoint.py) loads as it was saved, quantized and optimized, as a memory map of its
    files: optimize=False is refused (UsageError; load the float checkpoint it was made from instead),
    `quantize`, if given, must be its mode, and `dtype` applies to its float parts (vision tower,
    embedding, norms), float16 becoming float32 as above.
    """
    if str(path).endswith(".npz"):
        with torch.device("meta"):
            model = PaliGemma(npz_config(config))
        load_npz_weights(model, path, dtype, device)
    else:
        if config is not None:
            raise UsageError("config= is for big_vision .npz files; a checkpoint directory has its config.json")
        directory = resolve_checkpoint(path)
        checkpoint_config = PaliGemmaConfig.from_json_file(directory / "config.json")
        if quantization_scheme(checkpoint_config) is not None:
            if optimize is False:
                raise UsageError(f"{directory} is a quantized checkpoint: it loads only quantized and laid out for "
                                 "inference, so optimize=False (--no-optimize) cannot be honoured; drop it, or load "
                                 "the float checkpoint it was made from")
            return load_quantized_model(directory, checkpoint_config, dtype, device, quantize)
        # Headers first: a config.json at odds with its weights (6000 layers) fails before the model is built.
        headers = checkpoint_headers(directory, checkpoint_config)
        with torch.device("meta"):
            model = PaliGemma(checkpoint_config)
        # The model holds the only references: optimizing frees them.
        load_weights(model, directory, dtype, device, headers=headers)
    if quantize is not None or optimize:
        optimize_for_inference(model, quantize=quantize)
    return model.eval()
