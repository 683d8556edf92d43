"""The output schema (README.md, "Output (contract)"): one Parquet row per input image."""

from __future__ import annotations

import pyarrow as pa

from ..models.segments import METADATA_FIELDS

SEGMENT_TYPE = pa.struct(
    [
        pa.field("category_id", pa.int32(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("bbox", pa.list_(pa.float32()), nullable=False),  # [x, y, w, h], COCO
        pa.field("area", pa.int64(), nullable=False),
        pa.field("rle", pa.string(), nullable=False),  # compressed COCO RLE counts, size [h, w]
        pa.field("segment_id", pa.int32()),  # panoptic only
        pa.field("iscrowd", pa.bool_(), nullable=False),
        pa.field("annotation_id", pa.int64()),  # prompted only: the prompt's source annotation
    ]
)

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("segments", pa.list_(SEGMENT_TYPE), nullable=False),
    ]
)

STATUS_OK = "ok"
STATUS_ERROR = "error"

# What crosses from a GPU inference actor to the encode stage: the row's identity and
# status, each segment's metadata as lists (`Segments.metadata`, in its order), and all of
# a row's masks as one packed binary value (pipeline/masks.py).
_METADATA_TYPES = {
    "category_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.string()),
    "scores": pa.list_(pa.float32()),
    "segment_ids": pa.list_(pa.int32()),
    "iscrowd": pa.list_(pa.bool_()),
    "annotation_ids": pa.list_(pa.int64()),
    "boxes": pa.list_(pa.list_(pa.float32())),  # per segment (x0, y0, x1, y1) or null
}
INFERENCE_SCHEMA = pa.schema(
    [
        *(field for field in OUTPUT_SCHEMA if field.name != "segments"),
        *(pa.field(name, _METADATA_TYPES[name]) for name in METADATA_FIELDS),
        pa.field("masks", pa.binary()),
    ]
)
