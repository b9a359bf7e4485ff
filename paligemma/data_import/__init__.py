"""`paligemma data import`: COCO, YOLO and mask-folder datasets -> fine-tuning JSONL (docs/data.md).

    from paligemma.data_import import Writer, import_coco
    result = import_coco("instances_train.json", "train2017/", Writer("data/train.jsonl"), task="detect")
    print(result.rows, result.problems)
"""

from .coco import import_coco, import_coco_captions, polygons_to_mask, rle_counts_from_string, segmentation_mask
from .common import DataImportError, ImportResult, Writer
from .masks import import_masks
from .yolo import import_yolo, parse_simple_yaml

__all__ = ["DataImportError", "ImportResult", "Writer", "import_coco", "import_coco_captions", "import_masks",
           "import_yolo", "parse_simple_yaml", "polygons_to_mask", "rle_counts_from_string", "segmentation_mask"]
