"""Reading ground truth, joining predictions to it per image, and cutting the work into shards.

Predictions are the Parquet rows of a `rayseg segment` OUTPUT (pipeline/schema.py), read
by pipeline/run_reader.py. Ground
truth is a COCO instances json, a COCO panoptic json + PNG directory, or a directory of
semantic label PNGs. A prediction's `image_id` is either the COCO image id (as a string)
or the image's path relative to the input ("000003.png"); it joins to the ground truth's
image by str(id) first, else by `file_name` (semantic: by the label PNG's relative path,
the image path with its extension replaced by `.png`).

Only the driver reads the small `image_id`/`status`/`uri` columns to plan the join, a batch
at a time, and hands out each shard as soon as it is complete (`iter_shards`): it holds the
ground truth's index (a COCO json's records; a label directory's sorted paths,
`SemanticLabels`) and the shards in flight, nothing per prediction row. The shards read their own rows, masks included, inside the Ray tasks.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..run_reader import uri_tails
from ..sources import list_images
from ..storage import filesystem
from .base import EvaluationError

TASKS = ("instance", "semantic", "panoptic")
# Label paths turned into bytes at once: their Python strings cost ~60 bytes each meanwhile.
LABEL_CHUNK = 65_536
# Examples of unmatched ids kept for the report, so a user can see why a join failed.
EXAMPLES = 5
# Rows of the join columns read at once: a row group of Ray's output can hold 200k rows,
# whose ids, statuses and uris as Python strings would cost ~40 MB at once.
PLAN_BATCH_ROWS = 8192


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
    position: int = -1  # index among GroundTruth.images (set there)


@dataclass
class PanopticImage:
    """Ground truth of one image for panoptic evaluation (COCO panoptic)."""

    id: Any
    file_name: str
    png: str  # full path or URI of the panoptic PNG
    height: int | None
    width: int | None
    segments_info: list[dict]
    position: int = -1  # index among GroundTruth.images (set there)


@dataclass
class SemanticImage:
    """Ground truth of one image for semantic evaluation: its label PNG."""

    key: str  # path relative to the label directory
    png: str
    position: int = -1  # index among GroundTruth.images (set there)


class SemanticLabels(Mapping):
    """A directory's label PNGs by relative path, as one sorted array of the paths' UTF-8
    bytes: ~20 bytes an image where a dict of records took ~800 (777 MiB at a million
    images, BENCHMARKS.md, issue 25). Records are made when looked up."""

    def __init__(self, root: str, keys: np.ndarray):
        """root: the directory's URI; keys: sorted bytes (numpy 'S') of the paths below it."""
        self.root, self.keys = root.rstrip("/"), keys

    def _position(self, key: str) -> int:
        if not isinstance(key, str):
            return -1
        encoded = key.encode("utf-8", "surrogateescape")
        position = int(np.searchsorted(self.keys, encoded))
        return position if position < len(self.keys) and self.keys[position] == encoded else -1

    def __getitem__(self, key: str) -> SemanticImage:
        position = self._position(key)
        if position < 0:
            raise KeyError(key)
        return SemanticImage(key, f"{self.root}/{key}", position)

    def __contains__(self, key) -> bool:
        return self._position(key) >= 0

    def __iter__(self) -> Iterator[str]:
        for key in self.keys:
            yield key.decode("utf-8", "surrogateescape")

    def __len__(self) -> int:
        return len(self.keys)


def _semantic_labels(annotations: str, storage_options: dict | None) -> SemanticLabels:
    """The label PNGs under a directory, listed as `rayseg segment` lists its input (streamed,
    sorted by path), their paths kept as bytes a chunk at a time."""
    listing = list_images(annotations, storage_options)
    listing = listing.filter(pc.and_(pc.is_null(listing["error"]), pc.ends_with(pc.utf8_lower(listing["image_id"]), ".png")))
    root = listing["uri"][0].as_py()[: -len(listing["image_id"][0].as_py())] if listing.num_rows else annotations
    ids = listing["image_id"]
    del listing
    chunks = [
        pc.cast(ids.slice(start, LABEL_CHUNK), pa.binary()).to_numpy(zero_copy_only=False).astype(bytes)
        for start in range(0, len(ids), LABEL_CHUNK)
    ]
    width = max((chunk.dtype.itemsize for chunk in chunks), default=1)
    keys = np.concatenate([chunk.astype(f"S{width}") for chunk in chunks]) if chunks else np.array([], dtype="S1")
    return SemanticLabels(root, keys)


@dataclass
class GroundTruth:
    """A loaded ground truth: per-image records by key, categories, and how to join to it."""

    task: str
    source: str
    images: dict  # key → InstanceImage | PanopticImage | SemanticImage
    categories: list[dict]
    by_id: dict[str, Any] = field(default_factory=dict)
    by_file: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each record's index, so the join marks matched images in a bool array (1 byte an
        # image) rather than a set of keys (~32 bytes an image at a million). Label PNGs
        # know theirs (SemanticLabels).
        if isinstance(self.images, SemanticLabels):
            return
        for position, record in enumerate(self.images.values()):
            record.position = position

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
        images = _semantic_labels(annotations, storage_options)
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


def iter_shards(fs, files: list[str], ground_truth: GroundTruth, shard_rows: int, coverage: Coverage) -> Iterator[Shard]:
    """Joins prediction rows to ground-truth images and yields the joined rows in shards of
    `shard_rows` (the last one smaller), each as soon as it is complete.

    Reads only the image_id/status/uri columns, PLAN_BATCH_ROWS rows at a time. A
    ground-truth image with several rows is evaluated once, with its first row (the others
    are counted as duplicates). `coverage` (fresh, from the caller) is counted as rows are
    read and complete once the generator is exhausted.
    """
    coverage.ground_truth_images = len(ground_truth.images)
    matched = np.zeros(len(ground_truth.images), dtype=bool)
    parts: list[tuple[str, int, list[int]]] = []
    gts: list[Any] = []
    for file in files:
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            for row_group in range(parquet.metadata.num_row_groups):
                rows: list[int] = []
                first = 0  # the batch's first row within the row group
                for batch in parquet.iter_batches(batch_size=PLAN_BATCH_ROWS, row_groups=[row_group], columns=["image_id", "status", "uri"]):
                    ids = batch.column("image_id").to_pylist()
                    statuses = batch.column("status").to_pylist()
                    uris = batch.column("uri").to_pylist()
                    row_numbers = range(first, first + batch.num_rows)
                    first += batch.num_rows
                    for row, image_id, status, uri in zip(row_numbers, ids, statuses, uris):
                        coverage.prediction_rows += 1
                        key = ground_truth.match(image_id, uri)
                        if key is None:
                            coverage.predictions_without_gt += 1
                            if len(coverage.examples_without_gt) < EXAMPLES:
                                coverage.examples_without_gt.append(image_id)
                            continue
                        record = ground_truth.images[key]
                        if matched[record.position]:
                            coverage.duplicate_rows += 1
                            continue
                        matched[record.position] = True
                        if status != "ok":
                            coverage.error_rows += 1
                            if len(coverage.examples_error) < EXAMPLES:
                                coverage.examples_error.append(image_id)
                        rows.append(row)
                        gts.append(record)
                        if len(gts) >= shard_rows:
                            parts.append((file, row_group, rows))
                            yield Shard(parts, gts)
                            parts, gts, rows = [], [], []
                if rows:
                    parts.append((file, row_group, rows))
    if gts:
        yield Shard(parts, gts)
    coverage.evaluated = int(matched.sum())
    coverage.gt_without_prediction = len(ground_truth.images) - coverage.evaluated
    for key, record in ground_truth.images.items():
        if len(coverage.examples_gt_without_prediction) >= EXAMPLES:
            break
        if not matched[record.position]:
            coverage.examples_gt_without_prediction.append(str(key))
