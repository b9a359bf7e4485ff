"""The `paligemma` command: plain subcommands over the library's functions.

    paligemma generate --model DIR --image photo.jpg --prompt "detect cat" --json --draw out.png
    paligemma generate --prompt "caption en"            # the bundled demo model and example image

Other subcommands (finetune, serve, demo-eval) live with their code and are registered from
`_PLUGINS` when their module is installed, imported only when chosen. Every command loads its model
through `cli_common.load`. User errors (`PaliGemmaError`, unreadable files) print one `error: ...`
line and exit 2; anything else is a bug: traceback, exit 1. Ctrl-C exits 130. Documentation: docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from PIL import Image

from .cli_common import (
    EXAMPLE_IMAGE,
    PACKAGE_DIR,
    add_mask_codec_argument,
    add_model_arguments,
    checkpoint_dir,
    load,
    mask_codec_path,
    parse_device,
)
from .drawing import draw_caption, draw_detections, draw_masks
from .errors import PaliGemmaError, UsageError
from .generation import generate_detailed, stream_generate
from .images import load_image
from .sampling import SamplingParams
from .segmentation import parse_segmentations
from .tasks import filter_detections, parse_detections, prompt_task
from .visualize import answer_attention, check_figure_path, plot_answer_attention, plot_token_attention
from .vqvae import MASK_CODEC_FILE

EXIT_USER_ERROR = 2  # bad arguments, files, checkpoints, images (argparse uses 2 as well)
EXIT_BUG = 1  # anything unexpected: printed with its traceback
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# Subcommands owned by other modules, each exposing add_arguments(parser) and run(args) -> int.
_PLUGINS = [
    ("finetune", "paligemma.finetune.cli", "fine-tune a checkpoint on your data"),
    ("serve", "paligemma.server.cli", "serve a model over HTTP"),
    ("demo-eval", "paligemma.demo.cli", "evaluate a model on the demo shapes world"),
    ("eval", "paligemma.evaluation.cli", "score a model on a JSONL set with its task's metric (CIDEr, mAP, ...)"),
    ("convert", "paligemma.convert_cli", "convert big_vision .npz checkpoints to and from HF folders"),
    ("quantize", "paligemma.quantize_cli", "write a quantized (int8/int4) checkpoint, loaded as a memory map"),
    ("data", "paligemma.data_import.cli", "import COCO, YOLO or mask-folder datasets as training JSONL"),
    ("batch", "paligemma.batch_cli", "answer a dataset (JSONL or a folder), resumable, sharded under torchrun"),
]

# PaliGemmaError: bad settings, checkpoints, images, data (paligemma/errors.py); OSError: files that
# are missing, unreadable or cannot be written. Anything else is a bug.
_USER_ERRORS = (PaliGemmaError, OSError)


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
    a one-line error (UsageError) when it exists but one of its own imports fails."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if isinstance(err, ModuleNotFoundError) and missing and (module_name + ".").startswith(missing + "."):
            return
        raise UsageError(f"paligemma {name} is unavailable: {err}") from None
    sub = subcommands.add_parser(name, help=help_text, description=help_text)
    module.add_arguments(sub)
    sub.set_defaults(run=module.run)


# ---------------------------------------------------------------------- generate

def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", help="image file (default with the demo model: its example image)")
    parser.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en" or "detect cat ; dog"')
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop when the answer contains STR (cut off; repeatable)")
    _add_decoding_arguments(parser.add_argument_group("decoding (docs/decoding.md)"))
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object (see docs/cli.md)")
    output.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--draw", metavar="OUT.png",
                        help="write the image with the detected boxes or segment masks, or the answer text below it")
    parser.add_argument("--attention-map", metavar="OUT.png",
                        help="write where each answer token looked in the image: a row per decoder layer, a column "
                             "per token, heads averaged (needs matplotlib; docs/tour.md)")
    parser.add_argument("--attention-token", type=int, metavar="I",
                        help="with --attention-map: answer token I's map in every layer and head instead")
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    add_mask_codec_argument(model)
    parser.set_defaults(run=run_generate)


def _add_decoding_arguments(group) -> None:
    group.add_argument("--num-beams", type=int, default=1, metavar="K",
                       help="beam search with K beams (default 1: off)")
    group.add_argument("--length-penalty", type=float, default=1.0,
                       help="beam search: scores are divided by length ** this (default 1)")
    group.add_argument("--early-stopping", choices=("false", "true", "never"), default="false",
                       help="beam search stopping rule, as transformers' early_stopping (default false)")
    group.add_argument("--best-of", type=int, metavar="N", help="sample N answers, print the most likely one")
    group.add_argument("--constrain", action="store_true",
                       help="detect/segment prompts: only well-formed answers with the prompt's labels")
    group.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                       help="--json: the N most likely tokens at each step")
    group.add_argument("--min-score", type=float, metavar="S", help="detect: drop boxes scoring below S (0..1)")
    group.add_argument("--nms-iou", type=float, metavar="T",
                       help="detect: per label, drop a box overlapping a better one with IoU > T")


def _check_decoding(args: argparse.Namespace, task: str) -> None:
    """Decoding options that cannot work together, refused before the model loads."""
    if args.num_beams < 1 or args.top_logprobs < 0 or (args.best_of is not None and args.best_of < 1):
        raise UsageError("--num-beams and --best-of take an integer >= 1, --top-logprobs one >= 0")
    if args.best_of and args.temperature == 0:
        raise UsageError("--best-of draws several answers: it needs --temperature > 0")
    for name in ("min_score", "nms_iou"):
        value = getattr(args, name)
        if value is not None and (task != "detect" or not 0 <= value <= 1):
            raise UsageError(f"--{name.replace('_', '-')} takes a value in [0, 1] and applies to detect prompts")
    if args.stream and (args.num_beams > 1 or args.best_of):
        raise UsageError("--stream cannot show beam search or --best-of: they choose the answer at the end")
    if args.top_logprobs and not args.json:
        raise UsageError("--top-logprobs is printed with --json")
    if args.constrain and task not in ("detect", "segment"):
        raise UsageError("--constrain applies to detect and segment prompts")


def _decoding_options(args: argparse.Namespace) -> dict:
    """generate_detailed's keyword arguments for the decoding options that are set."""
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop, constrain=args.constrain)
    if args.top_logprobs:
        options["top_logprobs"] = args.top_logprobs
    if args.num_beams > 1:
        early_stopping = {"false": False, "true": True, "never": "never"}[args.early_stopping]
        options.update(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=early_stopping)
    if args.best_of:
        options["best_of"] = args.best_of
    return options


def _token_records(result, tokenizer) -> dict:
    """--json: each token's log-prob and, when asked, its best alternatives."""
    record = {"logprobs": result.logprobs}
    if result.top_logprobs is not None:
        record["top_logprobs"] = [[{"id": t, "token": tokenizer.id_to_piece(t), "logprob": lp} for t, lp in step]
                                  for step in result.top_logprobs]
    if result.beam_score is not None:
        record["beam_score"] = result.beam_score
    return record


def run_generate(args: argparse.Namespace) -> int:
    """`paligemma generate`: one image, one prompt, the answer on stdout."""
    # Settings are checked before the (slow) model load.
    SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    parse_device(args.device)
    if args.draw:
        _check_draw_path(Path(args.draw))
    if args.attention_token is not None and not args.attention_map:
        raise UsageError("--attention-token needs --attention-map OUT.png")
    if args.attention_map:
        check_figure_path(args.attention_map)  # matplotlib present, format known, no file overwritten
    task = prompt_task(args.prompt)
    _check_decoding(args, task)
    image = Image.fromarray(load_image(_image(args.model, args.image)))  # upright RGB; boxes map back to its size

    start = time.perf_counter()
    directory = checkpoint_dir(args.model)
    if task == "segment" and mask_codec_path(directory, args.mask_codec) is None:
        raise UsageError(f"a segment answer needs a mask codec to decode and {directory} has no {MASK_CODEC_FILE}: "
                         "pass --mask-codec (e.g. big_vision's vae-oid.npz)")
    model, processor, codec = load(directory, args.dtype, args.device, optimize=not args.no_optimize,
                                   quantize=args.quantize, mask_codec=args.mask_codec)
    load_seconds = time.perf_counter() - start

    options = _decoding_options(args)
    if args.stream:
        for event in stream_generate(model, processor, [image], [args.prompt], **options):
            print(event.text, end="", flush=True)
            result = event.result  # set on the last event
        print()
    else:
        result = generate_detailed(model, processor, [image], [args.prompt], **options)[0]

    spans = result.token_spans()
    detections = parse_detections(result.text, image.size, spans) if task == "detect" else None
    if detections is not None:
        detections.objects = filter_detections(detections.objects, args.min_score, args.nms_iou)
    segments = parse_segmentations(result.text, image.size, codec, spans) if task == "segment" else None
    if args.json:
        record = {"text": result.text, "tokens": result.token_ids, "finish_reason": result.finish_reason,
                  "prompt_tokens": result.prompt_tokens, "timings": {"load": load_seconds, **result.timings},
                  "image_size": list(image.size), **_token_records(result, processor.tokenizer)}
        if detections is not None:
            record["detections"] = [d.as_json() for d in detections.objects]
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
    if args.attention_map:
        attention = answer_attention(model, processor, image, args.prompt, result.token_ids)
        if args.attention_token is None:
            plot_answer_attention(image, attention, args.attention_map)
        else:
            plot_token_attention(image, attention, args.attention_token, args.attention_map)
    return 0


def _image(model: str | None, image: str | None) -> str | Path:
    """--image, defaulting to the example image when the model is the bundled demo model."""
    if image is not None:
        return image
    if model is not None:
        raise UsageError("--image is required with --model")
    checkpoint_dir(None)  # the demo model must be there (a clearer error than a missing image)
    if not EXAMPLE_IMAGE.is_file():
        raise UsageError(f"no --image given and the example image {EXAMPLE_IMAGE} is missing; pass --image")
    return EXAMPLE_IMAGE


def _check_draw_path(path: Path) -> None:
    """Fail before generating, not after, on an output path Pillow could not write."""
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--draw {path}: unknown image extension {path.suffix!r} (use .png or .jpg)")
    if not path.parent.is_dir():
        raise UsageError(f"--draw {path}: directory {path.parent} does not exist")


def _one_line(err: BaseException) -> str:
    """The error's message on one line (OSError's str already names the file)."""
    return " ".join(str(err).split()) or type(err).__name__
