"""Write COUNT held-out demo scenes (seeds from 1,000,000,000) and rows.jsonl asking "caption en" into FOLDER."""

import json
import sys
from pathlib import Path

from paligemma.demo.scenes import generate_scene

folder, count = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
with (folder / "rows.jsonl").open("w") as rows:
    for i in range(count):
        generate_scene(1_000_000_000 + i).image.save(folder / f"scene{i:03d}.png")
        rows.write(json.dumps({"id": i, "image": f"scene{i:03d}.png", "prompt": "caption en"}) + "\n")
