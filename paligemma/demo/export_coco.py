"""Export shapes-world scenes as a COCO dataset, the input of the worked example in docs/data.md.

    python -m paligemma.demo.export_coco --out shapes/val --scenes 50 --seed0 1000000000

writes `out/images/{seed}.png`, `out/instances.json` (categories circle, square, triangle; one
annotation per object: its box and its mask as COCO RLE) and `out/captions.json` (the scene's
caption). The same arguments write the same files. Nothing here is used by the library: it makes
a small COCO dataset whose every answer is known, to try `paligemma data import` on.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from .recipe import SCENE_SIZE
from .scenes import SHAPES, caption, generate_scene

CATEGORIES = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]


def mask_to_coco_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths down the columns (Fortran order), starting with background."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def export(out: str | os.PathLike, scenes: int, seed0: int = 0, size: int = SCENE_SIZE) -> tuple[Path, Path]:
    """Write the dataset (module docstring); returns (instances.json, captions.json)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    category = {c["name"]: c["id"] for c in CATEGORIES}
    images, objects, captions = [], [], []
    for seed in range(seed0, seed0 + scenes):
        scene = generate_scene(seed, size)
        name = f"{seed:010d}.png"
        scene.image.save(out / "images" / name, format="PNG")
        images.append({"id": seed, "file_name": name, "width": size, "height": size})
        captions.append({"id": len(captions) + 1, "image_id": seed, "caption": caption(scene)})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            objects.append({"id": len(objects) + 1, "image_id": seed, "category_id": category[obj.shape],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(obj.mask.sum()), "iscrowd": 0,
                            "segmentation": mask_to_coco_rle(obj.mask)})
    paths = out / "instances.json", out / "captions.json"
    for path, rows, categories in ((paths[0], objects, CATEGORIES), (paths[1], captions, None)):
        data = {"info": {"description": f"shapes world, seeds {seed0}..{seed0 + scenes - 1}"}, "images": images,
                "annotations": rows}
        if categories:
            data["categories"] = categories
        path.write_text(json.dumps(data), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paligemma.demo.export_coco", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (images/, instances.json, captions.json)")
    parser.add_argument("--scenes", type=int, default=100, help="number of scenes (default 100)")
    parser.add_argument("--seed0", type=int, default=0, help="first scene seed (evaluation scenes: 1000000000)")
    args = parser.parse_args(argv)
    instances, captions = export(args.out, args.scenes, args.seed0)
    print(f"wrote {args.scenes} scenes: {instances}, {captions}, {Path(args.out) / 'images'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
