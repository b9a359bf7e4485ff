"""`paligemma convert`: big_vision .npz checkpoints <-> Hugging Face checkpoint folders.

    paligemma convert --from npz --to hf --input paligemma2-3b-pt-224.b16.npz --config paligemma2-3b-224 \\
        --tokenizer paligemma_tokenizer.model --out paligemma2-3b-pt-224-hf
    paligemma convert --from hf --to npz --input runs/shapes/final --out shapes.npz

The key mapping is paligemma/bigvision_npz.py's; documentation: docs/data.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from .bigvision_npz import save_npz
from .checkpoint_layout import refuse_quantized
from .config import PaliGemmaConfig
from .errors import UsageError
from .hub import resolve_checkpoint
from .loading import load_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", choices=["npz", "hf"], required=True, help="input format")
    parser.add_argument("--to", dest="target", choices=["npz", "hf"], required=True, help="output format")
    parser.add_argument("--input", required=True,
                        help="a big_vision .npz file, or a checkpoint folder (HF layout) / Hub repo id")
    parser.add_argument("--out", required=True, help="the .npz file, or the checkpoint folder, to write")
    parser.add_argument("--config", metavar="PRESET|config.json",
                        help="what an .npz holds (it has no config): a preset like paligemma-3b-224 or "
                             "paligemma2-10b-448 (paligemma.PRESETS), or a config.json")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="--to hf: a SentencePiece tokenizer.model to copy into the folder (big_vision's "
                             "paligemma_tokenizer.model), so that the folder is complete")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="convert the weights (default: keep the input's)")
    parser.add_argument("--vocab-size", type=int,
                        help="--to npz: embedding rows to write (default: at most big_vision's 257152)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.source == args.target:
        raise UsageError(f"--from and --to are both {args.source}: nothing to convert")
    out = Path(args.out)
    if args.target == "npz" and (args.tokenizer or args.config):
        raise UsageError("--tokenizer and --config are for .npz input (--from npz --to hf)")
    if args.source == "npz" and args.config is None:
        raise UsageError("an .npz holds no config: pass --config PRESET (e.g. paligemma-3b-224) or --config "
                         "config.json")
    if args.source == "npz" and not args.input.endswith(".npz"):
        raise UsageError(f"--from npz: --input {args.input} is not an .npz file")
    if args.target == "npz" and out.suffix != ".npz":
        raise UsageError(f"--out {out}: a big_vision checkpoint file name ends in .npz")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise UsageError(f"--tokenizer {args.tokenizer} does not exist")
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out")

    dtype = _DTYPES.get(args.dtype)
    if args.source == "npz":
        model = load_model(args.input, dtype=dtype, config=args.config)
        model.save_pretrained(out)
        if args.tokenizer:
            shutil.copyfile(args.tokenizer, out / "tokenizer.model")
        print(f"wrote {out} (config.json, model.safetensors{', tokenizer.model' if args.tokenizer else ''})")
    else:
        directory = resolve_checkpoint(args.input)
        refuse_quantized(PaliGemmaConfig.from_json_file(directory / "config.json"), directory)  # .npz holds floats
        model = load_model(directory, dtype=dtype)
        save_npz(model, out, vocab_size=args.vocab_size, overwrite=args.overwrite)
        print(f"wrote {out}")
    return 0
