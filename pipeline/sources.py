"""Sources: an INPUT (directory or URI prefix) → a dataset of {image_id, uri}."""

from __future__ import annotations

import math
import posixpath

import pyarrow as pa
import ray

from .storage import filesystem, full_uri

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Rows per input block. Few, large blocks keep the driver's per-block overhead low; Ray
# Data splits blocks further when decoded images grow past its target block size.
ROWS_PER_BLOCK = 1000


class SourceError(ValueError):
    """An INPUT that names no images or cannot be read."""


def list_images(input_uri: str, storage_options: dict | None = None) -> pa.Table:
    """Every image file under a directory or URI prefix, recursively, sorted by path.

    Returns a table with `image_id` (the path relative to the input, '/'-separated) and
    `uri` (where to read it). Files with other extensions are skipped.
    """
    fs, root = filesystem(input_uri, storage_options)
    if not fs.exists(root):
        raise SourceError(f"input not found: {input_uri}")
    if not fs.isdir(root):
        raise SourceError(f"input is not a directory: {input_uri}")
    root = root.rstrip("/")
    paths = sorted(
        path for path in fs.find(root) if posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {input_uri}")
    return pa.table(
        {
            "image_id": [posixpath.relpath(path, root) for path in paths],
            "uri": [full_uri(fs, path) for path in paths],
        }
    )


def dataset_from_table(table: pa.Table, parallelism: int) -> ray.data.Dataset:
    """A Ray dataset of `table` in at least `parallelism` blocks (if it has that many rows)."""
    blocks = max(min(table.num_rows, parallelism), math.ceil(table.num_rows / ROWS_PER_BLOCK), 1)
    size = math.ceil(table.num_rows / blocks)
    return ray.data.from_arrow([table.slice(start, size) for start in range(0, table.num_rows, size)])


def read_source(
    input_uri: str, *, storage_options: dict | None = None, limit: int | None = None, parallelism: int = 2
) -> ray.data.Dataset:
    """The {image_id, uri} dataset for INPUT, optionally only its first `limit` images."""
    table = list_images(input_uri, storage_options)
    if limit is not None:
        table = table.slice(0, limit)
    return dataset_from_table(table, parallelism)
