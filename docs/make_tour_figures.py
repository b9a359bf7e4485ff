"""Regenerate the pictures of docs/tour.md (docs/assets/tour_*.png) from the bundled demo model.

    python docs/make_tour_figures.py            # needs matplotlib: pip install -e ".[viz]"

Greedy answers on the demo's example image, so every run draws the same figures. The PNGs are
reduced to a 48-colour palette to keep the repository small.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

import paligemma
from paligemma import visualize
from paligemma.cli_common import DEMO_MODEL_DIR, EXAMPLE_IMAGE

ASSETS = Path(__file__).resolve().parent / "assets"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help=f"folder for the PNGs (default {ASSETS})")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = paligemma.load_model(DEMO_MODEL_DIR)
    processor = paligemma.load_processor(DEMO_MODEL_DIR)
    image = Image.open(EXAMPLE_IMAGE).convert("RGB")
    with tempfile.TemporaryDirectory() as tmp:
        drafts = Path(tmp)
        batch = processor(images=[image], prompts=["caption en"], suffixes=["a red triangle"])
        pad = torch.zeros(1, 3, dtype=torch.long)  # three pads, as a shorter row of a right-padded batch has
        visualize.plot_prefix_lm_mask(torch.cat([batch["input_ids"], pad], 1)[0],
                                      torch.cat([batch["attention_mask"], pad], 1)[0],
                                      torch.cat([batch["token_type_ids"], pad], 1)[0],
                                      model.config.image_token_index, drafts / "tour_prefix_mask.png")
        for prompt, name in (("detect triangle", "detect"), ("caption en", "caption")):
            result = paligemma.generate_detailed(model, processor, [image], [prompt])[0]
            attention = visualize.answer_attention(model, processor, image, prompt, result.token_ids)
            visualize.plot_answer_attention(image, attention, drafts / f"tour_attention_{name}.png")
            print(f"{prompt!r} -> {result.text!r}")
            if name == "detect":
                visualize.plot_token_attention(image, attention, 0, drafts / "tour_attention_detect_heads.png")
        args.out.mkdir(parents=True, exist_ok=True)
        for draft in sorted(drafts.iterdir()):
            with Image.open(draft) as picture:
                small = picture.convert("RGB").quantize(colors=48, method=Image.Quantize.MEDIANCUT)
            small.save(args.out / draft.name, optimize=True)
            print(f"wrote {args.out / draft.name} ({(args.out / draft.name).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
