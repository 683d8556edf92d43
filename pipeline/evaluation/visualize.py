"""Overlay thumbnails: ground truth and prediction drawn over the image, side by side.

Only the report's handful of best and worst images are drawn: their prediction rows are
read back from their Parquet location, the ground truth from its files, the image from the
row's `uri`. An image that cannot be read is drawn on a grey canvas instead.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..coco_masks import annotation_mask
from ..run_reader import Prediction
from ..storage import filesystem
from .data import InstanceImage, PanopticImage, SemanticImage

log = logging.getLogger("rayseg")

# Distinct, colour-blind-friendlier hues (Tableau 10 + extra); ids beyond cycle with a shift.
PALETTE = [
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
    (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
THUMBNAIL_SIDE = 256
ALPHA = 0.55


def category_color(category_id: int) -> tuple[int, int, int]:
    base = PALETTE[category_id % len(PALETTE)]
    if category_id < len(PALETTE):
        return base
    shift = (category_id // len(PALETTE)) * 37
    return tuple(int((c + shift) % 256) for c in base)


def instance_shade(color: tuple[int, int, int], index: int) -> tuple[int, int, int]:
    """The category colour, lighter or darker per instance, so touching instances separate."""
    factor = [1.0, 0.75, 1.25, 0.6, 1.4][index % 5]
    return tuple(int(min(255, max(0, c * factor))) for c in color)


def read_image(uri: str | None, storage_options: dict | None = None) -> np.ndarray | None:
    """The image at `uri` as RGB uint8, or None when there is none or it cannot be read."""
    if not uri:
        return None
    try:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
            image.load()
        return np.asarray(image.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - a thumbnail is never worth failing a report
        log.debug("thumbnail image %s unreadable: %s", uri, e)
        return None


def overlay(canvas: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]], alpha: float = ALPHA) -> np.ndarray:
    """Masks blended over the canvas, each with a solid outline."""
    out = canvas.astype(np.float32).copy()
    for mask, color in masks:
        if not mask.any():
            continue
        color_array = np.array(color, dtype=np.float32)
        out[mask] = out[mask] * (1 - alpha) + color_array * alpha
        edge = mask & ~_erode(mask)
        out[edge] = color_array
    return np.clip(out, 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _scale(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    h, w = image.shape[:2]
    factor = side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    resample = Image.NEAREST if factor >= 1 else Image.LANCZOS
    return np.asarray(Image.fromarray(image).resize(size, resample))


def _canvas(image: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """The image in light grey tones, so the category colours drawn over it stand out."""
    if image is not None and image.shape[:2] == (height, width):
        luma = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        grey = 70 + luma * 0.6
        return np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)
    return np.full((height, width, 3), 110, dtype=np.uint8)


def prediction_masks(
    prediction: Prediction, task: str, score_threshold: float, limit: int = 100
) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """The prediction's masks to draw: instance segments scoring ≥ threshold (best `limit`)."""
    if not prediction.ok or not len(prediction):
        return []
    order = np.argsort(-prediction.score, kind="stable")
    if task == "instance":
        order = [i for i in order.tolist() if prediction.score[i] >= score_threshold][:limit]
    else:
        order = order.tolist()
    masks = []
    seen: dict[int, int] = {}
    for i in order:
        category = int(prediction.category_id[i])
        mask = mask_utils.decode(prediction.rle_dict(i)).astype(bool)
        color = category_color(category)
        if task != "semantic":
            color = instance_shade(color, seen.get(category, 0))
            seen[category] = seen.get(category, 0) + 1
        masks.append((mask, color))
    return masks


def ground_truth_masks(gt, task: str, storage_options: dict | None, ignore_labels=frozenset()) -> tuple[list, tuple[int, int] | None]:
    """The ground truth's masks to draw, and the image size they imply."""
    masks = []
    if task == "instance":
        assert isinstance(gt, InstanceImage)
        seen: dict[int, int] = {}
        for annotation in gt.annotations:
            mask = annotation_mask(annotation, gt.height, gt.width)
            category = annotation["category_id"]
            color = instance_shade(category_color(category), seen.get(category, 0))
            seen[category] = seen.get(category, 0) + 1
            masks.append((mask, color))
        return masks, (gt.height, gt.width)
    if task == "semantic":
        from .semantic import read_label_png

        assert isinstance(gt, SemanticImage)
        label = read_label_png(gt.png, storage_options)
        for value in np.unique(label).tolist():
            if value not in ignore_labels:
                masks.append((label == value, category_color(int(value))))
        return masks, label.shape
    from .panoptic import read_panoptic_png

    assert isinstance(gt, PanopticImage)
    ids = read_panoptic_png(gt.png, storage_options)
    seen = {}
    for segment in gt.segments_info:
        category = segment["category_id"]
        color = instance_shade(category_color(category), seen.get(category, 0))
        seen[category] = seen.get(category, 0) + 1
        masks.append((ids == segment["id"], color))
    return masks, ids.shape


def render_pair(
    task: str,
    gt,
    prediction: Prediction,
    *,
    storage_options: dict | None = None,
    score_threshold: float = 0.5,
    ignore_labels=frozenset(),
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ground-truth panel, prediction panel, image was readable), each scaled for a thumbnail."""
    gt_masks, size = ground_truth_masks(gt, task, storage_options, ignore_labels)
    height, width = size if size else (prediction.height, prediction.width)
    image = read_image(prediction.uri, storage_options)
    canvas = _canvas(image, height, width)
    same_size = (prediction.height, prediction.width) == (height, width)
    pred_masks = prediction_masks(prediction, task, score_threshold) if same_size else []
    return (
        _scale(overlay(canvas, gt_masks)),
        _scale(overlay(canvas, pred_masks)),
        image is not None and image.shape[:2] == (height, width),
    )


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
