"""Pretrain a SigLIP vision tower contrastively on shapes-world image/caption pairs.

    python -m paligemma.demo.pretrain_vision --out runs/tower --loss sigmoid --batch-size 64 --steps 1500

Each step draws `batch_size` fresh scenes (seeds from PRETRAIN_SEED0 on, disjoint from the
PaliGemma training and evaluation seeds) and pairs each image with its caption. Evaluation, on
held-out scenes:

- zero-shot classification: scenes with exactly one object, classified among the 18 captions
  "a {color} {shape}" by embedding similarity (also scored for the shape and the colour alone);
- retrieval: recall@1 image->text and text->image among `eval_scenes` held-out pairs.

Writes `out/dual_encoder.safetensors` + `out/dual_encoder.json`, `out/vision_tower.safetensors`
(PaliGemma's `vision_tower.*` names, for `python -m paligemma.demo.train --vision-init`) and
`out/metrics.jsonl`. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..cli_common import DEMO_TOKENIZER
from ..config import VisionConfig
from ..contrastive import (
    LOSS_KINDS,
    DualEncoder,
    DualEncoderConfig,
    TextTowerConfig,
    pad_texts,
    retrieval_recall_at_1,
    zero_shot_predictions,
)
from ..finetune.schedule import build_optimizer, lr_at, set_lr
from ..images import ImageProcessor
from ..tokenizer import Tokenizer
from .recipe import DEMO_IMAGE_SIZE, EVAL_SEED0, SCENE_SIZE, demo_vision_config
from .scenes import COLORS, SHAPES, caption, generate_scene, noun_phrase

PRETRAIN_SEED0 = 5 * 10**8
EVAL_SCENE_SEED0 = EVAL_SEED0 + 2 * 10**6  # held out, and apart from demo-eval's scenes


@dataclass
class PairEncoder:
    """Turns scenes into model inputs: pixels through the demo's image processing, captions to ids + eos."""

    image_processor: ImageProcessor
    tokenizer: Tokenizer

    def pixels(self, images) -> torch.Tensor:
        return self.image_processor(images).pixel_values

    def texts(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tokenizer.encode(s, add_eos=True) for s in sentences]
        return pad_texts(ids, self.tokenizer.pad_id)


def scene_batch(seeds: range, encoder: PairEncoder,
                scene_size: int = SCENE_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    scenes = [generate_scene(seed, scene_size) for seed in seeds]
    captions = [caption(scene) for scene in scenes]
    ids, mask = encoder.texts(captions)
    return encoder.pixels([s.image for s in scenes]), ids, mask, captions


@torch.no_grad()
def evaluate(model: DualEncoder, encoder: PairEncoder, num_scenes: int = 500, batch_size: int = 100,
             scene_size: int = SCENE_SIZE) -> dict:
    """Zero-shot classification of one-object scenes and retrieval recall@1 on `num_scenes` held-out scenes."""
    model.eval()
    image_embeds, text_embeds, captions = [], [], []
    for start in range(0, num_scenes, batch_size):
        seeds = range(EVAL_SCENE_SEED0 + start, EVAL_SCENE_SEED0 + min(start + batch_size, num_scenes))
        pixels, ids, mask, batch_captions = scene_batch(seeds, encoder, scene_size)
        image_embeds.append(model.encode_images(pixels))
        text_embeds.append(model.encode_texts(ids, mask))
        captions += batch_captions
    image_embeds, text_embeds = torch.cat(image_embeds), torch.cat(text_embeds)
    image_to_text, text_to_image = retrieval_recall_at_1(image_embeds, text_embeds, captions)

    # Zero-shot: the one-object scenes among the held-out ones, against all 18 one-object captions.
    classes = [(color, shape) for color in COLORS for shape in SHAPES]
    class_embeds = model.encode_texts(*encoder.texts([noun_phrase(c, s) for c, s in classes]))
    prompts = {noun_phrase(c, s): i for i, (c, s) in enumerate(classes)}
    single = [i for i, text in enumerate(captions) if text in prompts]
    predicted = zero_shot_predictions(image_embeds[single], class_embeds)
    truth = [classes[prompts[captions[i]]] for i in single]
    guess = [classes[p] for p in predicted]
    model.train()
    return {
        "zero_shot_accuracy": sum(g == t for g, t in zip(guess, truth)) / len(single),
        "zero_shot_shape_accuracy": sum(g[1] == t[1] for g, t in zip(guess, truth)) / len(single),
        "zero_shot_color_accuracy": sum(g[0] == t[0] for g, t in zip(guess, truth)) / len(single),
        "zero_shot_scenes": len(single),
        "image_to_text_r1": image_to_text, "text_to_image_r1": text_to_image, "retrieval_scenes": num_scenes,
    }


def build_model(loss: str, tokenizer: Tokenizer, seed: int, vision: VisionConfig) -> DualEncoder:
    torch.manual_seed(seed)
    text = TextTowerConfig(vocab_size=tokenizer.vocab_size)
    return DualEncoder(DualEncoderConfig(vision=vision, text=text, embed_dim=128, loss=loss))


def pretrain(out: Path, loss: str = "sigmoid", batch_size: int = 64, steps: int = 1500, lr: float = 1e-3,
             warmup_steps: int = 100, weight_decay: float = 1e-4, seed: int = 0, eval_every: int = 250,
             eval_scenes: int = 500, vision: VisionConfig | None = None, scene_size: int = SCENE_SIZE,
             log=print) -> dict:
    """Train a dual encoder from scratch and write it (see the module docstring); returns the last evaluation.

    `vision`: the tower to train (default: the demo model's, so the result can initialise it).
    `scene_size`: the side scenes are drawn at before the processor resizes them to the tower's
    input (the demo draws at 224; a small experiment can draw at its tower's size, much faster).
    """
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(DEMO_TOKENIZER)
    model = build_model(loss, tokenizer, seed, vision or demo_vision_config())
    encoder = PairEncoder(ImageProcessor(height=model.config.vision.image_size,
                                         width=model.config.vision.image_size), tokenizer)
    optimizer = build_optimizer(model, lr, weight_decay)
    started = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as metrics:
        def record(row: dict) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            log(json.dumps(row))

        for step in range(steps):
            set_lr(optimizer, lr_at(step, lr, steps, warmup_steps, min_lr_ratio=0.05))
            first = PRETRAIN_SEED0 + step * batch_size
            pixels, ids, mask, _ = scene_batch(range(first, first + batch_size), encoder, scene_size)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                image_embeds, text_embeds = model.encode_images(pixels), model.encode_texts(ids, mask)
            value = model.loss(image_embeds.float(), text_embeds.float())  # the loss itself in float32
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if (step + 1) % 10 == 0:
                record({"step": step + 1, "loss": round(value.item(), 5), "log_scale": round(model.log_scale.item(), 4),
                        "bias": round(model.bias.item(), 4), "elapsed": round(time.perf_counter() - started, 1)})
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                scores = evaluate(model, encoder, eval_scenes, scene_size=scene_size)
                record({"step": step + 1, **scores})

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "dual_encoder.safetensors"))
    (out / "dual_encoder.json").write_text(json.dumps(model.config.to_dict(), indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in model.vision_tower_state_dict().items()},
              str(out / "vision_tower.safetensors"))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.demo.pretrain_vision",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loss", choices=LOSS_KINDS, default="sigmoid")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-scenes", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE)
    parser.add_argument("--patch-size", type=int, default=None, help="default: the demo tower's")
    args = parser.parse_args(argv)
    pretrain(args.out, args.loss, args.batch_size, args.steps, args.lr, args.warmup_steps, seed=args.seed,
             eval_every=args.eval_every, eval_scenes=args.eval_scenes,
             vision=demo_vision_config(args.image_size, args.patch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
