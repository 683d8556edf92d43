"""Reading predictions and ground truth, joining them per image, and cutting the work into shards.

Predictions are the Parquet rows of a `rayseg segment` OUTPUT (pipeline/schema.py). Ground
truth is a COCO instances json, a COCO panoptic json + PNG directory, or a directory of
semantic label PNGs. A prediction's `image_id` is either the COCO image id (as a string)
or the image's path relative to the input ("000003.png"); it joins to the ground truth's
image by str(id) first, else by `file_name` (semantic: by the label PNG's relative path,
the image path with its extension replaced by `.png`).

Only the driver reads the small `image_id`/`status`/`uri` columns to plan the join; the
shards read their own rows, masks included, inside the Ray tasks.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..sink import RUN_FILE
from ..storage import filesystem, full_uri
from .base import EvaluationError, Prediction, RowLocation

PREDICTION_COLUMNS = ["image_id", "uri", "width", "height", "status", "error", "segments"]
TASKS = ("instance", "semantic", "panoptic")
# Examples of unmatched ids kept for the report, so a user can see why a join failed.
EXAMPLES = 5


# --- predictions ----------------------------------------------------------------------------


def prediction_files(predictions: str, storage_options: dict | None = None) -> tuple[Any, list[str]]:
    """(fsspec filesystem, sorted Parquet files) of a predictions OUTPUT directory or one file.

    A directory must hold a committed run (its `_run.json`): one still running, or one that
    died, is refused. Files under `_`- or `.`-prefixed directories (Ray's `_staging`) are not
    part of the run.
    """
    fs, root = filesystem(predictions, storage_options)
    if not fs.exists(root):
        raise EvaluationError(f"predictions not found: {predictions}")
    if not fs.isdir(root):
        return fs, [full_uri(fs, root)]
    if not fs.exists(posixpath.join(root, RUN_FILE)):
        raise EvaluationError(
            f"{predictions} holds no committed run ({RUN_FILE} missing): it is still running, or it "
            "stopped before committing (`rayseg segment --resume` finishes it)"
        )
    files = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root.rstrip("/") or "/")
        if path.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in relative.split("/")):
            files.append(path)
    if not files:
        raise EvaluationError(f"no Parquet files in {predictions}: is it a `rayseg segment` OUTPUT?")
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
    from ...models.registry import REGISTRY

    entry = REGISTRY.get(run.get("model"))
    if entry is None:
        return None
    options = ((run.get("spec") or {}).get("model") or {}).get("options") or {}
    task = options.get("task") or entry.task
    return "instance" if task == "promptable" else task


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
        raise EvaluationError("a segment's bbox is not [x, y, w, h]")
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


# --- ground truth ---------------------------------------------------------------------------


@dataclass
class InstanceImage:
    """Ground truth of one image for instance evaluation (COCO instances)."""

    id: Any
    order: int  # rank of `id` among all ground-truth image ids: COCOeval's image order
    file_name: str
    height: int
    width: int
    annotations: list[dict]


@dataclass
class PanopticImage:
    """Ground truth of one image for panoptic evaluation (COCO panoptic)."""

    id: Any
    file_name: str
    png: str  # full path or URI of the panoptic PNG
    height: int | None
    width: int | None
    segments_info: list[dict]


@dataclass
class SemanticImage:
    """Ground truth of one image for semantic evaluation: its label PNG."""

    key: str  # path relative to the label directory
    png: str


@dataclass
class GroundTruth:
    """A loaded ground truth: per-image records by key, categories, and how to join to it."""

    task: str
    source: str
    images: dict  # key → InstanceImage | PanopticImage | SemanticImage
    categories: list[dict]
    by_id: dict[str, Any] = field(default_factory=dict)
    by_file: dict[str, Any] = field(default_factory=dict)

    def match(self, image_id: str, uri: str | None) -> Any | None:
        """The ground-truth key of a prediction row, or None."""
        if self.task == "semantic":
            for candidate in _label_png_candidates(image_id, uri):
                if candidate in self.images:
                    return candidate
            return None
        key = self.by_id.get(image_id)
        if key is None:
            key = self.by_file.get(image_id)
        for tail in uri_tails(uri) if key is None else ():
            key = self.by_file.get(tail)
            if key is not None:
                break
        return key


def uri_tails(uri: str | None, depth: int = 3) -> list[str]:
    """The last 1…`depth` '/'-separated parts of `uri`, shortest first: what a COCO
    `file_name` ("0001.jpg", "train/0001.jpg") may be, for rows whose image_id is not (a
    manifest's own ids)."""
    parts = (uri or "").rstrip("/").split("/")
    return ["/".join(parts[-count:]) for count in range(1, min(depth, len(parts)) + 1) if parts[-1]]


def _label_png_candidates(image_id: str, uri: str | None) -> list[str]:
    candidates = [posixpath.splitext(image_id.lstrip("/"))[0] + ".png"]
    if uri:
        candidates.append(posixpath.splitext(posixpath.basename(uri))[0] + ".png")
    return candidates


def infer_task(annotations: str, storage_options: dict | None = None) -> str:
    """instance (COCO instances json), panoptic (COCO panoptic json) or semantic (directory of PNGs)."""
    fs, path = filesystem(annotations, storage_options)
    if not fs.exists(path):
        raise EvaluationError(f"annotations not found: {annotations}")
    if fs.isdir(path):
        return "semantic"
    data = _load_json(fs, path, annotations)
    return _json_task(data, annotations)


def _json_task(data: Any, source: str) -> str:
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise EvaluationError(f"{source} is not a COCO json (needs images and annotations)")
    annotations = data["annotations"]
    if annotations and "segments_info" in annotations[0]:
        return "panoptic"
    if not annotations and any("isthing" in c for c in data.get("categories", [])):
        return "panoptic"
    return "instance"


def _load_json(fs, path: str, source: str) -> Any:
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{source} is not valid json: {e}") from None


def load_ground_truth(
    annotations: str,
    task: str,
    *,
    storage_options: dict | None = None,
    panoptic_root: str | None = None,
) -> GroundTruth:
    """Loads the ground truth of `task` (see the module docstring for the formats)."""
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    fs, path = filesystem(annotations, storage_options)
    if not fs.exists(path):
        raise EvaluationError(f"annotations not found: {annotations}")
    if task == "semantic":
        if not fs.isdir(path):
            raise EvaluationError(f"semantic ground truth is a directory of label PNGs; {annotations} is a file")
        root = path.rstrip("/")
        images = {}
        for file in sorted(fs.find(root)):
            if file.lower().endswith(".png"):
                key = posixpath.relpath(file, root)
                images[key] = SemanticImage(key, full_uri(fs, file))
        if not images:
            raise EvaluationError(f"no label PNGs in {annotations}")
        return GroundTruth("semantic", annotations, images, categories=[])
    if fs.isdir(path):
        raise EvaluationError(f"{task} ground truth is a COCO json file; {annotations} is a directory")
    data = _load_json(fs, path, annotations)
    found = _json_task(data, annotations)
    if found != task:
        raise EvaluationError(f"{annotations} holds {found} annotations, not {task}")
    categories = list(data.get("categories", []))
    if task == "instance":
        return _instance_ground_truth(data, annotations, categories)
    root = panoptic_root or _default_panoptic_root(annotations)
    return _panoptic_ground_truth(data, annotations, categories, root)


def _default_panoptic_root(annotations: str) -> str:
    """panopticapi's convention: PNGs in the directory named like the json without `.json`."""
    return annotations[: -len(".json")] if annotations.endswith(".json") else annotations + "_png"


def _image_indexes(images: list[dict]) -> tuple[dict, dict]:
    by_id = {str(image["id"]): image["id"] for image in images}
    by_file = {}
    for image in images:
        if "file_name" in image:
            by_file.setdefault(image["file_name"], image["id"])
    return by_id, by_file


def _instance_ground_truth(data: dict, source: str, categories: list[dict]) -> GroundTruth:
    images = data["images"]
    order = {image_id: rank for rank, image_id in enumerate(sorted({image["id"] for image in images}))}
    by_image: dict[Any, list[dict]] = {image["id"]: [] for image in images}
    for annotation in data["annotations"]:
        if annotation.get("image_id") in by_image:
            by_image[annotation["image_id"]].append(annotation)
    records = {
        image["id"]: InstanceImage(
            id=image["id"],
            order=order[image["id"]],
            file_name=image.get("file_name", str(image["id"])),
            height=int(image["height"]),
            width=int(image["width"]),
            annotations=by_image[image["id"]],
        )
        for image in images
    }
    by_id, by_file = _image_indexes(images)
    return GroundTruth("instance", source, records, categories, by_id, by_file)


def _panoptic_ground_truth(data: dict, source: str, categories: list[dict], root: str) -> GroundTruth:
    images = {image["id"]: image for image in data["images"]}
    records = {}
    for annotation in data["annotations"]:
        image = images.get(annotation["image_id"])
        if image is None:
            continue
        records[image["id"]] = PanopticImage(
            id=image["id"],
            file_name=image.get("file_name", str(image["id"])),
            png=posixpath.join(root.rstrip("/"), annotation["file_name"]),
            height=image.get("height"),
            width=image.get("width"),
            segments_info=annotation["segments_info"],
        )
    by_id, by_file = _image_indexes([image for image in data["images"] if image["id"] in records])
    return GroundTruth("panoptic", source, records, categories, by_id, by_file)


# --- the join and the shards ----------------------------------------------------------------


@dataclass
class Shard:
    """One task's work: rows (file, row group, row indices) and the aligned ground truth."""

    parts: list[tuple[str, int, list[int]]]
    ground_truths: list[Any]

    def __len__(self) -> int:
        return len(self.ground_truths)


@dataclass
class Coverage:
    """How predictions and ground truth joined (the report's 'images' section)."""

    ground_truth_images: int = 0
    prediction_rows: int = 0
    evaluated: int = 0
    error_rows: int = 0
    duplicate_rows: int = 0
    gt_without_prediction: int = 0
    predictions_without_gt: int = 0
    examples_without_gt: list[str] = field(default_factory=list)
    examples_gt_without_prediction: list[str] = field(default_factory=list)
    examples_error: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_shards(
    fs, files: list[str], ground_truth: GroundTruth, shard_rows: int
) -> tuple[list[Shard], Coverage]:
    """Joins prediction rows to ground-truth images and groups the joined rows into shards.

    Reads only the image_id/status/uri columns. A ground-truth image with several rows
    is evaluated once, with its first row (the others are counted as duplicates).
    """
    coverage = Coverage(ground_truth_images=len(ground_truth.images))
    matched: set = set()
    shards: list[Shard] = []
    parts: list[tuple[str, int, list[int]]] = []
    gts: list[Any] = []

    def flush() -> None:
        nonlocal parts, gts
        if gts:
            shards.append(Shard(parts, gts))
        parts, gts = [], []

    for file in files:
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            for row_group in range(parquet.metadata.num_row_groups):
                table = parquet.read_row_group(row_group, columns=["image_id", "status", "uri"])
                ids = table.column("image_id").to_pylist()
                statuses = table.column("status").to_pylist()
                uris = table.column("uri").to_pylist()
                rows: list[int] = []
                for row, (image_id, status, uri) in enumerate(zip(ids, statuses, uris)):
                    coverage.prediction_rows += 1
                    key = ground_truth.match(image_id, uri)
                    if key is None:
                        coverage.predictions_without_gt += 1
                        if len(coverage.examples_without_gt) < EXAMPLES:
                            coverage.examples_without_gt.append(image_id)
                        continue
                    if key in matched:
                        coverage.duplicate_rows += 1
                        continue
                    matched.add(key)
                    if status != "ok":
                        coverage.error_rows += 1
                        if len(coverage.examples_error) < EXAMPLES:
                            coverage.examples_error.append(image_id)
                    rows.append(row)
                    gts.append(ground_truth.images[key])
                    if len(gts) >= shard_rows:
                        parts.append((file, row_group, rows))
                        rows = []
                        flush()
                if rows:
                    parts.append((file, row_group, rows))
    flush()
    coverage.evaluated = len(matched)
    coverage.gt_without_prediction = len(ground_truth.images) - len(matched)
    for key in ground_truth.images:
        if len(coverage.examples_gt_without_prediction) >= EXAMPLES:
            break
        if key not in matched:
            coverage.examples_gt_without_prediction.append(str(key))
    return shards, coverage
