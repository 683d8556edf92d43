"""The training data under DATA: its images, their labels and the classes in channel order.

DATA is a fixtures-style root (`rayseg fixtures`):

- `images/` + `annotations/semantic/*.png` label PNGs (pixel = category id, 0 = unlabelled,
  ignored by the loss), categories from `--categories`, else `annotations/panoptic.json`,
  else `annotations/instances.json`; or
- `images/` + `annotations/instances.json` (COCO, RLE or polygons): instances are
  rasterised to a semantic map with pycocotools; pixels outside every instance are the
  `background` category when the json has one, else a class 0 "background" added first;
  crowd regions are ignored.

Output channels are the categories in config order; labels are mapped from category ids
to channel indices on decode (IGNORE for anything else).
"""

from __future__ import annotations

import json
import posixpath
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...models.categories import Category, load_category_file, parse_categories
from ..sources import IMAGE_EXTENSIONS
from ..storage import filesystem, full_uri

IGNORE = 255  # label value the loss and validation skip (unlabelled, crowd, unknown ids)


class TrainingError(ValueError):
    """Bad training arguments or data: reported before any cluster work (exit 2)."""


@dataclass
class TrainingData:
    """What the driver found under DATA: one item per image, and the classes in channel order.

    items: {"image_id", "image_uri", "label_uri" (semantic PNG, or ""), "annotations" (json
    list of {category_id, segmentation, iscrowd}, or "")}.
    """

    items: list[dict]
    categories: list[Category]
    source: str  # "semantic" | "instances"
    skipped: int = 0  # images without a label


def _fs(uri: str, storage_options: dict | None):
    fs, path = filesystem(uri, storage_options)
    return fs, path, lambda p: full_uri(fs, p)


def _read_json(uri: str, storage_options: dict | None) -> Any:
    fs, path, _ = _fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        return json.load(f)


def _exists(uri: str, storage_options: dict | None) -> bool:
    fs, path, _ = _fs(uri, storage_options)
    return fs.exists(path)


def instance_categories(entries: list[dict]) -> tuple[list[Category], int]:
    """COCO instances categories + the background class; returns (categories, background channel).

    The category named "background" (any case) is the background when there is one; else a
    stuff class 0 "background" is added as channel 0.
    """
    categories = parse_categories(entries)
    for channel, category in enumerate(categories):
        if category.name.lower() == "background":
            categories[channel] = Category(category.id, category.name, False)
            return categories, channel
    if any(c.id == 0 for c in categories):
        raise TrainingError("the COCO categories use id 0 and have no 'background' category: add one")
    return [Category(0, "background", False)] + categories, 0


def find_training_data(data: str, storage_options: dict | None = None, categories_file: str | None = None) -> TrainingData:
    """Lists DATA's images and their labels (see the module docstring for the layouts)."""
    root = data.rstrip("/")
    images_root = posixpath.join(root, "images")
    semantic_root = posixpath.join(root, "annotations", "semantic")
    instances_json = posixpath.join(root, "annotations", "instances.json")
    panoptic_json = posixpath.join(root, "annotations", "panoptic.json")
    if not _exists(images_root, storage_options):
        raise TrainingError(f"{data} has no images/ directory (expected a `rayseg fixtures`-style root)")

    if _exists(semantic_root, storage_options):
        if categories_file:
            categories = load_category_file(categories_file, storage_options)
        elif _exists(panoptic_json, storage_options):
            categories = parse_categories(_read_json(panoptic_json, storage_options)["categories"])
        elif _exists(instances_json, storage_options):
            categories = parse_categories(_read_json(instances_json, storage_options)["categories"])
        else:
            raise TrainingError(
                f"{data}: label PNGs need category names: pass --categories, or put a COCO "
                "panoptic.json or instances.json in annotations/"
            )
        fs, images_path, uri = _fs(images_root, storage_options)
        _, semantic_path, _ = _fs(semantic_root, storage_options)
        labels = {posixpath.splitext(posixpath.relpath(p, semantic_path))[0]: p for p in fs.find(semantic_path) if p.lower().endswith(".png")}
        items, skipped = [], 0
        for path in sorted(fs.find(images_path)):
            if not path.lower().endswith(tuple(IMAGE_EXTENSIONS)):
                continue
            image_id = posixpath.relpath(path, images_path)
            label = labels.get(posixpath.splitext(image_id)[0])
            if label is None:
                skipped += 1
                continue
            items.append({"image_id": image_id, "image_uri": uri(path), "label_uri": uri(label), "annotations": ""})
        source = "semantic"
    elif _exists(instances_json, storage_options):
        coco = _read_json(instances_json, storage_options)
        categories, _ = instance_categories(coco.get("categories", []))
        if categories_file:
            raise TrainingError("--categories applies to label PNGs; COCO instances bring their own categories")
        by_image: dict[Any, list[dict]] = {}
        for annotation in coco.get("annotations", []):
            by_image.setdefault(annotation["image_id"], []).append(
                {
                    "category_id": annotation["category_id"],
                    "segmentation": annotation["segmentation"],
                    "iscrowd": int(annotation.get("iscrowd", 0)),
                }
            )
        items = [
            {
                "image_id": str(image["id"]),
                "image_uri": posixpath.join(images_root, image["file_name"]),
                "label_uri": "",
                "annotations": json.dumps(by_image.get(image["id"], [])),
            }
            for image in sorted(coco.get("images", []), key=lambda i: str(i["file_name"]))
        ]
        skipped = 0
        source = "instances"
    else:
        raise TrainingError(f"{data} has neither annotations/semantic/*.png nor annotations/instances.json")
    if not items:
        raise TrainingError(f"{data}: no images with labels found")
    if len(categories) >= IGNORE:
        raise TrainingError(f"at most {IGNORE - 1} categories are supported, got {len(categories)}")
    return TrainingData(items=items, categories=categories, source=source, skipped=skipped)


def split_items(items: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random held-out split: (train, val); val is empty when val_fraction is 0."""
    if not 0 <= val_fraction < 1:
        raise TrainingError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    count = 0 if val_fraction == 0 else min(len(shuffled) - 1, max(1, round(len(shuffled) * val_fraction)))
    if val_fraction > 0 and count < 1:
        raise TrainingError(f"--val-fraction {val_fraction} needs at least 2 images, found {len(items)}")
    return sorted(shuffled[count:], key=lambda i: i["image_id"]), sorted(shuffled[:count], key=lambda i: i["image_id"])


def label_lookup(categories: list[Category]) -> np.ndarray:
    """Category id → channel index for ids 0..max; IGNORE for any other id."""
    table = np.full(max([c.id for c in categories] + [255]) + 1, IGNORE, dtype=np.uint8)
    for channel, category in enumerate(categories):
        if category.id >= 0:
            table[category.id] = channel
    return table


def map_label_ids(ids: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """(H, W) category ids → (H, W) uint8 channel indices (IGNORE for unknown ids)."""
    ids = ids.astype(np.int64)
    inside = (ids >= 0) & (ids < len(lookup))
    return np.where(inside, lookup[np.clip(ids, 0, len(lookup) - 1)], IGNORE).astype(np.uint8)
