"""Encode: binary masks → compressed COCO RLE with bbox and area, in the output schema.

Two callers: the encode stage beside GPU actors, over rows whose masks arrive bit-packed
(`encode_batch`), and CPU actors, which encode their masks where the model left them
(`fortran_masks` → `encode_masks` → `segment_structs`), never packing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from ..models.segments import METADATA_FIELDS
from .masks import masks_per_chunk, unpack_masks
from .schema import OUTPUT_SCHEMA, SEGMENT_TYPE

# (RLE counts, areas, bboxes) of no masks.
NO_MASKS_ENCODED: tuple[list[str], np.ndarray, np.ndarray] = ([], np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
_SEGMENT_FIELDS = [field.name for field in SEGMENT_TYPE]


def fortran_masks(masks: np.ndarray) -> np.ndarray:
    """bool or uint8 {0, 1} (N, H, W) → uint8 (H, W, N) Fortran-ordered, the layout
    pycocotools' encoder takes."""
    return np.ascontiguousarray(masks.transpose(0, 2, 1)).view(np.uint8).transpose(2, 1, 0)


def encode_masks(masks: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """uint8 (H, W, N) Fortran-ordered masks → (RLE counts strings, areas int64 (N,), bboxes float32 (N, 4))."""
    if masks.shape[2] == 0:
        return NO_MASKS_ENCODED
    rles = mask_utils.encode(masks)
    counts = [rle["counts"].decode("ascii") for rle in rles]
    return counts, mask_utils.area(rles).astype(np.int64), mask_utils.toBbox(rles).astype(np.float32)


def joined_encodings(parts: list[tuple[list[str], np.ndarray, np.ndarray]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`encode_masks` results of consecutive chunks of an image's masks → the result for all."""
    if len(parts) == 1:
        return parts[0]
    return (
        [counts for part in parts for counts in part[0]],
        np.concatenate([part[1] for part in parts]),
        np.concatenate([part[2] for part in parts]),
    )


def encode_packed_masks(data: bytes, count: int, height: int, width: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`pack_masks` bytes of `count` (height, width) masks → `encode_masks`'s result, unpacking
    `masks_per_chunk` of them at a time."""
    step = masks_per_chunk(height, width)
    return joined_encodings(
        [encode_masks(unpack_masks(data, min(step, count - first), height, width, first)) for first in range(0, count, step)]
        or [NO_MASKS_ENCODED]
    )


def output_bboxes(boxes: Sequence, mask_bboxes: np.ndarray) -> np.ndarray:
    """float32 (N, 4) COCO [x, y, w, h] of an image's segments: a segment's own box (x0, y0,
    x1, y1) where the model predicted one (a detector's, as torchvision and detectron2 report
    it: w = x1 - x0 in float32), else its mask's box from the RLE (`mask_bboxes`)."""
    own = [index for index, box in enumerate(boxes) if box is not None]
    if not own:
        return mask_bboxes
    corners = np.asarray([boxes[index] for index in own], dtype=np.float32).reshape(-1, 4)
    bboxes = mask_bboxes.copy()
    bboxes[own] = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
    return bboxes


def segment_structs(metadata: Mapping[str, Sequence], encoded: tuple[list[str], np.ndarray, np.ndarray]) -> list[dict]:
    """One image's segments as SEGMENT_TYPE values: their metadata (`Segments.metadata`'s
    columns, in mask order; `boxes`: the model's own (x0, y0, x1, y1) or None, see
    `output_bboxes`) and `encode_masks`'s result for their masks."""
    counts, areas, mask_bboxes = encoded
    bboxes = output_bboxes(metadata["boxes"], mask_bboxes)
    return [
        dict(zip(_SEGMENT_FIELDS, values))
        for values in zip(
            metadata["category_ids"], metadata["labels"], metadata["scores"], bboxes.tolist(), areas.tolist(), counts,
            metadata["segment_ids"], metadata["iscrowd"], metadata["annotation_ids"],
        )  # fmt: skip
    ]


def output_table(rows: dict, segments: list[list[dict]]) -> pa.Table:
    """The output rows (OUTPUT_SCHEMA): `rows` holds the image columns (image_id, uri,
    width, height, status, error, model) as lists or arrays, `segments` each row's
    `segment_structs`."""
    columns = {field.name: rows[field.name] for field in OUTPUT_SCHEMA if field.name != "segments"}
    return pa.table({**columns, "segments": pa.array(segments, type=pa.list_(SEGMENT_TYPE))}, schema=OUTPUT_SCHEMA)


def encode_batch(batch: pa.Table) -> pa.Table:
    """Inference rows (segment metadata + packed masks) → output rows (OUTPUT_SCHEMA)."""
    columns = batch.to_pydict()
    segments = []
    for row in range(batch.num_rows):
        category_ids = columns["category_ids"][row]
        if not category_ids:
            segments.append([])
            continue
        encoded = encode_packed_masks(columns["masks"][row], len(category_ids), columns["height"][row], columns["width"][row])
        segments.append(segment_structs({name: columns[name][row] for name in METADATA_FIELDS}, encoded))
    return output_table({name: batch[name] for name in batch.column_names}, segments)
