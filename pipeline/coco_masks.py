"""COCO annotations' segmentations — polygons, uncompressed or compressed RLE — read as
pycocotools does: the ground truth evaluation compares with, and the labels training
rasterises."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def annotation_rle(annotation: dict, height: int, width: int):
    """COCO.annToRLE: polygons and uncompressed RLE → compressed RLE; compressed as is."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """A COCO annotation's mask as bool (H, W)."""
    return mask_utils.decode(annotation_rle(annotation, height, width)).astype(bool)
