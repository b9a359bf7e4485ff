"""Train the demo model from scratch on fresh shapes-world scenes, with the library's own trainer.

    python -m paligemma.demo.train --out runs/demo --steps 5000

Every training example is a new scene (seeds TRAIN_SEED0, TRAIN_SEED0 + 1, ...), generated when the
batch is built, so the model never sees a scene twice and the data costs no disk. Everything is
seeded: the same command gives the same model. `python -m paligemma.demo.train --help` lists the
knobs; the bundled model's exact command is in its model card (paligemma/demo_model/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping

from ..cli_common import DEMO_MASK_CODEC, add_device_argument, load, parse_device
from ..finetune.data import Example, FinetuneDataset
from ..finetune.trainer import TrainConfig, train
from ..vqvae import MASK_CODEC_FILE, MaskCodec, load_mask_codec
from .recipe import EVAL_SEED0, SCENE_SIZE, TRAIN_SEED0, create_initial_checkpoint
from .scenes import MULTICLASS_TASK_MIX, sample_example


class SceneDataset(FinetuneDataset):
    """`length` examples drawn by `sample_example(seed0 + i, codec=codec, mix=mix, side_by_side=...)`, each
    made when it is indexed (with a mask codec the default mix includes `segment`: scenes.SEGMENT_TASK_MIX).

    A `FinetuneDataset` by its contract, `len` and indexing (what `train` and `evaluate` use), with
    no stored rows."""

    def __init__(self, length: int, seed0: int, codec: MaskCodec | None = None,
                 mix: Mapping[str, float] | None = None, side_by_side: float = 0.0):
        super().__init__(())
        self.length, self.seed0, self.codec, self.mix, self.side_by_side = length, seed0, codec, mix, side_by_side

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, prefix, suffix = sample_example(self.seed0 + index, SCENE_SIZE, codec=self.codec, mix=self.mix,
                                               side_by_side=self.side_by_side)
        return Example(image, prefix, suffix, where=f"scene {self.seed0 + index}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run directory (init/, checkpoints, final/, metrics.jsonl)")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--init", help="start from this checkpoint instead of fresh weights")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an existing --out (deletes the trainer's files there; --init is kept)")
    add_device_argument(parser)
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes drawing the scenes (0: in the training process)")
    parser.add_argument("--vision-init", type=Path,
                        help="start the vision tower from this vision_tower.safetensors (written by "
                             "python -m paligemma.demo.pretrain_vision) instead of random weights")
    parser.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed")
    parser.add_argument("--first-scene", type=int, default=0,
                        help="training scenes are seeds TRAIN_SEED0 + first_scene onwards; a continued run "
                             "passes the count its predecessors used, so no scene is seen twice")
    parser.add_argument("--segment", action="store_true",
                        help="add `segment {shape}` examples (scenes.SEGMENT_TASK_MIX), coded with the bundled "
                             "mask codec, which is copied into the checkpoints")
    parser.add_argument("--multiclass", action="store_true",
                        help="also multi-class prompts, `detect A ; B [; C]` and `segment A ; B` "
                             "(scenes.MULTICLASS_TASK_MIX); implies --segment")
    parser.add_argument("--side-by-side", type=float, default=0.0, metavar="SHARE",
                        help="with --multiclass: this share (0..1) of the multi-class examples get a scene with "
                             "different shapes one above the other (scenes.side_by_side_shapes; default 0)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.side_by_side <= 1.0 or (args.side_by_side and not args.multiclass):
        parser.error("--side-by-side takes a share between 0 and 1, and goes with --multiclass")
    args.segment = args.segment or args.multiclass
    mix = MULTICLASS_TASK_MIX if args.multiclass else None

    out = Path(args.out)
    init = Path(args.init) if args.init else out / "init"
    if not args.init and not (init / "config.json").exists():
        create_initial_checkpoint(init, seed=args.seed, vision_tower=args.vision_init)
    elif args.vision_init:
        raise SystemExit("--vision-init only applies to a fresh start (no --init, no existing init/)")
    model, processor, _ = load(init)  # the mask codec, if any, is chosen below
    codec, extra_files = None, ()
    if args.segment:
        codec = load_mask_codec(DEMO_MASK_CODEC)
        if not (init / MASK_CODEC_FILE).exists():  # checkpoints copy the init folder's; give them the bundled one
            extra_files = (str(DEMO_MASK_CODEC),)
    config = TrainConfig(
        out_dir=str(out), model_dir=str(init), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        warmup_steps=args.warmup_steps, min_lr_ratio=0.05, weight_decay=args.weight_decay, max_grad_norm=1.0,
        bf16=True, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every, log_every=10,
        resume=args.resume, overwrite=args.overwrite, eval_batch_size=64,
        device=str(parse_device(args.device)), num_workers=args.num_workers,
        freeze=("vision",) if args.freeze_vision else (), extra_files=extra_files,
    )
    train_data = SceneDataset(args.steps * args.batch_size, TRAIN_SEED0 + args.first_scene, codec, mix,
                              args.side_by_side)
    # A small exact-match probe during training; the real scores come from `paligemma demo-eval`.
    eval_data = [sample_example(EVAL_SEED0 + 10**6 + i, SCENE_SIZE, codec=codec, mix=mix) for i in range(64)]
    summary = train(model, processor, train_data, config, eval_data=eval_data)
    scores = [{k: v for k, v in e.items() if not isinstance(v, (list, dict))} for e in summary.evals]
    print(json.dumps({"final_loss": summary.final_loss, "evals": scores, "final_dir": summary.final_dir,
                      "elapsed_s": round(summary.elapsed)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
