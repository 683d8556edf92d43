"""`rayseg export panoptic PREDICTIONS DIR`: predictions → COCO panoptic format.

DIR/panoptic.json and DIR/panoptic/*.png, panopticapi's layout (the PNG folder is named
like the json without `.json`, as `rayseg fixtures` writes ground truth):

- PNG: RGB uint8, segment id = R + 256·G + 256²·B, 0 = void (unlabelled);
- json: `images` (id, file_name, width, height), `annotations` (image_id, file_name of
  the PNG, segments_info: id, category_id, area, bbox [x, y, w, h], iscrowd),
  `categories` (id, name, isthing).

Segment ids are the rows' panoptic `segment_id`s; rows without them (instance or semantic
output) get 1..N. Overlapping segments (instance output) are painted by descending score,
a pixel going to the best-scored segment; area and bbox are those of the painted pixels
and segments left with none are dropped, so PNG and json always agree. Rows with status
"error" are left out (counted). image_id: the COCO int when the prediction's id is one,
else the string.

PNG names never leave DIR/panoptic: an image_id that is a plain file name
([A-Za-z0-9_-] and inner dots) keeps its stem ("000003.png" → "000003.png"); any other
(path separators, "..", spaces, unicode…) is reduced to its safe characters and given a
stable suffix of its sha1, so that distinct ids never share a file (as is an id whose stem
another id already took, e.g. "a.jpg" after "a.png"). An image_id in two rows is an error.

isthing: from `category_file` (COCO json or list with `isthing`) when given, else from the
category file the run's model was given; else, as the rows do not record it, from the
run's task (`_run.json`): a semantic run's classes are stuff (one region per class and
image), an instance or panoptic run's are things.

Reads only a committed run: the files its `_run.json` lists, or one Parquet file given
directly (pipeline/run_reader.py's prediction_files); rows stream one row group at a
time, the json is written at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from ..models.categories import load_category_file
from .run_reader import (
    PREDICTION_COLUMNS,
    Prediction,
    prediction_files,
    predictions_from_table,
    read_run_info,
    run_task,
)
from .sink import RUN_FILE, committed_files
from .storage import filesystem

JSON_NAME = "panoptic.json"
PNG_DIR = "panoptic"
MAX_ID = 256**3 - 1

_SAFE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass
class PanopticSummary:
    output: str
    images: int = 0
    segments: int = 0
    error_rows: int = 0
    # Rows of an image_id already exported (ids should be unique; the first ok row wins).
    duplicate_rows: int = 0
    dropped_segments: int = 0
    png_dir: str = ""
    json_path: str = ""
    files: list[str] = field(default_factory=list)


def png_name(image_id: str) -> str:
    """A file name for `image_id`'s PNG that cannot escape its directory (see the module
    docstring)."""
    text = str(image_id)
    if _SAFE.match(text) and len(text) <= 200:
        stem = text.rsplit(".", 1)[0] if "." in text else text
        return f"{stem}.png"
    return hashed_png_name(text)


def hashed_png_name(image_id: str) -> str:
    """`image_id`'s safe characters plus a stable sha1 suffix, `.png`."""
    text = str(image_id)
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:100] or "image"
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    return f"{safe}-{digest}.png"


def encode_ids(ids: np.ndarray) -> np.ndarray:
    """int (H, W) segment ids → uint8 (H, W, 3) RGB with id = R + 256·G + 256²·B."""
    ids = ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def decode_ids(rgb: np.ndarray) -> np.ndarray:
    """The inverse of encode_ids."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _image_id(image_id: str):
    return int(image_id) if str(image_id).isdigit() else image_id


def _rows(predictions: str, storage_options: dict | None) -> Iterator[Prediction]:
    fs, root = filesystem(predictions, storage_options)
    if fs.isdir(root) and fs.exists(posixpath.join(root, RUN_FILE)):
        files = committed_files(predictions, storage_options)
    else:
        fs, files = prediction_files(predictions, storage_options)
    for file in files:
        file_fs, path = filesystem(file, storage_options)
        with file_fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            for row_group in range(parquet.metadata.num_row_groups):
                yield from predictions_from_table(parquet.read_row_group(row_group, columns=PREDICTION_COLUMNS))


def panoptic_image(prediction: Prediction) -> tuple[np.ndarray, list[dict], int]:
    """One row → (ids (H, W) uint32, segments_info, segments dropped for lack of pixels)."""
    height, width = int(prediction.height), int(prediction.width)
    ids = np.zeros((height, width), dtype=np.uint32)
    count = len(prediction)
    given = [s for s in prediction.segment_id]
    use_given = count > 0 and all(s is not None and 0 < int(s) <= MAX_ID for s in given) and len(set(given)) == count
    segment_ids = [int(s) for s in given] if use_given else list(range(1, count + 1))
    order = sorted(range(count), key=lambda i: -float(prediction.score[i]))
    infos = []
    dropped = 0
    for i in order:
        mask = mask_utils.decode({"size": [height, width], "counts": prediction.rle[i]}).astype(bool)
        mask &= ids == 0  # a pixel belongs to the best-scored segment that claims it
        if not mask.any():
            dropped += 1
            continue
        ids[mask] = segment_ids[i]
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        infos.append(
            {
                "id": segment_ids[i],
                "category_id": int(prediction.category_id[i]),
                "area": int(mask.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "iscrowd": int(bool(prediction.iscrowd[i])),
            }
        )
    infos.sort(key=lambda info: info["id"])
    return ids, infos, dropped


def export_panoptic(
    predictions: str,
    out_dir: str,
    *,
    storage_options: dict | None = None,
    category_file: str | None = None,
) -> PanopticSummary:
    """Writes OUT_DIR/panoptic.json and OUT_DIR/panoptic/*.png (module docstring)."""
    run = read_run_info(predictions, storage_options)
    model_options = ((run.get("spec") or {}).get("model") or {}).get("options") or {}
    category_file = category_file or model_options.get("category_file")
    isthing = {}
    if category_file is not None:
        isthing = {c.id: c.isthing for c in load_category_file(category_file, storage_options)}
    things_by_default = run_task(run) != "semantic"
    fs, root = filesystem(out_dir, storage_options)
    root = root.rstrip("/")
    if fs.exists(root) and not fs.isdir(root):
        raise ValueError(f"{out_dir} is a file: name the directory to write panoptic.json and its PNGs into")
    png_dir = posixpath.join(root, PNG_DIR)
    fs.makedirs(png_dir, exist_ok=True)
    summary = PanopticSummary(output=out_dir, png_dir=png_dir, json_path=posixpath.join(root, JSON_NAME))
    images, annotations, categories = [], [], {}
    names: dict[str, str] = {}
    exported: set[str] = set()
    for prediction in _rows(predictions, storage_options):
        if prediction.status != "ok":
            summary.error_rows += 1
            continue
        if prediction.image_id in exported:
            summary.duplicate_rows += 1
            continue
        exported.add(prediction.image_id)
        name = png_name(prediction.image_id)
        if names.setdefault(name, prediction.image_id) != prediction.image_id:
            name = hashed_png_name(prediction.image_id)  # e.g. "a.png" after "a.jpg"
            names[name] = prediction.image_id
        ids, infos, dropped = panoptic_image(prediction)
        for i, category_id in enumerate(prediction.category_id):
            categories.setdefault(int(category_id), prediction.label[i] or str(int(category_id)))
        buffer = io.BytesIO()
        Image.fromarray(encode_ids(ids), mode="RGB").save(buffer, format="PNG")
        path = posixpath.join(png_dir, name)
        with fs.open(path, "wb") as f:
            f.write(buffer.getvalue())
        image_id = _image_id(prediction.image_id)
        images.append(
            {"id": image_id, "file_name": prediction.image_id, "width": int(prediction.width), "height": int(prediction.height)}
        )
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": infos})
        summary.images += 1
        summary.segments += len(infos)
        summary.dropped_segments += dropped
        summary.files.append(name)
    document = {
        "info": {"description": f"rayseg predictions {predictions}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "isthing": int(isthing.get(cid, things_by_default))}
            for cid, name in sorted(categories.items())
        ],
    }
    with fs.open(summary.json_path, "w") as f:
        json.dump(document, f)
    return summary
