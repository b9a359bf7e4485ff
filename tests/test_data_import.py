"""`paligemma data import`: COCO (detect, segment, captions), YOLO and mask folders -> training JSONL."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import paligemma
from paligemma.cli import main as cli_main
from paligemma.data_import import (
    DataImportError,
    Writer,
    import_coco,
    import_coco_captions,
    import_masks,
    import_yolo,
    parse_simple_yaml,
    polygons_to_mask,
    rle_counts_from_string,
    segmentation_mask,
)
from paligemma.data_import.common import box_to_upright, mask_to_upright, upright_size
from paligemma.demo.export_coco import export, mask_to_coco_rle
from paligemma.demo.scenes import SHAPES, detect_answer, generate_scene, segment_answer
from paligemma.finetune.data import FinetuneDataset
from paligemma.segmentation import format_segmentations
from paligemma.tasks import parse_detections
from paligemma.vqvae import load_mask_codec

# pycocotools' mask.decode trips a NumPy 2 deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
DEMO_CODEC = Path(paligemma.__file__).parent / "demo_model" / "mask_codec.safetensors"
SEEDS = range(5, 10)


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    instances, captions = export(root, len(SEEDS), seed0=SEEDS[0])
    return root, instances, captions


@pytest.fixture(scope="module")
def codec():
    return load_mask_codec(DEMO_CODEC)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------- COCO instances

def test_coco_detect_rows_hold_every_object(tmp_path, shapes_coco):
    root, instances, _ = shapes_coco
    result = import_coco(instances, root / "images", Writer(tmp_path / "train.jsonl"))
    assert (result.rows, result.images, result.problems) == (len(SEEDS), len(SEEDS), [])
    rows = _rows(tmp_path / "train.jsonl")
    dataset = FinetuneDataset.from_jsonl(tmp_path / "train.jsonl")  # what fine-tuning reads
    assert len(dataset) == len(SEEDS) and dataset.problems == []
    for seed, row in zip(SEEDS, rows):
        scene = generate_scene(seed)
        assert row["prefix"] == "detect circle ; square ; triangle"
        assert (tmp_path / row["image"]).read_bytes() == (root / "images" / f"{seed:010d}.png").read_bytes()
        parsed = parse_detections(row["suffix"], (224, 224))
        assert parsed.errors == [] and len(parsed.objects) == len(scene.objects)
        expected = sorted((o.shape, o.box) for o in scene.objects)
        got = sorted((d.label, tuple(round(v) for v in d.box)) for d in parsed.objects)
        for (label, box), (want_label, want_box) in zip(got, expected):
            assert label == want_label and max(abs(a - b) for a, b in zip(box, want_box)) <= 1  # 1024 bins


def test_object_orders(tmp_path, shapes_coco):
    root, instances, _ = shapes_coco
    suffixes = {}
    for order in ("file", "raster", "random"):
        import_coco(instances, root / "images", Writer(tmp_path / f"{order}.jsonl"), order=order, seed=1)
        suffixes[order] = [row["suffix"] for row in _rows(tmp_path / f"{order}.jsonl")]
    import_coco(instances, root / "images", Writer(tmp_path / "again.jsonl"), order="random", seed=1)
    assert [row["suffix"] for row in _rows(tmp_path / "again.jsonl")] == suffixes["random"]  # seeded
    assert suffixes["random"] != suffixes["file"]
    for seed, file_order, raster in zip(SEEDS, suffixes["file"], suffixes["raster"]):
        scene = generate_scene(seed)
        assert [d.label for d in parse_detections(file_order, (224, 224)).objects] == [o.shape for o in scene.objects]
        tops = [(d.box[1], d.box[0]) for d in parse_detections(raster, (224, 224)).objects]
        assert tops == sorted(tops)
        assert sorted(file_order.split(" ; ")) == sorted(raster.split(" ; "))


def test_one_row_per_class_in_the_image(tmp_path, shapes_coco):
    """--classes each: "detect circle" with the circles only, as the shapes world's own detect answers."""
    root, instances, _ = shapes_coco
    import_coco(instances, root / "images", Writer(tmp_path / "each.jsonl"), prompt_classes="each", order="file")
    rows = _rows(tmp_path / "each.jsonl")
    expected = [(f"detect {shape}", detect_answer(scene, shape)) for scene in map(generate_scene, SEEDS)
                for shape in SHAPES if any(o.shape == shape for o in scene.objects)]
    assert [(row["prefix"], row["suffix"]) for row in rows] == expected


def test_coco_segment_rows_equal_the_scenes_own_answers(tmp_path, shapes_coco, codec):
    """RLE masks -> VQ-VAE encoder -> <seg> tokens: the same objects as the shapes world's segment answer."""
    root, instances, _ = shapes_coco
    import_coco(instances, root / "images", Writer(tmp_path / "seg.jsonl"), task="segment", codec=codec)
    for seed, row in zip(SEEDS, _rows(tmp_path / "seg.jsonl")):
        assert row["prefix"] == "segment circle ; square ; triangle"
        expected = segment_answer(generate_scene(seed), list(SHAPES), codec)
        assert sorted(row["suffix"].split(" ; ")) == sorted(expected.split(" ; "))


def test_coco_captions_one_row_each_or_grouped(tmp_path, shapes_coco):
    root, _, captions = shapes_coco
    data = json.loads(captions.read_text())
    data["annotations"].append({"id": 99, "image_id": SEEDS[0], "caption": "  two   spaces\n"})
    (tmp_path / "captions.json").write_text(json.dumps(data))
    import_coco_captions(tmp_path / "captions.json", root / "images", Writer(tmp_path / "cap.jsonl"))
    rows = _rows(tmp_path / "cap.jsonl")
    assert len(rows) == len(SEEDS) + 1 and rows[1]["suffix"] == "two spaces" and rows[0]["prefix"] == "caption en"
    import_coco_captions(tmp_path / "captions.json", root / "images", Writer(tmp_path / "grouped.jsonl"),
                         prompt="caption es", group=True)
    grouped = _rows(tmp_path / "grouped.jsonl")
    assert len(grouped) == len(SEEDS) and grouped[0]["suffix"][1] == "two spaces"
    assert grouped[0]["image"] == rows[0]["image"] and grouped[0]["prefix"] == "caption es"


def _bad_coco(tmp_path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("a.png", (100, 50)), ("b.png", (100, 50)), ("c.png", (60, 60))):
        Image.new("RGB", size, "white").save(images / name)
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50},
                   {"id": 2, "file_name": "b.png", "width": 100, "height": 50},
                   {"id": 3, "file_name": "c.png", "width": 64, "height": 60},  # wrong size
                   {"id": 4, "file_name": "missing.png", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [90, 10, 20, 20], "iscrowd": 0,  # past the edge
             "segmentation": [[90, 10, 99, 10, 99, 30]]},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # unknown category
            {"id": 13, "image_id": 2, "category_id": 2, "bbox": [40, 10, 30, 40.5], "iscrowd": 0,  # 0.5 px over
             "segmentation": [[40, 5, 70, 5, 55, 45]]},
            {"id": 14, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1,
             "segmentation": {"size": [50, 100], "counts": [0, 5000]}},  # crowd: left out
        ],
    }
    (tmp_path / "bad.json").write_text(json.dumps(data))
    return tmp_path / "bad.json"


def test_bad_annotations_are_reported_with_file_and_id_and_skipped(tmp_path):
    path = _bad_coco(tmp_path)
    result = import_coco(path, tmp_path / "images", Writer(tmp_path / "kept.jsonl"), order="file", on_bad="object")
    problems = "\n".join(result.problems)
    assert ("annotation 11 (image 1 'a.png'): box [90.0, 10.0, 110.0, 30.0] extends past the 100x50 image; "
            "annotation skipped") in problems
    assert "annotation 12 (image 2 'b.png'): unknown category_id 7; annotation skipped" in problems
    assert "image 3 'c.png': the file says 64x60 but the image is 60x60; image skipped" in problems
    assert "image 4 'missing.png': image file not found" in problems
    assert len(result.problems) == 4 and all(line.startswith(f"{path}: ") for line in result.problems)
    assert any("annotation 14" in note and "crowd" in note for note in result.notes)
    assert (result.rows, result.skipped_images) == (2, 2)
    rows = _rows(tmp_path / "kept.jsonl")
    assert [r["image"] for r in rows] == ["images/a.png", "images/b.png"]
    boxes = [parse_detections(r["suffix"], (100, 50)).objects for r in rows]
    assert [[d.label for d in b] for b in boxes] == [["cat"], ["dog"]]
    assert boxes[1][0].box[3] == pytest.approx(50, abs=0.05)  # 0.5 px past the edge: clipped


def test_nothing_to_write_is_an_error_and_writes_nothing(tmp_path):
    path = _bad_coco(tmp_path)
    with pytest.raises(DataImportError, match="nothing to write.*annotation 11.*image skipped"):
        import_coco(path, tmp_path / "images", Writer(tmp_path / "out.jsonl"))  # every image has a problem
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".*tmp"))


def test_degenerate_polygons_are_reported(tmp_path):
    path = _bad_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] = [
        {"id": 20, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": [[10, 10, 30, 10]]},
        {"id": 21, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20],
         "segmentation": [[10, 10, 20, 20, 30, 30]]},  # collinear: zero area
        {"id": 22, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "segmentation": [[5, 5, 25, 5, 15, 25]]},
    ]
    path.write_text(json.dumps(data))
    codec = load_mask_codec(DEMO_CODEC)
    result = import_coco(path, tmp_path / "images", Writer(tmp_path / "seg.jsonl"), task="segment", codec=codec,
                         on_bad="object")
    problems = "\n".join(result.problems)
    assert "annotation 20 (image 1 'a.png'): degenerate polygon (4 values" in problems
    assert "annotation 21 (image 2 'b.png'): degenerate polygon (zero area)" in problems
    assert result.rows == 2 and _rows(tmp_path / "seg.jsonl")[1]["suffix"].count("<seg") == 16


# ---------------------------------------------------------------------- masks: RLE, polygons, EXIF

def test_rle_decoding_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (40, 33), (64, 64)):
        mask = rng.random(shape) < rng.random()
        mask[0, 0] = rng.random() < 0.5
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        compressed = {"size": encoded["size"], "counts": encoded["counts"].decode()}
        assert np.array_equal(segmentation_mask(compressed, shape[::-1]), mask)
        assert np.array_equal(segmentation_mask(mask_to_coco_rle(mask), shape[::-1]), mask)
        assert rle_counts_from_string(compressed["counts"]) == mask_to_coco_rle(mask)["counts"]


def test_polygons_fill_the_pixels_pycocotools_fills():
    mask_utils = pytest.importorskip("pycocotools.mask")
    polygons = [[[10.0, 10.0, 50.0, 12.0, 30.0, 45.0]], [[5.5, 5.5, 60.2, 5.5, 60.2, 40.7, 5.5, 40.7]],
                [[20, 5, 35, 20, 20, 35, 5, 20], [40, 40, 55, 40, 47, 55]], [[3.2, 7.9, 12.1, 2.2, 30.3, 50.5, 1, 60]],
                [[0, 0, 64, 0, 64, 64, 0, 64]]]
    for polygon in polygons:
        ours = polygons_to_mask(polygon, (64, 64))
        theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 64, 64))).astype(bool)
        iou = (ours & theirs).sum() / (ours | theirs).sum()
        assert iou > 0.94, iou  # pycocotools samples a 5x grid: the two differ on edge pixels only
        assert abs(int(ours.sum()) - int(theirs.sum())) <= 2 * (64 + 64)  # at most an edge's width around
    square = polygons_to_mask([[2, 3, 10, 3, 10, 8, 2, 8]], (12, 10))  # pixel-aligned: exactly its pixels
    expected = np.zeros((10, 12), bool)
    expected[3:8, 2:10] = True
    assert np.array_equal(square, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_maps_boxes_and_masks_like_pil(tmp_path, orientation):
    stored = np.zeros((30, 50), bool)
    stored[4:11, 7:19] = True  # rows 4..10, columns 7..18: box [7, 4, 19, 11]
    image = Image.fromarray(stored.astype(np.uint8) * 255).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "x.jpg", exif=exif.tobytes(), quality=100)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "x.jpg")).convert("L")) > 127
    assert upright_size(tmp_path / "x.jpg") == ((50, 30), orientation, upright.shape[::-1])
    assert np.array_equal(mask_to_upright(stored, orientation), upright)
    ys, xs = np.nonzero(upright)
    assert box_to_upright([7, 4, 19, 11], orientation, (50, 30)) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_coco_annotations_on_stored_pixels_are_turned_upright(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    image = Image.new("RGB", (50, 30), "white")
    for name, orientation in (("rot.jpg", 6), ("flip.jpg", 3)):
        exif = image.getexif()
        exif[0x0112] = orientation
        image.save(images / name, exif=exif.tobytes())
    data = {"images": [{"id": 1, "file_name": "rot.jpg", "width": 50, "height": 30},   # stored frame
                       {"id": 2, "file_name": "rot.jpg", "width": 30, "height": 50},   # upright frame
                       {"id": 3, "file_name": "flip.jpg", "width": 50, "height": 30}],  # cannot tell
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [7, 4, 12, 7]} for i in (1, 2, 3)]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    result = import_coco(tmp_path / "c.json", images, Writer(tmp_path / "o.jsonl"))
    assert len(result.problems) == 1 and "EXIF orientation 3 keeps the image's size" in result.problems[0]
    first, second = (parse_detections(row["suffix"], (30, 50)).objects[0].box for row in _rows(tmp_path / "o.jsonl"))
    np.testing.assert_allclose(first, box_to_upright([7, 4, 19, 11], 6, (50, 30)), atol=0.05)
    np.testing.assert_allclose(second, [7, 4, 19, 11], atol=0.05)


# ---------------------------------------------------------------------- output: placement and atomicity

def test_existing_output_and_differing_images_are_never_overwritten_silently(tmp_path, shapes_coco):
    root, instances, _ = shapes_coco
    import_coco(instances, root / "images", Writer(tmp_path / "a.jsonl"))
    with pytest.raises(DataImportError, match="exists; pass --overwrite"):
        Writer(tmp_path / "a.jsonl")
    import_coco(instances, root / "images", Writer(tmp_path / "b.jsonl"))  # same images: reused
    first = tmp_path / "images" / f"{SEEDS[0]:010d}.png"
    first.write_bytes(b"something else")
    with pytest.raises(DataImportError, match="exists with other content"):
        import_coco(instances, root / "images", Writer(tmp_path / "c.jsonl"))
    assert not (tmp_path / "c.jsonl").exists()
    import_coco(instances, root / "images", Writer(tmp_path / "a.jsonl", overwrite=True))
    assert first.read_bytes() == (root / "images" / first.name).read_bytes()
    with pytest.raises(DataImportError, match=r"\.jsonl file"):
        Writer(tmp_path / "a.json")


@pytest.mark.parametrize("link", ["hardlink", "symlink", "reference"])
def test_images_can_be_linked_or_referenced(tmp_path, shapes_coco, link):
    root, instances, _ = shapes_coco
    out = tmp_path / "sub" / "train.jsonl"
    out.parent.mkdir()
    import_coco(instances, root / "images", Writer(out, link=link))
    row = _rows(out)[0]
    source = root / "images" / f"{SEEDS[0]:010d}.png"
    placed = out.parent / row["image"]
    assert placed.resolve() == source.resolve() if link != "hardlink" else os.path.samefile(placed, source)
    assert (link == "symlink") == placed.is_symlink()
    assert (link == "reference") == row["image"].startswith("..")


# ---------------------------------------------------------------------- YOLO

def _yolo(tmp_path, names_yaml: str) -> Path:
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "train" / "a.jpg")
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "train" / "b.png")
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "train" / "empty.png")  # no label file: negative
    (tmp_path / "labels" / "train" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.3 0.1 0.2 0.5\n")  # a box and a polygon
    (tmp_path / "labels" / "train" / "b.txt").write_text("3 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n1 0.1 0.1 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text(f"# comment\npath: .\ntrain: images/train  # the split\nval: images/val\n"
                                        f"{names_yaml}\n")
    return tmp_path / "data.yaml"


NAMES = ["names:\n  0: cat\n  1: dog\n  2: 'traffic light'", "names: [cat, dog, \"traffic light\"]",
         "nc: 3\nnames:\n  - cat\n  - dog\n  - traffic light"]


@pytest.mark.parametrize("names", NAMES)
def test_yolo_detect_rows_and_bad_lines(tmp_path, names):
    data_yaml = _yolo(tmp_path, names)
    result = import_yolo(data_yaml, Writer(tmp_path / "out.jsonl"), order="file")
    rows = {row["image"]: row for row in _rows(tmp_path / "out.jsonl")}
    assert sorted(rows) == ["images/images/train/a.jpg", "images/images/train/empty.png"]
    assert rows["images/images/train/a.jpg"]["prefix"] == "detect cat ; dog ; traffic light"
    objects = parse_detections(rows["images/images/train/a.jpg"]["suffix"], (200, 100)).objects
    assert [d.label for d in objects] == ["cat", "dog"]
    np.testing.assert_allclose(objects[0].box, [80, 30, 120, 70], atol=0.2)
    np.testing.assert_allclose(objects[1].box, [20, 10, 60, 50], atol=0.2)  # the polygon's bounds
    assert rows["images/images/train/empty.png"]["suffix"] == ""
    labels = tmp_path / "labels" / "train" / "b.txt"
    assert result.problems == [f"{labels}:1: unknown class 3 (data.yaml names 3 classes); image skipped",
                               f"{labels}:2: box [170.0, 40.0, 210.0, 60.0] extends past the 200x100 image; "
                               "image skipped"]


def test_yolo_segment_rows_need_polygons(tmp_path, codec):
    data_yaml = _yolo(tmp_path, NAMES[1])
    result = import_yolo(data_yaml, Writer(tmp_path / "seg.jsonl"), task="segment", codec=codec, on_bad="object",
                         prompt_classes="present")
    assert any("a.txt:1: a box line has no polygon to segment; object skipped" in p for p in result.problems)
    rows = _rows(tmp_path / "seg.jsonl")
    assert [r["prefix"] for r in rows] == ["segment dog"]  # b.png: every line bad; empty.png: nothing to ask
    assert sum("no objects, not written" in note for note in result.notes) == 2
    assert rows[0]["suffix"].endswith(" dog") and rows[0]["suffix"].count("<seg") == 16


def test_simple_yaml_reader_agrees_with_pyyaml(monkeypatch, tmp_path):
    yaml = pytest.importorskip("yaml")
    for names in NAMES:
        text = f"# c\npath: ../data  # root\ntrain: [images/a, 'images/b']\nval: images/val\n{names}\n"
        assert parse_simple_yaml(text) == yaml.safe_load(text)
    data_yaml = _yolo(tmp_path, NAMES[0])
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    assert import_yolo(data_yaml, Writer(tmp_path / "o.jsonl")).rows == 2
    with pytest.raises(DataImportError, match="cannot read"):
        parse_simple_yaml("names: {0: a}\n  weird line")


# ---------------------------------------------------------------------- mask folders

def _mask_folder(tmp_path, per_class: bool) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for stem in ("p1", "p2", "p3"):
        Image.new("RGB", (80, 60), "gray").save(images / f"{stem}.jpg")
    blob = np.zeros((60, 80), np.uint8)
    blob[10:30, 20:50] = 255
    other = np.zeros((60, 80), np.uint8)
    other[40:55, 5:15] = 1
    files = {"p1.png": blob, "p1_b.png": other, "p2.png": np.zeros((60, 80), np.uint8),
             "p3.png": np.zeros((10, 10), np.uint8), "nobody.png": blob}
    for name, array in files.items():
        folder = masks / ("lesion" if per_class else "") if name != "p1_b.png" or not per_class else masks / "cyst"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / name)
    return images, masks


def test_mask_folder_segment_rows(tmp_path, codec):
    images, masks = _mask_folder(tmp_path, per_class=False)
    result = import_masks(images, masks, Writer(tmp_path / "s.jsonl"), label="lesion", codec=codec, order="file")
    problems = "\n".join(result.problems)
    assert "nobody.png: no image named like it" in problems
    assert "p3.png: mask is 10x10 but the image is 80x60" in problems
    assert any("p2.png: empty mask" in note for note in result.notes)
    rows = {row["image"]: row for row in _rows(tmp_path / "s.jsonl")}
    assert sorted(rows) == ["images/p1.jpg", "images/p2.jpg"] and rows["images/p2.jpg"]["suffix"] == ""
    mask_a, mask_b = (np.asarray(Image.open(masks / n)) > 0 for n in ("p1.png", "p1_b.png"))
    expected = format_segmentations([("lesion", [20, 10, 50, 30], mask_a), ("lesion", [5, 40, 15, 55], mask_b)],
                                    (80, 60), codec)
    assert rows["images/p1.jpg"]["suffix"] == expected and rows["images/p1.jpg"]["prefix"] == "segment lesion"


def test_mask_folder_with_one_folder_per_class(tmp_path, codec):
    images, masks = _mask_folder(tmp_path, per_class=True)
    with pytest.raises(DataImportError, match="--label is not used"):
        import_masks(images, masks, Writer(tmp_path / "x.jsonl"), label="x", codec=codec)
    import_masks(images, masks, Writer(tmp_path / "d.jsonl"), task="detect", order="raster")
    row = _rows(tmp_path / "d.jsonl")[0]
    assert row["prefix"] == "detect cyst ; lesion"
    assert [d.label for d in parse_detections(row["suffix"], (80, 60)).objects] == ["lesion", "cyst"]


# ---------------------------------------------------------------------- the command

def test_data_import_command(tmp_path, shapes_coco, capsys):
    root, instances, _ = shapes_coco
    out = tmp_path / "seg.jsonl"
    args = ["data", "import", "--format", "coco", "--annotations", str(instances), "--images", str(root / "images"),
            "--task", "segment", "--out", str(out)]
    assert cli_main(args) == 2 and "--mask-codec" in capsys.readouterr().err
    assert cli_main(args + ["--mask-codec", str(DEMO_CODEC)]) == 0
    assert f"wrote {len(SEEDS)} rows ({len(SEEDS)} images)" in capsys.readouterr().out
    assert cli_main(args + ["--mask-codec", str(DEMO_CODEC)]) == 2 and "exists" in capsys.readouterr().err
    assert cli_main(["data", "import", "--format", "yolo", "--out", str(out)]) == 2
    assert "needs --data-yaml" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    bad = _bad_coco(tmp_path / "bad")
    assert cli_main(["data", "import", "--format", "coco", "--annotations", str(bad), "--images",
                     str(bad.parent / "images"), "--on-bad", "object", "--out", str(tmp_path / "b.jsonl"),
                     "--problems-file", str(tmp_path / "problems.txt")]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("problem: ") == 4 and "annotation 12" in captured.err
    assert (tmp_path / "problems.txt").read_text().count("\n") == 4
