"""Encode: packed binary masks → compressed COCO RLE with bbox and area, in the output schema."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from .masks import unpack_masks
from .schema import OUTPUT_SCHEMA, SEGMENT_TYPE


def encode_masks(masks: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """uint8 (H, W, N) Fortran-ordered masks → (RLE counts strings, areas int64 (N,), bboxes float32 (N, 4))."""
    rles = mask_utils.encode(masks)
    counts = [rle["counts"].decode("ascii") for rle in rles]
    return counts, mask_utils.area(rles).astype(np.int64), mask_utils.toBbox(rles).astype(np.float32)


def encode_batch(batch: pa.Table) -> pa.Table:
    """Inference rows (segment metadata + packed masks) → output rows (OUTPUT_SCHEMA)."""
    columns = batch.to_pydict()
    segments = []
    for row in range(batch.num_rows):
        category_ids = columns["category_ids"][row]
        if not category_ids:
            segments.append([])
            continue
        height, width = columns["height"][row], columns["width"][row]
        masks = unpack_masks(columns["masks"][row], len(category_ids), height, width)
        counts, areas, bboxes = encode_masks(masks)
        segments.append(
            [
                {
                    "category_id": category_id,
                    "label": label,
                    "score": score,
                    "bbox": bbox,
                    "area": area,
                    "rle": rle,
                    "segment_id": segment_id,
                    "iscrowd": iscrowd,
                    "annotation_id": annotation_id,
                }
                for category_id, label, score, bbox, area, rle, segment_id, iscrowd, annotation_id in zip(
                    category_ids,
                    columns["labels"][row],
                    columns["scores"][row],
                    bboxes.tolist(),
                    areas.tolist(),
                    counts,
                    columns["segment_ids"][row],
                    columns["iscrowd"][row],
                    columns["annotation_ids"][row],
                )
            ]
        )
    return pa.table(
        {
            "image_id": batch["image_id"],
            "uri": batch["uri"],
            "width": batch["width"],
            "height": batch["height"],
            "status": batch["status"],
            "error": batch["error"],
            "model": batch["model"],
            "segments": pa.array(segments, type=pa.list_(SEGMENT_TYPE)),
        },
        schema=OUTPUT_SCHEMA,
    )
