"""Category sets: the labels a model predicts, and how users name them in files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import fsspec


@dataclass(frozen=True)
class Category:
    """One label a model can emit: COCO `id`, human `name`, `isthing` (instance-able) or stuff."""

    id: int
    name: str
    isthing: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# The synthetic shapes dataset (`rayseg fixtures`): three thing classes drawn on a stuff
# background. Semantic label PNGs store these ids; 0 there means "unlabelled".
SHAPES: list[Category] = [
    Category(1, "circle", True),
    Category(2, "square", True),
    Category(3, "triangle", True),
    Category(4, "background", False),
]


def parse_categories(entries: list) -> list[Category]:
    """Categories from COCO-style dicts (`id`, `name`, optional `isthing`) or plain names.

    Plain names get ids 1..N in order. Duplicate ids are an error.
    """
    categories = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            categories.append(Category(index + 1, entry, True))
        elif isinstance(entry, dict) and "id" in entry and "name" in entry:
            categories.append(Category(int(entry["id"]), str(entry["name"]), bool(entry.get("isthing", True))))
        else:
            raise ValueError(f"category entry {index} must be a name or a dict with 'id' and 'name', got {entry!r}")
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate category ids: {sorted(i for i in ids if ids.count(i) > 1)}")
    return categories


def load_category_file(uri: str, storage_options: dict | None = None) -> list[Category]:
    """Read categories from a JSON file: a COCO json (its `categories`) or a bare list.
    ValueError, naming the file, when it is missing, not JSON or holds no categories."""
    try:
        with fsspec.open(uri, "rt", **(storage_options or {})) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"category file not found: {uri}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"category file {uri} is not valid JSON: {e}") from None
    entries = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"category file {uri} holds no categories: give a COCO json with 'categories', or a list")
    try:
        return parse_categories(entries)
    except (ValueError, TypeError) as e:
        raise ValueError(f"category file {uri}: {e}") from None


# torchvision's COCO detection label space (`MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta`),
# 91 entries where the index is the COCO category id: "__background__" at 0 and "N/A" at
# the 11 ids COCO 2017 does not use. Spelled out here (tests check it against torchvision)
# so that reading categories never imports torchvision.
COCO_91_LABELS: list[str] = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella",
    "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

# The 80 real COCO thing categories, id = their index in COCO_91_LABELS.
COCO: list[Category] = [
    Category(index, name, True) for index, name in enumerate(COCO_91_LABELS) if index and name != "N/A"
]

# torchvision's semantic segmentation label space (`FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1
# .meta`, the same for DeepLabV3): Pascal VOC's 20 classes after a background class, channel c
# being category id c — the ids of VOC's label PNGs.
VOC_21_LABELS: list[str] = [
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

VOC: list[Category] = [Category(0, "background", False)] + [
    Category(index, name, True) for index, name in enumerate(VOC_21_LABELS) if index
]
