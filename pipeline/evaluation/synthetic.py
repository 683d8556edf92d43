"""Prediction outputs made from ground truth: for testing evaluators, benchmarks and sanity checks.

`write_predictions` writes rows in the exact output schema (pipeline/schema.py) as a
committed OUTPUT (part files + `_run.json`), so everything that reads a `rayseg segment`
run reads these the same way. `perturbed_instances` turns a COCO instances json into
predictions with known kinds of mistakes: shifted masks, dropped and extra instances,
wrong classes, and scores with ties.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from ..coco_masks import annotation_mask
from ..schema import OUTPUT_SCHEMA
from ..sink import RUN_FILE
from ..storage import filesystem


def encode_mask(mask: np.ndarray) -> tuple[str, int, list[float]]:
    """bool (H, W) → (compressed RLE counts, area, bbox [x, y, w, h])."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii"), int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def segment(
    category_id: int,
    mask: np.ndarray | None = None,
    *,
    rle: str | None = None,
    size: tuple[int, int] | None = None,
    score: float = 1.0,
    label: str | None = None,
    segment_id: int | None = None,
    iscrowd: bool = False,
    bbox: list[float] | None = None,
) -> dict:
    """One `segments` struct from a bool mask, or from RLE counts and the image size."""
    if mask is not None:
        counts, area, box = encode_mask(mask)
    else:
        obj = {"size": list(size), "counts": rle}
        counts, area, box = rle, int(mask_utils.area(obj)), [float(v) for v in mask_utils.toBbox(obj)]
    return {
        "category_id": int(category_id),
        "label": label if label is not None else str(category_id),
        "score": float(score),
        "bbox": bbox if bbox is not None else box,
        "area": area,
        "rle": counts,
        "segment_id": segment_id,
        "iscrowd": bool(iscrowd),
    }


def row(image_id: str, height: int, width: int, segments: list[dict], *, uri: str | None = None, status: str = "ok", error: str | None = None, model: str = "synthetic") -> dict:
    """One output row."""
    return {
        "image_id": image_id,
        "uri": uri,
        "width": width,
        "height": height,
        "status": status,
        "error": error,
        "model": model,
        "segments": segments if status == "ok" else [],
    }


def write_predictions(rows: list[dict], output: str, *, run_info: dict | None = None, rows_per_file: int | None = None, row_group_size: int | None = None, storage_options: dict | None = None) -> str:
    """Writes rows as a committed OUTPUT: part-NNNNN.parquet files then `_run.json`."""
    fs, root = filesystem(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    per_file = rows_per_file or max(len(rows), 1)
    chunks = [rows[i : i + per_file] for i in range(0, len(rows), per_file)] or [[]]
    for index, chunk in enumerate(chunks):
        table = pa.Table.from_pylist(chunk, schema=OUTPUT_SCHEMA)
        with fs.open(posixpath.join(root, f"part-{index:05d}.parquet"), "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)
    info = {
        "run_id": "synthetic",
        "status": "complete",
        "model": "synthetic",
        "weights": None,
        "weights_sha256": None,
        **(run_info or {}),
        # The committed files, as pipeline/sink.py lists them (readers of committed runs need them).
        "files": [f"part-{index:05d}.parquet" for index in range(len(chunks))],
        "counts": {
            "images": len(rows),
            "ok": sum(r["status"] == "ok" for r in rows),
            "error": sum(r["status"] != "ok" for r in rows),
            "segments": sum(len(r["segments"]) for r in rows),
            "files": len(chunks),
        },
    }
    with fs.open(posixpath.join(root, RUN_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return output


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The mask moved by (dy, dx) pixels, clipped at the border."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
    yd, xd = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[ys, xs] = mask[yd, xd]
    return out


def perturbed_instances(
    coco: dict,
    *,
    seed: int = 0,
    drop: float = 0.15,
    wrong_class: float = 0.1,
    max_shift: int = 3,
    extra: float = 1.0,
    duplicates: float = 0.1,
    id_style: str = "file_name",
    score_levels: int | None = 20,
    images_dir: str | None = None,
    per_image: int | None = None,
) -> list[dict]:
    """Rows predicting a COCO instances json with mistakes (see the module docstring).

    extra: mean number of random false-positive blobs per image; duplicates: chance of a
    second, shifted copy of an instance; score_levels: scores rounded to this many levels
    (ties on purpose), None for continuous scores; id_style: "file_name" or "id";
    per_image: pad each image with extra blobs up to this many predictions.
    """
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in coco["categories"]]
    names = {c["id"]: c.get("name") for c in coco["categories"]}
    by_image: dict = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    rows = []
    for image in coco["images"]:
        h, w = image["height"], image["width"]
        segments = []

        def score() -> float:
            value = rng.uniform(0.05, 1.0)
            return float(np.round(value * score_levels) / score_levels) if score_levels else float(value)

        for annotation in by_image[image["id"]]:
            if rng.uniform() < drop:
                continue
            mask = annotation_mask(annotation, h, w)
            copies = 2 if rng.uniform() < duplicates else 1
            for _ in range(copies):
                moved = shift(mask, int(rng.integers(-max_shift, max_shift + 1)), int(rng.integers(-max_shift, max_shift + 1)))
                if not moved.any():
                    continue
                category = annotation["category_id"]
                if rng.uniform() < wrong_class:
                    category = int(rng.choice(category_ids))
                segments.append(segment(category, moved, score=score(), label=names.get(category)))
        blobs = int(rng.poisson(extra))
        if per_image is not None:
            blobs = max(blobs, per_image - len(segments))
        for _ in range(blobs):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(2, max(3, h / 5)), rng.uniform(2, max(3, w / 5))
            ys, xs = np.mgrid[0:h, 0:w]
            blob = ((ys + 0.5 - cy) / ry) ** 2 + ((xs + 0.5 - cx) / rx) ** 2 <= 1
            if blob.any():
                category = int(rng.choice(category_ids))
                segments.append(segment(category, blob, score=score(), label=names.get(category)))
        order = rng.permutation(len(segments))
        segments = [segments[i] for i in order]
        image_id = image["file_name"] if id_style == "file_name" else str(image["id"])
        uri = posixpath.join(images_dir, image["file_name"]) if images_dir else None
        rows.append(row(image_id, h, w, segments, uri=uri))
    return rows


def semantic_rows(
    label_dir: str,
    file_names: list[str],
    *,
    ignore_labels=(0, 255),
    images_dir: str | None = None,
    names: dict[int, str] | None = None,
) -> list[dict]:
    """Perfect semantic predictions: one segment per (non-ignored) class of each label PNG."""
    from PIL import Image

    rows = []
    for name in file_names:
        label = np.asarray(Image.open(posixpath.join(label_dir, posixpath.splitext(name)[0] + ".png")))
        h, w = label.shape
        segments = [
            segment(int(c), label == c, score=1.0, label=(names or {}).get(int(c)))
            for c in np.unique(label).tolist()
            if c not in ignore_labels
        ]
        rows.append(row(name, h, w, segments, uri=posixpath.join(images_dir, name) if images_dir else None))
    return rows


def panoptic_rows(panoptic: dict, panoptic_dir: str, *, id_style: str = "file_name", images_dir: str | None = None) -> list[dict]:
    """Perfect panoptic predictions: one segment (with segment_id) per ground-truth segment."""
    from PIL import Image

    images = {image["id"]: image for image in panoptic["images"]}
    names = {c["id"]: c["name"] for c in panoptic.get("categories", [])}
    rows = []
    for annotation in panoptic["annotations"]:
        image = images[annotation["image_id"]]
        rgb = np.asarray(Image.open(posixpath.join(panoptic_dir, annotation["file_name"])).convert("RGB")).astype(np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        segments = [
            segment(
                s["category_id"], ids == s["id"], score=1.0, label=names.get(s["category_id"]),
                segment_id=s["id"], iscrowd=bool(s.get("iscrowd", 0)),
            )  # fmt: skip
            for s in annotation["segments_info"]
        ]
        image_id = image["file_name"] if id_style == "file_name" else str(image["id"])
        uri = posixpath.join(images_dir, image["file_name"]) if images_dir else None
        rows.append(row(image_id, ids.shape[0], ids.shape[1], segments, uri=uri))
    return rows
