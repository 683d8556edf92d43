"""Reading what pipeline/sink.py commits: a `rayseg segment` OUTPUT's Parquet rows as
Prediction objects, and its `_run.json`; evaluation and the exports read runs through here.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .sink import RUN_FILE, OutputError
from .storage import filesystem, full_uri

log = logging.getLogger("rayseg.pipeline")

PREDICTION_COLUMNS = ["image_id", "uri", "width", "height", "status", "error", "segments"]


@dataclass(frozen=True)
class RowLocation:
    """Where a prediction row lives: Parquet file, row group, row within the group."""

    file: str
    row_group: int
    row: int


@dataclass
class Prediction:
    """One prediction row (OUTPUT_SCHEMA), its segments as columns.

    score is the stored float32 widened to float64 (exactly), bbox (n, 4) [x, y, w, h].
    """

    image_id: str
    uri: str | None
    height: int | None
    width: int | None
    status: str
    error: str | None
    category_id: np.ndarray
    label: list
    score: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    rle: list
    segment_id: list
    iscrowd: np.ndarray
    location: RowLocation | None = None

    def __len__(self) -> int:
        return len(self.rle)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def rle_dict(self, index: int) -> dict:
        """Segment `index` as a pycocotools RLE object."""
        return {"size": [int(self.height), int(self.width)], "counts": self.rle[index]}

    def without_segments(self) -> "Prediction":
        """The same row with no segments (error rows, rows whose size contradicts the ground truth)."""
        return Prediction(
            self.image_id,
            self.uri,
            self.height,
            self.width,
            self.status,
            self.error,
            np.zeros(0, np.int64),
            [],
            np.zeros(0, np.float64),
            np.zeros((0, 4), np.float64),
            np.zeros(0, np.int64),
            [],
            [],
            np.zeros(0, bool),
            self.location,
        )


def prediction_files(predictions: str, storage_options: dict | None = None) -> tuple[Any, list[str]]:
    """(fsspec filesystem, sorted Parquet files) of a predictions OUTPUT directory or one file.

    A directory must hold a committed run (its `_run.json`): one still running, or one that
    died, is refused. Files under `_`- or `.`-prefixed directories (Ray's `_staging`) are not
    part of the run.
    """
    fs, root = filesystem(predictions, storage_options)
    if not fs.exists(root):
        raise OutputError(f"predictions not found: {predictions}")
    if not fs.isdir(root):
        return fs, [full_uri(fs, root)]
    if not fs.exists(posixpath.join(root, RUN_FILE)):
        raise OutputError(
            f"{predictions} holds no committed run ({RUN_FILE} missing): it is still running, or it "
            "stopped before committing (`rayseg segment --resume` finishes it)"
        )
    files = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root.rstrip("/") or "/")
        if path.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in relative.split("/")):
            files.append(path)
    if not files:
        raise OutputError(f"no Parquet files in {predictions}: is it a `rayseg segment` OUTPUT?")
    # Full URIs: shards reopen them in other processes, where only the URI names the filesystem.
    return fs, [full_uri(fs, path) for path in sorted(files)]


def read_run_info(predictions: str, storage_options: dict | None = None) -> dict:
    """The run's `_run.json` (model, weights, sha256, run id), or {} when there is none."""
    fs, root = filesystem(predictions, storage_options)
    path = posixpath.join(root if fs.isdir(root) else posixpath.dirname(root), RUN_FILE)
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def run_task(run: dict) -> str | None:
    """The kind of segments a run's `_run.json` says it produced: its model's `task` option,
    else the registry's task for it (a promptable model's masks are instances); None for a
    model the registry does not know."""
    from ..models.registry import REGISTRY

    entry = REGISTRY.get(run.get("model"))
    if entry is None:
        return None
    options = ((run.get("spec") or {}).get("model") or {}).get("options") or {}
    task = options.get("task") or entry.task
    return "instance" if task == "promptable" else task


# What becomes of a run used as another kind than it produced, and what to do instead.
_OTHER_TASK_CONSEQUENCES = {
    "evaluated": "the numbers mean little (evaluate against {produced} ground truth, or run a model "
    "that gives {task} predictions: `rayseg models`)",
    "exported": "every segment becomes a detection of its class, `background` and other stuff classes "
    "too (`rayseg export panoptic` keeps stuff apart, or run a model that gives {task} predictions: "
    "`rayseg models`)",
}


def warn_if_other_task(predictions: str, run: dict, task: str, done: str = "evaluated") -> str | None:
    """Warns (logging) when `run` (the `_run.json` of `predictions`) says its model produced
    another kind of segments than `task`, the kind they are `done` as ("evaluated" or
    "exported"); returns the kind the run produced (None when the registry does not know)."""
    produced = run_task(run)
    if produced not in (None, task):
        log.warning(
            "%s holds %s predictions but is %s as %s: %s",
            predictions, produced, done, task, _OTHER_TASK_CONSEQUENCES[done].format(produced=produced, task=task),
        )  # fmt: skip
    return produced


def read_predictions(fs, parts: list[tuple[str, int, list[int]]]) -> list[Prediction]:
    """The rows at (file, row group, row indices) parts, in that order, with their segments."""
    predictions: list[Prediction] = []
    for file, row_group, rows in parts:
        with fs.open(file, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(row_group, columns=PREDICTION_COLUMNS)
        first = min(rows)
        table = table.slice(first, max(rows) - first + 1)
        converted = predictions_from_table(table)
        for row in rows:
            prediction = converted[row - first]
            prediction.location = RowLocation(file, row_group, row)
            predictions.append(prediction)
    return predictions


def predictions_from_table(table: pa.Table, locations: list[RowLocation] | None = None) -> list[Prediction]:
    """OUTPUT_SCHEMA rows → Prediction objects, segments converted column by column."""
    columns = {name: table.column(name).to_pylist() for name in ("image_id", "uri", "width", "height", "status", "error")}
    segments = table.column("segments").combine_chunks()
    offsets = _numpy(segments.offsets, np.int64)
    offsets = offsets - offsets[0]
    values = segments.flatten()
    fields = dict(zip([f.name for f in values.type], values.flatten()))
    count = len(values)
    category_id = _numpy(fields["category_id"], np.int64)
    score = _numpy(fields["score"], np.float64)
    area = _numpy(fields["area"], np.int64)
    iscrowd = _numpy(fields["iscrowd"], bool)
    boxes = fields["bbox"]
    box_offsets = _numpy(boxes.offsets, np.int64)
    if count and not (np.diff(box_offsets) == 4).all():
        raise OutputError("a segment's bbox is not [x, y, w, h]")
    bbox = _numpy(boxes.flatten(), np.float64).reshape(count, 4)
    rle = fields["rle"].to_pylist()
    label = fields["label"].to_pylist()
    segment_id = fields["segment_id"].to_pylist()
    rows = []
    for i in range(table.num_rows):
        a, b = offsets[i], offsets[i + 1]
        rows.append(
            Prediction(
                image_id=columns["image_id"][i],
                uri=columns["uri"][i],
                height=columns["height"][i],
                width=columns["width"][i],
                status=columns["status"][i],
                error=columns["error"][i],
                category_id=category_id[a:b],
                label=label[a:b],
                score=score[a:b],
                bbox=bbox[a:b],
                area=area[a:b],
                rle=rle[a:b],
                segment_id=segment_id[a:b],
                iscrowd=iscrowd[a:b],
                location=locations[i] if locations else None,
            )
        )
    return rows


_NUMPY_TYPES = {
    pa.int8(): np.int8,
    pa.int16(): np.int16,
    pa.int32(): np.int32,
    pa.int64(): np.int64,
    pa.uint8(): np.uint8,
    pa.uint16(): np.uint16,
    pa.uint32(): np.uint32,
    pa.uint64(): np.uint64,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
}


def _numpy(array: pa.Array, dtype) -> np.ndarray:
    """A primitive Arrow array as numpy (nulls as 0), read from its buffer.

    (pyarrow's own to_numpy imports pandas, a third of a second in every fresh worker.)
    """
    if array.null_count:
        array = pc.fill_null(array, False if pa.types.is_boolean(array.type) else 0)
    n, offset = len(array), array.offset
    data = array.buffers()[1]
    if data is None or n == 0:
        return np.zeros(n, dtype=dtype)
    if pa.types.is_boolean(array.type):
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        return bits[offset : offset + n].astype(dtype)
    values = np.frombuffer(data, dtype=_NUMPY_TYPES[array.type])[offset : offset + n]
    return values.astype(dtype)


def uri_tails(uri: str | None, depth: int = 3) -> list[str]:
    """The last 1…`depth` '/'-separated parts of `uri`, shortest first: what a COCO
    `file_name` ("0001.jpg", "train/0001.jpg") may be, for rows whose image_id is not (a
    manifest's own ids)."""
    parts = (uri or "").rstrip("/").split("/")
    return ["/".join(parts[-count:]) for count in range(1, min(depth, len(parts)) + 1) if parts[-1]]
