"""`paligemma data import`: write fine-tuning JSONL from COCO, YOLO or mask-folder datasets.

    paligemma data import --format coco --annotations instances_val2017.json --images val2017 --out data/val.jsonl
    paligemma data import --format coco --task segment --mask-codec vae-oid.npz --annotations ... --out seg.jsonl
    paligemma data import --format coco-captions --annotations captions_val2017.json --images val2017 --out cap.jsonl
    paligemma data import --format yolo --data-yaml dataset/data.yaml --split val --out data/val.jsonl
    paligemma data import --format masks --images photos --masks masks --label lesion --mask-codec vae-oid.npz \
        --out seg.jsonl

Problems (bad annotations, missing images) are printed, one line each naming the file and the id,
and the rest is written. Documentation: docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from .common import LINK_MODES, ORDERS, PROMPT_CLASSES, TASKS, ImportResult, Writer

FORMATS = ("coco", "coco-captions", "yolo", "masks")
_NEEDS = {"coco": ("annotations", "images"), "coco-captions": ("annotations", "images"), "yolo": ("data_yaml",),
          "masks": ("images", "masks")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    sub = commands.add_parser("import", help="write training JSONL from COCO, YOLO or mask folders",
                              description="Write training JSONL from COCO, YOLO or mask folders (docs/data.md).")
    source = sub.add_argument_group("input")
    source.add_argument("--format", required=True, choices=FORMATS, help="what the input is")
    source.add_argument("--annotations", metavar="FILE", help="coco, coco-captions: the COCO .json")
    source.add_argument("--images", metavar="DIR",
                        help="coco, coco-captions: the folder file_name is relative to; masks: the images")
    source.add_argument("--data-yaml", metavar="FILE", help="yolo: the dataset's data.yaml")
    source.add_argument("--split", default="train", help="yolo: which split of data.yaml (default train)")
    source.add_argument("--masks", metavar="DIR", help="masks: the mask files (or one folder per class)")
    source.add_argument("--label", help="masks: what the masks show, when they are not in one folder per class")
    rows = sub.add_argument_group("rows")
    rows.add_argument("--task", choices=TASKS, help="detect or segment rows (default detect; masks: segment)")
    rows.add_argument("--mask-codec", metavar="FILE",
                      help="segment: the VQ-VAE with an encoder that turns masks into <seg> tokens (vae-oid.npz)")
    rows.add_argument("--classes", choices=PROMPT_CLASSES, default="all",
                      help="one row per image asking for every class (default; images without objects become "
                           "negatives) or for those in the image, or one row per class in the image ('each')")
    rows.add_argument("--order", choices=ORDERS, default="random",
                      help="object order in an answer: random (default, seeded per image), file, raster")
    rows.add_argument("--seed", type=int, default=0, help="seed of --order random (default 0)")
    rows.add_argument("--on-bad", choices=("image", "object"), default="image",
                      help="a bad annotation leaves out its whole image (default) or only itself")
    rows.add_argument("--prompt", default="caption en", help="coco-captions: the prompt (default 'caption en')")
    rows.add_argument("--group-captions", action="store_true",
                      help="coco-captions: one row per image with every caption in a list (evaluation data)")
    output = sub.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="FILE.jsonl", help="the JSONL to write")
    output.add_argument("--images-dir", metavar="DIR", help="where images go (default: images/ next to --out)")
    output.add_argument("--link", choices=LINK_MODES, default="copy",
                        help="copy images (default), hard-link or symlink them, or reference them where they are")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --out and differing images")
    output.add_argument("--problems-file", metavar="FILE", help="write every problem line there too")
    sub.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    missing = [f"--{name.replace('_', '-')}" for name in _NEEDS[args.format] if getattr(args, name) is None]
    if missing:
        raise UsageError(f"--format {args.format} needs {' and '.join(missing)}")
    task = args.task or ("segment" if args.format == "masks" else "detect")
    if args.format == "coco-captions" and args.task:
        raise UsageError("--task is for coco, yolo and masks; coco-captions writes caption rows")
    codec = _codec(args.mask_codec) if task == "segment" and args.format != "coco-captions" else None
    writer = Writer(args.out, args.images_dir, args.link, args.overwrite)
    objects = dict(prompt_classes=args.classes, order=args.order, seed=args.seed, codec=codec, on_bad=args.on_bad)
    if args.format == "coco":
        from .coco import import_coco
        result = import_coco(args.annotations, args.images, writer, task=task, **objects)
    elif args.format == "coco-captions":
        from .coco import import_coco_captions
        result = import_coco_captions(args.annotations, args.images, writer, args.prompt, args.group_captions)
    elif args.format == "yolo":
        from .yolo import import_yolo
        result = import_yolo(args.data_yaml, writer, split=args.split, task=task, **objects)
    else:
        from .masks import import_masks
        result = import_masks(args.images, args.masks, writer, task=task, label=args.label, **objects)
    _report(result, args)
    return 0


def _codec(path: str | None):
    if path is None:
        raise UsageError("segment rows need --mask-codec: a VQ-VAE with an encoder (big_vision's vae-oid.npz, or a "
                         ".safetensors codec such as the demo model's)")
    from ..vqvae import load_mask_codec
    codec = load_mask_codec(path)
    if codec.encoder is None:
        raise UsageError(f"--mask-codec {path} holds only a decoder; making <seg> tokens needs the encoder too")
    return codec


def _report(result: ImportResult, args: argparse.Namespace, shown: int = 20) -> None:
    for line in result.problems[:shown]:
        print(f"problem: {line}", file=sys.stderr)
    if len(result.problems) > shown:
        print(f"... and {len(result.problems) - shown} more problems"
              f"{f' (all in {args.problems_file})' if args.problems_file else ' (--problems-file lists them all)'}",
              file=sys.stderr)
    if args.problems_file:
        Path(args.problems_file).write_text("".join(line + "\n" for line in result.problems), encoding="utf-8")
    notes = f", {len(result.notes)} notes (crowd regions, images without objects)" if result.notes else ""
    print(f"wrote {result.rows} rows ({result.images} images) to {args.out}; {result.skipped_images} images "
          f"skipped, {len(result.problems)} problems{notes}")
