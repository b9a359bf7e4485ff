"""How fast can a SigLIP tower of a given resolution learn to see shapes? A supervised probe.

    OMP_NUM_THREADS=1 python experiments/shape_probe.py --image-size 96 --patch-size 8 --steps 150

Trains the demo's tower (paligemma.demo.recipe.demo_vision_config at the given image/patch size)
plus a MAP head and a linear layer to predict, for a fresh scene, how many circles, squares and
triangles it holds (3 heads x 5 classes), and prints held-out accuracy of those counts. Used to
choose the demo model's image and patch size (see the demo model card).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from paligemma.contrastive import MapHead
from paligemma.demo.recipe import SCENE_SIZE, demo_vision_config
from paligemma.demo.scenes import MAX_OBJECTS, SHAPES, count, generate_scene
from paligemma.images import ImageProcessor
from paligemma.siglip import SiglipVisionTower


def batch(seeds, processor):
    scenes = [generate_scene(s, SCENE_SIZE) for s in seeds]
    pixels = processor([s.image for s in scenes]).pixel_values
    counts = torch.tensor([[count(s, shape) for shape in SHAPES] for s in scenes])  # (B, 3)
    return pixels, counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--patch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = demo_vision_config(args.image_size, args.patch_size)
    tower, head = SiglipVisionTower(config), MapHead(config)
    classify = torch.nn.Linear(config.hidden_size, len(SHAPES) * (MAX_OBJECTS + 1))
    params = [*tower.parameters(), *head.parameters(), *classify.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    processor = ImageProcessor(height=args.image_size, width=args.image_size)
    test_pixels, test_counts = batch(range(7 * 10**8, 7 * 10**8 + 300), processor)
    started = time.perf_counter()

    def logits(pixels):
        return classify(head(tower(pixels))).view(-1, len(SHAPES), MAX_OBJECTS + 1)

    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        pixels, counts = batch(range(6 * 10**8 + step * args.batch_size, 6 * 10**8 + (step + 1) * args.batch_size),
                               processor)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = logits(pixels)
        loss = F.cross_entropy(out.float().reshape(-1, MAX_OBJECTS + 1), counts.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                predicted = logits(test_pixels).argmax(-1)
            print(json.dumps({"image_size": args.image_size, "patch_size": args.patch_size, "step": step + 1,
                              "loss": round(loss.item(), 4),
                              "count_accuracy": round((predicted == test_counts).float().mean().item(), 4),
                              "all_three_right": round((predicted == test_counts).all(-1).float().mean().item(), 4),
                              "elapsed": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
