"""Exports of a predictions OUTPUT to COCO formats.

- `export_coco_results`: the COCO *results* format — a list of {image_id, category_id,
  segmentation {size, counts}, bbox, score} — that `COCO.loadRes` and COCOeval take.
  image_id must be the COCO image id: prediction ids that are file names ("000003.png")
  are mapped through the ground truth's `images` (`annotations=`), by str(id) then
  file_name, the same join `rayseg evaluate` uses.
  With the bbox present, `COCO.loadRes` takes the *box* area for the area ranges of segm
  evaluation too, as `rayseg evaluate` does by default (`--segm-area box`); its
  `--segm-area mask` equals loadRes of the export without the bbox key.
  A run whose `_run.json` says it produced semantic (or panoptic) segments is exported all
  the same, each segment a detection, with the warning `rayseg evaluate` gives such a run.
- `export_coco_dataset`: a COCO *dataset* of the predictions — images (id, file_name,
  width, height, plus the row's uri), categories from the segments' labels (and, for a run
  that names its categories in `_run.json` — a text-prompted run: one per phrase — every
  one of those, found or not), annotations
  with RLE segmentation, area, bbox, iscrowd and score — for re-labelling tools.

Both stream: rows are read BATCH_ROWS at a time and written as they come, and nothing is
kept per row across batches, so memory does not grow with the number of rows. Rows with
status "error" have no predictions and are left out (counted in the summary).

An image is exported once, from its first row (later rows of the same COCO id, or for the
dataset of the same image_id, are counted as duplicates). Remembering every id exported
would hold a Python object per row (about 100 MB per million rows); instead a first pass
over the small columns hashes each row's ids (8 bytes a row, freed after the pass, as
pipeline/repeated_ids.py does for the sink) and only the ids whose hashes repeat are
remembered, as themselves, so the result is exact whatever the hashes collide on.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .repeated_ids import id_hashes, repeated_hashes
from .run_reader import (
    PREDICTION_COLUMNS,
    Prediction,
    prediction_files,
    predictions_from_table,
    read_run_info,
    uri_tails,
    warn_if_other_task,
)
from .storage import filesystem, full_uri, move, remove

# Rows converted to Prediction objects at once: 2.3 KB each with 3 segments (measured), so a
# batch costs ~10 MB whatever the files' row groups are (a 200k-row group read whole: 470 MB).
BATCH_ROWS = 4096


class ExportError(ValueError):
    """Predictions that cannot be exported as asked (e.g. file-name ids without ground truth)."""


@dataclass
class ExportSummary:
    output: str
    rows: int = 0
    images: int = 0
    annotations: int = 0
    categories: int = 0
    error_rows: int = 0
    without_ground_truth: int = 0
    duplicate_rows: int = 0
    examples_without_ground_truth: list[str] = field(default_factory=list)


class ImageIds:
    """Prediction image_id → COCO image (id, file_name, width, height).

    With a ground-truth json: its images, matched by str(id) then by file_name. Without:
    numeric ids are the COCO ids; other ids get `assign`ed sequential ids (dataset export)
    or are an error (results export, where ids must match someone's ground truth).
    """

    def __init__(
        self,
        annotations: str | None = None,
        storage_options: dict | None = None,
        *,
        assign: bool = False,
        first_assigned: int = 1,
    ) -> None:
        self.assign = assign
        self.first_assigned = first_assigned
        self.by_id: dict[str, dict] = {}
        self.by_file: dict[str, dict] = {}
        self.restart()
        self.has_ground_truth = annotations is not None
        if annotations is not None:
            fs, path = filesystem(annotations, storage_options)
            if not fs.exists(path):
                raise ExportError(f"annotations not found: {annotations}")
            if fs.isdir(path):  # label PNGs: they name no image ids
                raise ExportError(f"{annotations} is a directory: --annotations takes a COCO instances or panoptic json")
            with fs.open(path, "r") as f:
                try:
                    data = json.load(f)
                except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                    raise ExportError(f"{annotations} is not valid JSON: {e}") from None
            if not isinstance(data, dict) or "images" not in data:
                raise ExportError(f"{annotations} is not a COCO json (no images)")
            for image in data["images"]:
                self.by_id[str(image["id"])] = image
                if "file_name" in image:
                    self.by_file.setdefault(image["file_name"], image)
            self.categories = {c["id"]: c for c in data.get("categories", [])}
        else:
            self.categories = {}

    def restart(self) -> None:
        """Forget the ids assigned so far: a second pass over the same rows assigns the same ones."""
        self.next_assigned = self.first_assigned
        # Only ids that may name several rows (`lookup`'s `repeated`) are remembered.
        self.assigned: dict[str, int] = {}

    def _ground_truth_image(self, image_id: str, uri: str | None) -> dict | None:
        image = self.by_id.get(image_id) or self.by_file.get(image_id)
        for tail in uri_tails(uri) if image is None else ():
            image = self.by_file.get(tail)
            if image is not None:
                break
        return image

    def key(self, image_id: str, uri: str | None):
        """The COCO id a row with this image_id and uri is exported under, as `lookup` gives
        it; None for a row without ground truth, and for an id that gets one assigned (those
        are distinct per image_id, so they repeat only where the image_id does)."""
        if self.has_ground_truth:
            image = self._ground_truth_image(image_id, uri)
            return None if image is None else image["id"]
        if _is_coco_id(image_id):
            return int(image_id)
        if self.assign:
            return None
        raise ExportError(
            f"prediction image_id {image_id!r} is not a COCO image id; pass the ground-truth json "
            "(--annotations GT.json) to map file names to ids"
        )

    def lookup(self, prediction: Prediction, repeated: bool = True) -> dict | None:
        """{id, file_name, width, height} of the row's image, or None when it has no ground truth.

        repeated: whether other rows may have this image_id; an id assigned to one that
        cannot is not remembered (it never comes again), so assigning costs no memory per row.
        """
        image_id = prediction.image_id
        if self.has_ground_truth:
            image = self._ground_truth_image(image_id, prediction.uri)
            if image is None:
                return None
            return {
                "id": image["id"],
                "file_name": image.get("file_name", image_id),
                "width": image.get("width", prediction.width),
                "height": image.get("height", prediction.height),
            }
        number = self.key(image_id, prediction.uri)
        if number is not None:
            file_name = posixpath.basename(prediction.uri) if prediction.uri else image_id
        else:
            number = self.assigned.get(image_id) if repeated else None
            if number is None:
                number, self.next_assigned = self.next_assigned, self.next_assigned + 1
                if repeated:
                    self.assigned[image_id] = number
            file_name = image_id
        return {"id": number, "file_name": file_name, "width": prediction.width, "height": prediction.height}


def dataset_image_ids(predictions: str, annotations: str | None, storage_options: dict | None = None) -> ImageIds:
    """The ImageIds of an export that numbers every image (dataset, panoptic): GT's ids, else
    numeric ids kept and the others numbered from above the largest of them."""
    first_assigned = 1 if annotations is not None else _largest_coco_id(predictions, storage_options) + 1
    return ImageIds(annotations, storage_options, assign=True, first_assigned=first_assigned)


def image_entry(image: dict, prediction: Prediction) -> dict:
    """A COCO `images[]` entry: `image` (ImageIds.lookup's) plus the row's uri and its own
    image_id, which the numeric COCO id replaces (a directory run's relative path, say)."""
    return {**image, "uri": prediction.uri, "rayseg_image_id": prediction.image_id}


def _is_coco_id(image_id: str) -> bool:
    return image_id.isascii() and image_id.isdigit()  # not "²", which isdigit() but int() refuses


def _largest_coco_id(predictions: str, storage_options: dict | None) -> int:
    """The largest image_id among the rows that is a COCO id (digits), 0 without one: ids
    assigned to the other rows start above it, so that no two images share an id."""
    fs, files = prediction_files(predictions, storage_options)
    largest = 0
    for file in files:
        with fs.open(file, "rb") as f:
            ids = pq.ParquetFile(f).read(columns=["image_id"])["image_id"]
        numbers = pc.filter(ids, pc.match_substring_regex(ids, "^[0-9]+$")).to_pylist()
        largest = max([largest, *map(int, numbers)])
    return largest


def iter_batches(predictions: str, storage_options: dict | None = None, columns: list[str] = PREDICTION_COLUMNS) -> Iterator[pa.Table]:
    """Every row of an OUTPUT, in order, as tables of at most BATCH_ROWS rows."""
    fs, files = prediction_files(predictions, storage_options)
    for file in files:
        with fs.open(file, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                yield pa.Table.from_batches([batch])


def iter_rows(predictions: str, storage_options: dict | None = None) -> Iterator[Prediction]:
    """Every prediction row of an OUTPUT, BATCH_ROWS rows in memory at a time."""
    for table in iter_batches(predictions, storage_options):
        yield from predictions_from_table(table)


def _hashes(values: list) -> np.ndarray:
    """`id_hashes` of the values' strings (a key of another type, e.g. an int COCO id, hashed
    by its str: equal keys hash equal, and a collision only makes a key remembered)."""
    return id_hashes(pa.array([str(v) for v in values], pa.string()))


@dataclass
class _Repeats:
    """Hashes of the image_ids and of the COCO ids that more than one ok row has (sorted),
    and, as the export goes, which of those ids were exported already."""

    image_ids: np.ndarray
    keys: np.ndarray
    exported_image_ids: set = field(default_factory=set)
    exported_keys: set = field(default_factory=set)

    def restart(self) -> None:
        self.exported_image_ids, self.exported_keys = set(), set()


def _find_repeats(predictions: str, storage_options: dict | None, ids: ImageIds) -> _Repeats:
    """The first pass: `_Repeats` from the image_id, uri and status columns of every row."""
    id_hashes_, key_hashes = [], []
    for table in iter_batches(predictions, storage_options, ["image_id", "uri", "status"]):
        ok = pc.equal(table["status"], "ok")
        image_ids = table["image_id"].filter(ok)
        id_hashes_.append(id_hashes(image_ids))
        keys = [ids.key(i, u) for i, u in zip(image_ids.to_pylist(), table["uri"].filter(ok).to_pylist())]
        key_hashes.append(_hashes([k for k in keys if k is not None]))
    return _Repeats(repeated_hashes(id_hashes_), repeated_hashes(key_hashes))


def _first_rows(
    table: pa.Table, ids: ImageIds, repeats: _Repeats, summary: ExportSummary | None, *, by_image_id: bool
) -> Iterator[tuple[Prediction, dict]]:
    """(row, its COCO image) for each row of `table` that is exported: ok, with ground truth
    where there is some, and the first of its COCO id (by_image_id: and of its image_id).
    Counts what is left out in `summary` (None: the same rows again, counted already)."""
    rows = predictions_from_table(table)
    repeated_id = np.isin(id_hashes(table["image_id"]), repeats.image_ids)
    looked_up = []
    for prediction, repeated in zip(rows, repeated_id.tolist()):
        if not prediction.ok:
            if summary is not None:
                summary.error_rows += 1
            continue
        image = ids.lookup(prediction, repeated=repeated)
        if image is None:
            if summary is not None:
                summary.without_ground_truth += 1
                if len(summary.examples_without_ground_truth) < 5:
                    summary.examples_without_ground_truth.append(prediction.image_id)
            continue
        looked_up.append((prediction, image, repeated))
    repeated_key = np.isin(_hashes([image["id"] for _, image, _ in looked_up]), repeats.keys).tolist()
    for (prediction, image, repeated), key_repeated in zip(looked_up, repeated_key):
        if (by_image_id and repeated and prediction.image_id in repeats.exported_image_ids) or (
            key_repeated and image["id"] in repeats.exported_keys
        ):
            if summary is not None:
                summary.duplicate_rows += 1
            continue
        if repeated:
            repeats.exported_image_ids.add(prediction.image_id)
        if key_repeated:
            repeats.exported_keys.add(image["id"])
        yield prediction, image


def _segmentation(prediction: Prediction, index: int) -> dict:
    return {"size": [int(prediction.height), int(prediction.width)], "counts": prediction.rle[index]}


@contextlib.contextmanager
def _written_whole(fs, path: str) -> Iterator:
    """A text file that appears at `path` only once it is complete: written beside it under a
    temporary name, moved into place at the end, removed if the export fails."""
    if fs.isdir(path):
        raise ExportError(f"{full_uri(fs, path)} is a directory; name the json file to write")
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(partial, "w") as f:
            yield f
        move(fs, partial, path)
    finally:
        if fs.exists(partial):
            remove(fs, partial)


def export_coco_results(
    predictions: str,
    out: str,
    *,
    annotations: str | None = None,
    storage_options: dict | None = None,
) -> ExportSummary:
    """Writes the COCO results json (module docstring); returns what was written."""
    ids = ImageIds(annotations, storage_options)
    # Results are instances: a semantic run's classes would pass for instance categories unsaid.
    warn_if_other_task(predictions, read_run_info(predictions, storage_options), "instance", "exported")
    repeats = _find_repeats(predictions, storage_options, ids)
    fs, path = filesystem(out, storage_options)
    summary = ExportSummary(output=full_uri(fs, path))
    categories: set = set()
    with _written_whole(fs, path) as f:
        f.write("[")
        first = True
        for table in iter_batches(predictions, storage_options):
            summary.rows += table.num_rows
            for prediction, image in _first_rows(table, ids, repeats, summary, by_image_id=False):
                summary.images += 1
                for i in range(len(prediction)):
                    result = {
                        "image_id": image["id"],
                        "category_id": int(prediction.category_id[i]),
                        "segmentation": _segmentation(prediction, i),
                        "bbox": [float(v) for v in prediction.bbox[i]],
                        "score": float(prediction.score[i]),
                    }
                    categories.add(result["category_id"])
                    f.write(("\n" if first else ",\n") + json.dumps(result, separators=(",", ":")))
                    first = False
                    summary.annotations += 1
        f.write("\n]\n")
    summary.categories = len(categories)
    return summary


def export_coco_dataset(
    predictions: str,
    out: str,
    *,
    annotations: str | None = None,
    storage_options: dict | None = None,
) -> ExportSummary:
    """Writes a COCO dataset of the predictions (module docstring); returns what was written."""
    ids = dataset_image_ids(predictions, annotations, storage_options)
    run = read_run_info(predictions, storage_options)
    fs, path = filesystem(out, storage_options)
    summary = ExportSummary(output=full_uri(fs, path))
    info = {
        "description": "rayseg predictions",
        "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "predictions": predictions,
        "run_id": run.get("run_id"),
        "model": run.get("model"),
        "weights": run.get("weights"),
        "weights_sha256": run.get("weights_sha256"),
    }
    repeats = _find_repeats(predictions, storage_options, ids)
    # Pass 1: the images. Pass 2 makes the same choices over the same rows (ids assigned
    # again from the start), so it finds the same rows without remembering them.
    with _written_whole(fs, path) as f:
        f.write('{"info":' + json.dumps(info) + ',"licenses":[],"images":[')
        first = True
        for table in iter_batches(predictions, storage_options):
            summary.rows += table.num_rows
            for prediction, image in _first_rows(table, ids, repeats, summary, by_image_id=True):
                f.write(("\n" if first else ",\n") + json.dumps(image_entry(image, prediction)))
                first = False
                summary.images += 1
        # Pass 2: the annotations, in the same row order.
        f.write('],"annotations":[')
        first = True
        # A run that names its categories (a text-prompted run: its phrases) lists them all.
        categories: dict[int, str] = {int(c["id"]): c["name"] for c in run.get("categories") or []}
        ids.restart()
        repeats.restart()
        for table in iter_batches(predictions, storage_options):
            for prediction, image in _first_rows(table, ids, repeats, None, by_image_id=True):
                for i in range(len(prediction)):
                    category = int(prediction.category_id[i])
                    label = prediction.label[i]
                    if category not in categories or (label and categories[category] == str(category)):
                        categories[category] = label or ids.categories.get(category, {}).get("name") or str(category)
                    summary.annotations += 1
                    annotation = {
                        "id": summary.annotations,
                        "image_id": image["id"],
                        "category_id": category,
                        "segmentation": _segmentation(prediction, i),
                        "area": int(prediction.area[i]),
                        "bbox": [float(v) for v in prediction.bbox[i]],
                        "iscrowd": int(bool(prediction.iscrowd[i])),
                        "score": float(prediction.score[i]),
                    }
                    f.write(("\n" if first else ",\n") + json.dumps(annotation, separators=(",", ":")))
                    first = False
        category_entries = [{"id": c, "name": categories[c], "supercategory": ""} for c in sorted(categories)]
        f.write('],"categories":' + json.dumps(category_entries) + "}\n")
    summary.categories = len(categories)
    return summary


__all__ = ["ExportError", "ExportSummary", "export_coco_results", "export_coco_dataset", "iter_batches", "iter_rows"]
