"""Exports of a predictions OUTPUT to COCO formats.

- `export_coco_results`: the COCO *results* format — a list of {image_id, category_id,
  segmentation {size, counts}, bbox, score} — that `COCO.loadRes` and COCOeval take.
  image_id must be the COCO image id: prediction ids that are file names ("000003.png")
  are mapped through the ground truth's `images` (`annotations=`), by str(id) then
  file_name, the same join `rayseg evaluate` uses.
  With the bbox present, `COCO.loadRes` takes the *box* area for the area ranges of segm
  evaluation too, as `rayseg evaluate` does by default (`--segm-area box`); its
  `--segm-area mask` equals loadRes of the export without the bbox key.
- `export_coco_dataset`: a COCO *dataset* of the predictions — images (id, file_name,
  width, height, plus the row's uri), categories from the segments' labels (and, for a run
  that names its categories in `_run.json` — a text-prompted run: one per phrase — every
  one of those, found or not), annotations
  with RLE segmentation, area, bbox, iscrowd and score — for re-labelling tools.

Both stream: rows are read one Parquet row group at a time and written as they come, so
memory does not grow with the number of masks. Rows with status "error" have no
predictions and are left out (counted in the summary).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .run_reader import (
    PREDICTION_COLUMNS,
    Prediction,
    prediction_files,
    predictions_from_table,
    read_run_info,
    uri_tails,
)
from .storage import filesystem, full_uri, move, remove


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
        self.assigned: dict[str, int] = {}
        self.has_ground_truth = annotations is not None
        if annotations is not None:
            fs, path = filesystem(annotations, storage_options)
            if not fs.exists(path):
                raise ExportError(f"annotations not found: {annotations}")
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

    def lookup(self, prediction: Prediction) -> dict | None:
        """{id, file_name, width, height} of the row's image, or None when it has no ground truth."""
        image_id = prediction.image_id
        if self.has_ground_truth:
            image = self.by_id.get(image_id) or self.by_file.get(image_id)
            for tail in uri_tails(prediction.uri) if image is None else ():
                image = self.by_file.get(tail)
                if image is not None:
                    break
            if image is None:
                return None
            return {
                "id": image["id"],
                "file_name": image.get("file_name", image_id),
                "width": image.get("width", prediction.width),
                "height": image.get("height", prediction.height),
            }
        if _is_coco_id(image_id):
            number = int(image_id)
            file_name = posixpath.basename(prediction.uri) if prediction.uri else image_id
        elif self.assign:
            number = self.assigned.setdefault(image_id, self.first_assigned + len(self.assigned))
            file_name = image_id
        else:
            raise ExportError(
                f"prediction image_id {image_id!r} is not a COCO image id; pass the ground-truth json "
                "(--annotations GT.json) to map file names to ids"
            )
        return {"id": number, "file_name": file_name, "width": prediction.width, "height": prediction.height}


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


def iter_rows(predictions: str, storage_options: dict | None = None) -> Iterator[Prediction]:
    """Every prediction row of an OUTPUT, one Parquet row group in memory at a time."""
    fs, files = prediction_files(predictions, storage_options)
    for file in files:
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            for row_group in range(parquet.metadata.num_row_groups):
                yield from predictions_from_table(parquet.read_row_group(row_group, columns=PREDICTION_COLUMNS))


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
    fs, path = filesystem(out, storage_options)
    summary = ExportSummary(output=full_uri(fs, path))
    seen: set = set()
    categories: set = set()
    with _written_whole(fs, path) as f:
        f.write("[")
        first = True
        for prediction in iter_rows(predictions, storage_options):
            summary.rows += 1
            if not prediction.ok:
                summary.error_rows += 1
                continue
            image = ids.lookup(prediction)
            if image is None:
                summary.without_ground_truth += 1
                if len(summary.examples_without_ground_truth) < 5:
                    summary.examples_without_ground_truth.append(prediction.image_id)
                continue
            if image["id"] in seen:
                summary.duplicate_rows += 1
                continue
            seen.add(image["id"])
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
    first_assigned = 1 if annotations is not None else _largest_coco_id(predictions, storage_options) + 1
    ids = ImageIds(annotations, storage_options, assign=True, first_assigned=first_assigned)
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
    # Pass 1: the images (small columns only); which row of which image is exported.
    exported: dict[str, int] = {}
    exported_ids: set = set()
    with _written_whole(fs, path) as f:
        f.write('{"info":' + json.dumps(info) + ',"licenses":[],"images":[')
        first = True
        for prediction in iter_rows(predictions, storage_options):
            summary.rows += 1
            if not prediction.ok:
                summary.error_rows += 1
                continue
            image = ids.lookup(prediction)
            if image is None:
                summary.without_ground_truth += 1
                if len(summary.examples_without_ground_truth) < 5:
                    summary.examples_without_ground_truth.append(prediction.image_id)
                continue
            if prediction.image_id in exported or image["id"] in exported_ids:
                summary.duplicate_rows += 1
                continue
            exported[prediction.image_id] = image["id"]
            exported_ids.add(image["id"])
            entry = {**image, "uri": prediction.uri, "rayseg_image_id": prediction.image_id}
            f.write(("\n" if first else ",\n") + json.dumps(entry))
            first = False
            summary.images += 1
        # Pass 2: the annotations, in the same row order.
        f.write('],"annotations":[')
        first = True
        # A run that names its categories (a text-prompted run: its phrases) lists them all.
        categories: dict[int, str] = {int(c["id"]): c["name"] for c in run.get("categories") or []}
        done: set = set()
        for prediction in iter_rows(predictions, storage_options):
            image_id = exported.get(prediction.image_id)
            # The row pass 1 exported: an id's first ok row.
            if image_id is None or not prediction.ok or prediction.image_id in done:
                continue
            done.add(prediction.image_id)
            for i in range(len(prediction)):
                category = int(prediction.category_id[i])
                label = prediction.label[i]
                if category not in categories or (label and categories[category] == str(category)):
                    categories[category] = label or ids.categories.get(category, {}).get("name") or str(category)
                summary.annotations += 1
                annotation = {
                    "id": summary.annotations,
                    "image_id": image_id,
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


__all__ = ["ExportError", "ExportSummary", "export_coco_results", "export_coco_dataset", "iter_rows"]
