"""Train the demo's mask codec: a small big_vision VQ-VAE on the masks of shapes-world objects.

    OMP_NUM_THREADS=1 python -m paligemma.demo.train_mask_codec --out paligemma/demo_model/mask_codec.safetensors

The codec has big_vision's architecture (`paligemma.vqvae`) with fewer channels, since it only has
to tell apart three shapes: the file is about 0.5 MB. Its training data is what a `segment` answer
encodes: each object of the training scenes (seeds TRAIN_SEED0...) cropped to its box and resized to
64x64 (`segmentation.mask_to_64`). Reconstruction is scored on objects of held-out scenes (seeds
EVAL_SEED0...) the way an answer is read back: encode, decode, resize into the object's box and
threshold at 0 (`segmentation.mask_in_box`), then IoU with the drawn mask; and a second time through
the whole answer text (`scenes.segment_answer` -> `parse_segmentations`), whose box has gone through
the 1024 location bins. Everything is seeded and runs on one thread, so the same command gives the
same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..segmentation import mask_in_box, mask_to_64, parse_segmentations
from ..vqvae import MaskCodec, MaskCodecConfig, fit_mask_codec, save_mask_codec
from .recipe import EVAL_SEED0, SCENE_SIZE, TRAIN_SEED0
from .scenes import SHAPES, generate_scene, mask_iou, segment_answer

# big_vision's layers, narrower: codebook 128 x 32, decoder 32 -> 32, 16, 8, 4 channels.
CODEC_CONFIG = MaskCodecConfig(num_codes=128, embed_dim=32, hidden=32, encoder_channels=(8, 16, 32, 32))


def object_masks(seeds, size: int = SCENE_SIZE) -> tuple[list[str], np.ndarray]:
    """(shape of each object, (N, 64, 64) float32 in-box masks) for every object of the scenes `seeds`."""
    shapes, masks = [], []
    for seed in seeds:
        for obj in generate_scene(seed, size).objects:
            shapes.append(obj.shape)
            masks.append(mask_to_64(obj.mask, obj.box))
    return shapes, np.stack(masks)


def train_codec(num_scenes: int = 2000, steps: int = 2000, batch_size: int = 32, lr: float = 3e-3,
                seed: int = 0, config: MaskCodecConfig = CODEC_CONFIG) -> tuple[MaskCodec, list[float]]:
    """A codec trained by `fit_mask_codec` on the objects of `num_scenes` training scenes; (codec, losses)."""
    _, masks = object_masks(range(TRAIN_SEED0, TRAIN_SEED0 + num_scenes))
    torch.manual_seed(seed)
    codec = MaskCodec(config)
    losses = fit_mask_codec(codec, torch.from_numpy(masks), steps=steps, batch_size=batch_size, lr=lr,
                            generator=torch.Generator().manual_seed(seed))
    return codec, losses


@torch.no_grad()
def reconstruction_iou(codec: MaskCodec, num_scenes: int = 500, seed0: int = EVAL_SEED0,
                       size: int = SCENE_SIZE) -> dict[str, dict[str, float]]:
    """Mean mask IoU per shape (and "all") of held-out objects read back from their codes.

    "box": the decoded mask resized into the object's exact box; "answer": through the answer text
    (box rounded to location bins, then parsed), which is the best a model answering with these codes
    can reach. Keys: {"box": {shape: IoU, ..., "all": IoU}, "answer": {...}, "objects": {shape: n}}.
    """
    scores: dict[str, dict[str, list[float]]] = {"box": {}, "answer": {}}
    for seed in range(seed0, seed0 + num_scenes):
        scene = generate_scene(seed, size)
        codes = codec.encode(np.stack([mask_to_64(o.mask, o.box) for o in scene.objects]))
        decoded = codec.decode(codes).numpy()
        for obj, mask64 in zip(scene.objects, decoded):
            scores["box"].setdefault(obj.shape, []).append(mask_iou(mask_in_box(mask64, obj.box, (size, size)),
                                                                    obj.mask))
        for shape in SHAPES:
            truth = [o for o in scene.objects if o.shape == shape]
            if not truth:
                continue
            parsed = parse_segmentations(segment_answer(scene, shape, codec), (size, size), codec)
            if parsed.errors or len(parsed.objects) != len(truth):
                raise RuntimeError(f"scene {seed}: the segment answer did not parse back: {parsed.errors}")
            # The answer lists the objects in canonical order, like `truth`.
            scores["answer"].setdefault(shape, []).extend(
                mask_iou(p.mask, o.mask) for p, o in zip(parsed.objects, truth))
    result: dict[str, dict[str, float]] = {"objects": {s: len(v) for s, v in scores["box"].items()}}
    for kind, per_shape in scores.items():
        result[kind] = {s: float(np.mean(per_shape[s])) for s in SHAPES if s in per_shape}
        result[kind]["all"] = float(np.mean([v for values in per_shape.values() for v in values]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.demo.train_mask_codec",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the codec (.safetensors)")
    parser.add_argument("--train-scenes", type=int, default=2000, help="training scenes (default 2000)")
    parser.add_argument("--eval-scenes", type=int, default=500, help="held-out scenes scored (default 500)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error("--out must end with .safetensors")

    torch.set_num_threads(1)  # the same arithmetic, so the same weights, on any machine with this torch
    started = time.perf_counter()
    codec, losses = train_codec(args.train_scenes, args.steps, args.batch_size, args.lr, args.seed)
    train_seconds = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_mask_codec(codec, args.out)
    scores = reconstruction_iou(codec, args.eval_scenes)
    print(json.dumps({"out": args.out, "bytes": os.path.getsize(args.out),
                      "parameters": sum(p.numel() for p in codec.parameters()),
                      "train_seconds": round(train_seconds), "final_loss": round(float(np.mean(losses[-50:])), 5),
                      "reconstruction_iou": {k: {s: round(v, 4) for s, v in d.items()} if k != "objects" else d
                                             for k, d in scores.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
