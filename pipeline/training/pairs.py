"""Training pairs decoded in Ray Data tasks: an image and its label as uint8 arrays."""

from __future__ import annotations

import io
import json

import numpy as np

from ...models.categories import Category, parse_categories
from ..coco_masks import annotation_mask
from ..storage import filesystem
from .data import IGNORE, label_lookup, map_label_ids


def rasterise_instances(annotations: list[dict], height: int, width: int, categories: list[Category], background: int) -> np.ndarray:
    """COCO instance annotations → (H, W) uint8 channel indices; crowd and unknown ids → IGNORE."""
    channels = {c.id: channel for channel, c in enumerate(categories)}
    label = np.full((height, width), background, dtype=np.uint8)
    for annotation in annotations:
        mask = annotation_mask(annotation, height, width)
        if mask.shape != (height, width):
            raise ValueError(f"annotation mask {mask.shape} does not match its image ({height}, {width})")
        channel = channels.get(annotation["category_id"])
        label[mask] = IGNORE if annotation.get("iscrowd") or channel is None else channel
    return label


class DecodePairs:
    """Ray Data map_batches function: (image uri, label uri | annotations) → uint8 arrays.

    image (N, H, W, 3) and label (N, H, W) channel indices, resized to `size` (bilinear for
    the image, nearest for the label).
    """

    def __init__(self, categories: list[dict], size: tuple[int, int], storage_options: dict | None = None):
        self.categories = parse_categories(categories)
        self.lookup = label_lookup(self.categories)
        self.background = next((i for i, c in enumerate(self.categories) if c.name.lower() == "background"), 0)
        self.size = tuple(size)
        self.storage_options = storage_options

    def _read(self, uri: str) -> bytes:
        fs, path = filesystem(uri, self.storage_options)
        with fs.open(path, "rb") as f:
            return f.read()

    def _label(self, row_label_uri: str, annotations: str, height: int, width: int) -> np.ndarray:
        from PIL import Image

        if row_label_uri:
            with Image.open(io.BytesIO(self._read(row_label_uri))) as image:
                ids = np.asarray(image)
            if ids.ndim == 3:
                raise ValueError(f"{row_label_uri}: label PNGs must be single-channel (pixel = category id)")
            label = map_label_ids(ids, self.lookup)
        else:
            label = rasterise_instances(json.loads(annotations or "[]"), height, width, self.categories, self.background)
        if label.shape != (height, width):
            raise ValueError(f"label {label.shape} does not match its image ({height}, {width}): {row_label_uri}")
        return label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from ..decode import decode_image

        height, width = self.size
        images, labels = [], []
        for image_uri, label_uri, coco_annotations in zip(batch["image_uri"], batch["label_uri"], batch["annotations"]):
            try:
                image = decode_image(self._read(image_uri))
                label = self._label(str(label_uri), str(coco_annotations), *image.shape[:2])
            except Exception as e:
                raise ValueError(f"cannot read training pair {image_uri}: {e}") from e
            if image.shape[:2] != (height, width):
                image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
                label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
            images.append(image)
            labels.append(label)
        return {"image": np.stack(images), "label": np.stack(labels)}
