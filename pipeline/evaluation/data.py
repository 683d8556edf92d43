"""Reading ground truth, joining predictions to it per image, and cutting the work into shards.

Predictions are the Parquet rows of a `rayseg segment` OUTPUT (pipeline/schema.py), read
by pipeline/run_reader.py. Ground
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

import pyarrow.parquet as pq

from ..run_reader import uri_tails
from ..storage import filesystem, full_uri
from .base import EvaluationError

TASKS = ("instance", "semantic", "panoptic")
# Examples of unmatched ids kept for the report, so a user can see why a join failed.
EXAMPLES = 5


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
