"""The `paligemma` command: plain subcommands over the library's functions.

    paligemma generate --model DIR --image photo.jpg --prompt "detect cat" --json --draw out.png
    paligemma generate --prompt "caption en"            # the bundled demo model and example image

Other subcommands (finetune, serve, demo-eval) live with their code and are registered from
`_PLUGINS` when their module is installed, imported only when chosen. User errors print one `error: ...` line and exit 2;
Ctrl-C exits 130. Documentation: docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

from .config import ConfigError
from .drawing import draw_caption, draw_detections, draw_masks
from .generation import generate_detailed, stream_generate
from .hub import CheckpointError, resolve_checkpoint
from .images import ImageError, load_image
from .processor import load_processor
from .sampling import SamplingParams
from .segmentation import parse_segmentations
from .tasks import parse_detections, prompt_task
from .tokenizer import TokenizerError
from .vqvae import MASK_CODEC_FILE
from .loading import load_model

PACKAGE_DIR = Path(__file__).parent
DEMO_MODEL_DIR = PACKAGE_DIR / "demo_model"
EXAMPLE_IMAGE = PACKAGE_DIR / "assets" / "example.png"

EXIT_USER_ERROR = 2  # bad arguments, files, checkpoints, images (argparse uses 2 as well)
EXIT_BUG = 1  # anything unexpected: printed with its traceback
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# Subcommands owned by other modules, each exposing add_arguments(parser) and run(args) -> int.
_PLUGINS = [
    ("finetune", "paligemma.finetune.cli", "fine-tune a checkpoint on your data"),
    ("serve", "paligemma.server.cli", "serve a model over HTTP"),
    ("demo-eval", "paligemma.demo.cli", "evaluate a model on the demo shapes world"),
]

# ValueError covers CheckpointError, ConfigError, ImageError, TokenizerError and bad settings;
# OSError covers missing and unreadable files.
_USER_ERRORS = (CheckpointError, ConfigError, ImageError, TokenizerError, ValueError, OSError)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.run(args) or 0)
    except SystemExit as exit_:  # --help, argparse's usage errors (2), a subcommand's sys.exit
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        traceback.print_exc()
        print("error: unexpected failure (the traceback above is a bug report)", file=sys.stderr)
        return EXIT_BUG


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`. Only the plugin `argv` names is imported (finetune alone pulls in
    torch.distributed, a second of start-up); the others are listed when their module file exists."""
    parser = argparse.ArgumentParser(prog="paligemma", description="PaliGemma from scratch in PyTorch.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(subcommands.add_parser("generate", help="answer a prompt about an image",
                                         description="Answer a prompt about an image."))
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, module_name, help_text in _PLUGINS:
        if name == chosen:
            _add_plugin(subcommands, name, module_name, help_text)
        elif (PACKAGE_DIR.parent / module_name.replace(".", "/")).with_suffix(".py").is_file():
            subcommands.add_parser(name, help=help_text)  # a listing only: never parsed
    return parser


def _add_plugin(subcommands, name: str, module_name: str, help_text: str) -> None:
    """Register subcommand `name` from `module_name`: absent when that module does not exist,
    a one-line error (ValueError) when it exists but one of its own imports fails."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if isinstance(err, ModuleNotFoundError) and missing and (module_name + ".").startswith(missing + "."):
            return
        raise ValueError(f"paligemma {name} is unavailable: {err}") from None
    sub = subcommands.add_parser(name, help=help_text, description=help_text)
    module.add_arguments(sub)
    sub.set_defaults(run=module.run)


# ---------------------------------------------------------------------- generate

def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hub repo id (default: the bundled demo model)")
    parser.add_argument("--image", help="image file (default with the demo model: its example image)")
    parser.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en" or "detect cat ; dog"')
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop when the answer contains STR (cut off; repeatable)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="weight-only quantization of the decoder and LM head at load time (CPU)")
    add_optimize_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object (see docs/cli.md)")
    output.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--draw", metavar="OUT.png",
                        help="write the image with the detected boxes or segment masks, or the answer text below it")
    parser.add_argument("--mask-codec", metavar="FILE",
                        help="VQ-VAE for segment answers: big_vision's vae-oid.npz or a .safetensors codec "
                             f"(default: the checkpoint's {MASK_CODEC_FILE}, if it has one)")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """`paligemma generate`: one image, one prompt, the answer on stdout."""
    # Settings are checked before the (slow) model load.
    SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    device = _device(args.device)
    if args.draw:
        _check_draw_path(Path(args.draw))
    model_dir, image_path = _model_and_image(args.model, args.image)
    image = Image.fromarray(load_image(image_path))  # upright RGB; its size is what boxes map back to

    task = prompt_task(args.prompt)
    start = time.perf_counter()
    directory = resolve_checkpoint(model_dir)
    codec = _mask_codec(args.mask_codec, directory) if task == "segment" else None  # before the slow part
    processor = load_processor(directory)
    model = load_model(directory, dtype=_DTYPES.get(args.dtype), device=device, quantize=args.quantize,
                       optimize=not args.no_optimize)
    load_seconds = time.perf_counter() - start

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop)
    if args.stream:
        for event in stream_generate(model, processor, [image], [args.prompt], **options):
            print(event.text, end="", flush=True)
            result = event.result  # set on the last event
        print()
    else:
        result = generate_detailed(model, processor, [image], [args.prompt], **options)[0]

    detections = parse_detections(result.text, image.size) if task == "detect" else None
    segments = parse_segmentations(result.text, image.size, codec) if codec is not None else None
    if args.json:
        record = {"text": result.text, "tokens": result.token_ids, "finish_reason": result.finish_reason,
                  "prompt_tokens": result.prompt_tokens, "timings": {"load": load_seconds, **result.timings},
                  "image_size": list(image.size)}
        if detections is not None:
            record["detections"] = [{"label": d.label, "box": d.box} for d in detections.objects]
            record["detection_errors"] = detections.errors
        if segments is not None:
            record["segmentations"] = [o.as_json() for o in segments.objects]
            record["segmentation_errors"] = segments.errors
        print(json.dumps(record))
    elif not args.stream:
        print(result.text)
    if args.draw:
        if detections is not None:
            draw_detections(image, detections.objects, args.draw)
        elif segments is not None:
            draw_masks(image, segments.objects, args.draw)
        else:
            draw_caption(image, result.text, args.draw)
    return 0


def add_optimize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-optimize", action="store_true",
                        help="load the model as trained instead of rewritten for inference (fused, prepacked "
                             "matrices and the bf16 decode kernel; see paligemma/inference.py)")


def _mask_codec(codec_path: str | None, model_dir: Path):
    """The VQ-VAE that decodes `segment` answers: --mask-codec, else the checkpoint's own codec."""
    from .vqvae import load_mask_codec

    path = Path(codec_path) if codec_path else Path(model_dir) / MASK_CODEC_FILE
    if not path.is_file():
        raise ValueError(f"a segment answer needs a mask codec to decode: pass --mask-codec (e.g. big_vision's "
                         f"vae-oid.npz); {path} does not exist")
    return load_mask_codec(path)


def _model_and_image(model: str | None, image: str | None) -> tuple[str | Path, str | Path]:
    """--model and --image, defaulting to the bundled demo model and its example image."""
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ValueError(f"no --model given and the bundled demo model is not installed ({DEMO_MODEL_DIR}); "
                             "pass --model with a checkpoint directory or Hub repo id")
        model = DEMO_MODEL_DIR
        if image is None:
            if not EXAMPLE_IMAGE.is_file():
                raise ValueError(f"no --image given and the example image {EXAMPLE_IMAGE} is missing; pass --image")
            image = EXAMPLE_IMAGE
    if image is None:
        raise ValueError("--image is required with --model")
    return model, image


def _check_draw_path(path: Path) -> None:
    """Fail before generating, not after, on an output path Pillow could not write."""
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--draw {path}: unknown image extension {path.suffix!r} (use .png or .jpg)")
    if not path.parent.is_dir():
        raise ValueError(f"--draw {path}: directory {path.parent} does not exist")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _one_line(err: BaseException) -> str:
    """The error's message on one line (OSError's str already names the file)."""
    return " ".join(str(err).split()) or type(err).__name__
