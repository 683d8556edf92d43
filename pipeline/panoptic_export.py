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
"error" are left out (counted).

Ids and file names are numeric COCO ones, as panopticapi's pq_compute and pycocotools
expect (pq_compute pairs prediction and ground truth by `image_id` and reads each
annotation's `file_name` in the PNG folder), chosen as `rayseg export dataset` chooses
them (pipeline/export.py's ImageIds):

- with `annotations` (a COCO instances or panoptic json): the ground truth's image ids,
  file names and sizes, rows matched by COCO id, then by file name (the rows' ids or
  their uris' tails), as `rayseg evaluate` joins; a row of an image not in it is an error
  (ExportError), said before anything is written;
- without: a numeric image_id (a run made from a COCO json) is the id, `file_name` the
  uri's basename; other ids (a directory run's relative paths) are numbered from above the
  largest numeric one, in the order the rows are read, and `file_name` is the id.

`images[]` entries also keep the row's `uri` and its own id as `rayseg_image_id`. Each
PNG is named after its image's `file_name` with `.png`, as COCO panoptic names them
(`000000.png` for `000000.jpg`), so the annotations' `file_name`s equal the ground
truth's. PNG names never leave DIR/panoptic: a file name that is a plain one
([A-Za-z0-9_-] and inner dots) keeps its stem; any other (path separators, "..", spaces,
unicode…) is reduced to its safe characters and given a stable suffix of its sha1, as is
one whose name another image took already (e.g. "a.png" after "a.jpg"). An image is
exported once, from its first ok row (later rows of its id are counted).

isthing: from `category_file` (COCO json or list with `isthing`) when given, else from the
`annotations`' categories when they say (a panoptic json), else from the category file the
run's model was given; else, as the rows do not record it, from the
run's task (`_run.json`): a semantic run's classes are stuff (one region per class and
image), an instance or panoptic run's are things.

Reads only a committed run (one with its `_run.json`), or one Parquet file given directly,
as the other exports do (pipeline/export.py's iter_batches); rows stream a batch at a time,
the json is written at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..models.categories import load_category_file
from .export import (
    ExportError,
    ImageIds,
    dataset_image_ids,
    image_entry,
    iter_batches,
    iter_rows,
)
from .run_reader import (
    Prediction,
    read_run_info,
    run_task,
)
from .storage import filesystem

log = logging.getLogger("rayseg.pipeline")

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
    # Ground-truth images (with `annotations`) that got no annotation: pq_compute wants one each.
    ground_truth_without_row: int = 0
    png_dir: str = ""
    json_path: str = ""
    files: list[str] = field(default_factory=list)


def png_name(file_name: str) -> str:
    """A file name for the PNG of the image `file_name` that cannot escape its directory (see
    the module docstring)."""
    text = str(file_name)
    if _SAFE.match(text) and len(text) <= 200:
        stem = text.rsplit(".", 1)[0] if "." in text else text
        return f"{stem}.png"
    return hashed_png_name(text)


def hashed_png_name(text: str) -> str:
    """`text`'s safe characters plus a stable sha1 suffix of it, `.png`."""
    text = str(text)
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


def _check_covered(predictions: str, ids: ImageIds, annotations: str, storage_options: dict | None) -> None:
    """ExportError unless every ok row's image is one of the ground truth's (a pass over the
    small columns, before anything is written)."""
    missing, examples = 0, []
    for table in iter_batches(predictions, storage_options, ["image_id", "uri", "status"]):
        for image_id, uri, status in zip(*(table[c].to_pylist() for c in ("image_id", "uri", "status"))):
            if status == "ok" and ids.key(image_id, uri) is None:
                missing += 1
                if len(examples) < 5:
                    examples.append(repr(image_id))
    if missing:
        raise ExportError(
            f"{missing} ok rows of {predictions} are not images of {annotations} (matched by COCO id, then "
            f"file name), e.g. {', '.join(examples)}: pass the ground truth the run was made from, or export "
            "without --annotations"
        )


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
    annotations: str | None = None,
) -> PanopticSummary:
    """Writes OUT_DIR/panoptic.json and OUT_DIR/panoptic/*.png (module docstring).

    annotations: a COCO instances or panoptic json whose image ids and file names the export
    takes; every ok row must be one of its images.
    """
    run = read_run_info(predictions, storage_options)
    ids = dataset_image_ids(predictions, annotations, storage_options)
    if annotations is not None:
        _check_covered(predictions, ids, annotations, storage_options)
    model_options = ((run.get("spec") or {}).get("model") or {}).get("options") or {}
    isthing = {cid: bool(c["isthing"]) for cid, c in ids.categories.items() if "isthing" in c}
    if category_file is not None or not isthing:
        category_file = category_file or model_options.get("category_file")
        isthing = {c.id: c.isthing for c in load_category_file(category_file, storage_options)} if category_file else {}
    things_by_default = run_task(run) != "semantic"
    fs, root = filesystem(out_dir, storage_options)
    root = root.rstrip("/")
    if fs.exists(root) and not fs.isdir(root):
        raise ValueError(f"{out_dir} is a file: name the directory to write panoptic.json and its PNGs into")
    png_dir = posixpath.join(root, PNG_DIR)
    fs.makedirs(png_dir, exist_ok=True)
    summary = PanopticSummary(output=out_dir, png_dir=png_dir, json_path=posixpath.join(root, JSON_NAME))
    images, annotations_out, categories = [], [], {}
    names: dict[str, int] = {}
    exported: set[int] = set()
    for prediction in iter_rows(predictions, storage_options):
        if prediction.status != "ok":
            summary.error_rows += 1
            continue
        image = ids.lookup(prediction)  # never None: with ground truth, every row was found in it
        if image["id"] in exported:
            summary.duplicate_rows += 1
            continue
        exported.add(image["id"])
        name = png_name(image["file_name"])
        if names.setdefault(name, image["id"]) != image["id"]:
            name = hashed_png_name(f"{image['file_name']} {image['id']}")  # e.g. "a.png" after "a.jpg"
            names[name] = image["id"]
        ids_map, infos, dropped = panoptic_image(prediction)
        for i, category_id in enumerate(prediction.category_id):
            categories.setdefault(int(category_id), prediction.label[i] or str(int(category_id)))
        buffer = io.BytesIO()
        Image.fromarray(encode_ids(ids_map), mode="RGB").save(buffer, format="PNG")
        with fs.open(posixpath.join(png_dir, name), "wb") as f:
            f.write(buffer.getvalue())
        images.append(image_entry(image, prediction))
        annotations_out.append({"image_id": image["id"], "file_name": name, "segments_info": infos})
        summary.images += 1
        summary.segments += len(infos)
        summary.dropped_segments += dropped
        summary.files.append(name)
    if annotations is not None:
        summary.ground_truth_without_row = len(ids.by_id) - summary.images
    if summary.ground_truth_without_row:
        # pq_compute stops at the first ground-truth image without a prediction.
        log.warning(
            "%d images of %s have no annotation in the export (no ok row): panopticapi's pq_compute needs one for each",
            summary.ground_truth_without_row, annotations,
        )  # fmt: skip
    document = {
        "info": {"description": f"rayseg predictions {predictions}"},
        "images": images,
        "annotations": annotations_out,
        "categories": [
            {"id": cid, "name": name, "isthing": int(isthing.get(cid, things_by_default))}
            for cid, name in sorted(categories.items())
        ],
    }
    with fs.open(summary.json_path, "w") as f:
        json.dump(document, f)
    return summary
