"""The output schema (README.md, "Output (contract)"): one Parquet row per input image."""

from __future__ import annotations

import pyarrow as pa

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
