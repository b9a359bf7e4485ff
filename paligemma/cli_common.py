"""What the commands share: the bundled files, the model options, and one way to load a checkpoint.

    add_model_arguments(parser)              # --model --dtype --device --quantize --no-optimize
    args = parser.parse_args()
    model, processor, mask_codec = load(checkpoint_dir(args.model), args.dtype, args.device,
                                        optimize=not args.no_optimize, quantize=args.quantize)

`paligemma generate`, `serve`, `demo-eval` and `finetune` all load through `load`, so a checkpoint
is found (local folder or Hub repo id), checked and loaded the same way by each of them. This module
sits above the loading layer (loading, processor, vqvae) and below the commands; nothing in the
library proper imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UsageError
from .hub import resolve_checkpoint
from .images import DEFAULT_MAX_PIXELS
from .loading import load_model
from .model import PaliGemma
from .processor import Processor, load_processor
from .quantize import MODES as QUANTIZE_MODES
from .vqvae import MASK_CODEC_FILE, MaskCodec, load_mask_codec

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = PACKAGE_DIR / "demo_model"  # the bundled demo checkpoint (docs/demo.md)
DEMO_TOKENIZER = DEMO_MODEL_DIR / "tokenizer.model"
DEMO_MASK_CODEC = DEMO_MODEL_DIR / MASK_CODEC_FILE
EXAMPLE_IMAGE = PACKAGE_DIR / "assets" / "example.png"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_arguments(parser, *, required: bool = False, default_dtype: str | None = None,
                        inference_options: bool = True) -> None:
    """Add --model and --dtype to `parser` (a parser or argument group), and with `inference_options`
    --device, --quantize and --no-optimize, which only a model that is not trained can take.

    required: --model has no default; otherwise it defaults to the bundled demo model (see
    `checkpoint_dir`). default_dtype: --dtype's default, a DTYPES name; None keeps the checkpoint's.
    """
    parser.add_argument("--model", required=required,
                        help="checkpoint directory (HF layout) or Hub repo id"
                             + ("" if required else " (default: the bundled demo model)"))
    checkpoints = "the checkpoint's"
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                        help=f"weights dtype (default: {default_dtype or checkpoints})")
    if not inference_options:
        return
    add_device_argument(parser)
    parser.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="weight-only quantization of the decoder and LM head at load time (CPU)")
    parser.add_argument("--no-optimize", action="store_true",
                        help="load the model as trained instead of rewritten for inference (fused, prepacked "
                             "matrices and the bf16 decode kernel; see paligemma/inference.py); not for a "
                             "quantized checkpoint, which loads only laid out for inference")


def add_device_argument(parser) -> None:
    """Add --device (`parse_device` reads it) to `parser` (a parser or argument group)."""
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N, or auto (cuda when this machine has it, else cpu; default cpu)")


def add_mask_codec_argument(parser) -> None:
    """Add --mask-codec to `parser` (a parser or argument group); `load` takes its value."""
    parser.add_argument("--mask-codec", metavar="FILE",
                        help="VQ-VAE that decodes segment answers into masks: big_vision's vae-oid.npz or a "
                             f".safetensors codec (default: the checkpoint's {MASK_CODEC_FILE}, if it has one)")


def checkpoint_dir(model: str | Path | None) -> Path:
    """The local directory of --model (a folder or a Hub repo id, downloaded if needed), or of the
    bundled demo model when `model` is None."""
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise UsageError(f"no --model given and the bundled demo model is not installed ({DEMO_MODEL_DIR}); "
                             "pass --model with a checkpoint directory or Hub repo id")
        model = DEMO_MODEL_DIR
    return resolve_checkpoint(model)


def parse_device(name: str | torch.device) -> torch.device:
    """--device as a torch.device that this machine has; "auto" is cuda when there is one, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def mask_codec_path(directory: str | Path, mask_codec: str | Path | None = None) -> Path | None:
    """The codec file to use: --mask-codec (which must exist), else the checkpoint's own, else None."""
    if mask_codec is not None:
        if not Path(mask_codec).is_file():
            raise UsageError(f"--mask-codec {mask_codec} does not exist")
        return Path(mask_codec)
    own = Path(directory) / MASK_CODEC_FILE
    return own if own.is_file() else None


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         optimize: bool | None = None, quantize: str | None = None, *, mask_codec: str | Path | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[PaliGemma, Processor, MaskCodec | None]:
    """Load a checkpoint (directory or Hub repo id) as the commands do: the model (`load_model`), its
    processor (`load_processor`, decoding images of at most `max_pixels`) and the mask codec for
    `segment` answers (`mask_codec`, else the checkpoint's own, else None).

    dtype is a torch dtype or a DTYPES name. Options are checked before anything slow is read.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    device = parse_device(device)
    if quantize is not None and device.type != "cpu":
        raise UsageError(f"--quantize {quantize} runs on CPU only; drop it or use --device cpu")
    directory = resolve_checkpoint(path)
    codec_file = mask_codec_path(directory, mask_codec)
    codec = load_mask_codec(codec_file) if codec_file is not None else None
    processor = load_processor(directory, max_pixels=max_pixels)
    model = load_model(directory, dtype=dtype, device=device, quantize=quantize, optimize=optimize)
    return model, processor, codec
