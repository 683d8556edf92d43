"""Panoptic quality (PQ, SQ, RQ) against COCO panoptic json + PNGs, with panopticapi's semantics.

Per image (panopticapi's `pq_compute_single_core`):

- ground truth: the PNG's segment ids (R + 256·G + 256²·B; 0 = VOID) with the json's
  segments_info (category, iscrowd, and its `area`, as panopticapi uses it);
- prediction: the row's segments painted into an id map, highest score first, a pixel
  going to the first segment that claims it (panoptic predictions do not overlap, so
  this only matters for predictions that break that rule); segments of a category the
  ground truth does not know are dropped (counted), areas are the painted pixel counts;
- a (gt, prediction) pair of the same category matches when IoU > 0.5, with
  IoU = |g ∩ p| / (|p| + |g| − |g ∩ p| − |p ∩ VOID|); crowd ground truth never matches;
- unmatched non-crowd ground truth is a false negative; an unmatched prediction is a false
  positive unless more than half of it lies on VOID or on a crowd region of its category.

PQ_c = ΣIoU / (TP + ½FP + ½FN), SQ_c = ΣIoU / TP, RQ_c = TP / (TP + ½FP + ½FN); All /
Things / Stuff average the classes that have any TP, FP or FN. The IoU sums are exact
until read (`ExactSum`), so the result does not depend on how images were sharded
(panopticapi sums in processing order, so its own last bits depend on its cpu count).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..run_reader import Prediction
from ..storage import filesystem
from .base import DatasetEvaluator, EvaluationError, ExactSum, RankedImage
from .data import PanopticImage

VOID = 0
OFFSET = 256 * 256 * 256


def rgb2id(color: np.ndarray) -> np.ndarray:
    """panopticapi.utils.rgb2id: (H, W, 3) → (H, W) uint32 segment ids."""
    color = color.astype(np.uint32)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def read_panoptic_png(uri: str, storage_options: dict | None = None) -> np.ndarray:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
        image.load()
    return rgb2id(np.asarray(image.convert("RGB")))


def paint_panoptic(prediction: Prediction, known_categories) -> tuple[np.ndarray, dict[int, int], int]:
    """(id map (H, W) uint32, {segment id: category id}, segments dropped for an unknown category)."""
    height, width = int(prediction.height), int(prediction.width)
    ids = np.zeros((height, width), dtype=np.uint32)
    categories: dict[int, int] = {}
    dropped = 0
    next_id = 1
    for index in np.argsort(-prediction.score, kind="stable").tolist():
        category = int(prediction.category_id[index])
        if category not in known_categories:
            dropped += 1
            continue
        mask = mask_utils.decode(prediction.rle_dict(index)).astype(bool) & (ids == VOID)
        if mask.any():
            ids[mask] = next_id
            categories[next_id] = category
            next_id += 1
    return ids, categories, dropped


class PanopticEvaluator(DatasetEvaluator):
    """PQ / SQ / RQ per class and for all, things and stuff (module docstring)."""

    task = "panoptic"

    def __init__(self, categories: list[dict], *, storage_options: dict | None = None, ranking_k: int = 6) -> None:
        self.categories = [dict(c) for c in categories]  # json order: the order classes are averaged in
        self.category_index = {c["id"]: k for k, c in enumerate(self.categories)}
        self.storage_options = storage_options
        super().__init__(ranking_k)

    def _reset(self) -> None:
        K = len(self.categories)
        self.tp = np.zeros(K, dtype=np.int64)
        self.fp = np.zeros(K, dtype=np.int64)
        self.fn = np.zeros(K, dtype=np.int64)
        self.iou = [ExactSum() for _ in range(K)]
        self.unknown_category_segments = 0

    def _process_one(self, gt: PanopticImage, prediction: Prediction) -> None:
        pan_gt = read_panoptic_png(gt.png, self.storage_options)
        prediction = self._mismatch(prediction, *pan_gt.shape)
        if prediction.ok and len(prediction):
            pan_pred, pred_categories, dropped = paint_panoptic(prediction, self.category_index)
            self.unknown_category_segments += dropped
        else:
            pan_pred, pred_categories = np.zeros(pan_gt.shape, dtype=np.uint32), {}
        gt_segms = {int(s["id"]): s for s in gt.segments_info}
        for segment in gt.segments_info:
            if segment["category_id"] not in self.category_index:
                raise EvaluationError(f"image {gt.id}: ground-truth segment of unknown category {segment['category_id']}")
        labels, counts = np.unique(pan_pred, return_counts=True)
        pred_area = {int(label): int(count) for label, count in zip(labels, counts) if label != VOID}
        pred_segms = {label: {"category_id": pred_categories[label], "area": area} for label, area in pred_area.items()}
        joint = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
        labels, counts = np.unique(joint, return_counts=True)
        gt_pred_map = {(int(label // OFFSET), int(label % OFFSET)): int(count) for label, count in zip(labels, counts)}

        tp = fp = fn = 0
        iou_sum = 0.0
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label].get("iscrowd", 0) == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - intersection
                - gt_pred_map.get((VOID, pred_label), 0)
            )
            iou = intersection / union
            if iou > 0.5:
                k = self.category_index[gt_segms[gt_label]["category_id"]]
                self.tp[k] += 1
                self.iou[k].add(iou)
                tp += 1
                iou_sum += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info.get("iscrowd", 0) == 1:
                crowd_labels[gt_info["category_id"]] = gt_label
                continue
            self.fn[self.category_index[gt_info["category_id"]]] += 1
            fn += 1
        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((VOID, pred_label), 0)
            if pred_info["category_id"] in crowd_labels:
                intersection += gt_pred_map.get((crowd_labels[pred_info["category_id"]], pred_label), 0)
            if intersection / pred_info["area"] > 0.5:
                continue
            self.fp[self.category_index[pred_info["category_id"]]] += 1
            fp += 1
        if tp + fp + fn:
            self.ranking.add(
                RankedImage(
                    iou_sum / (tp + 0.5 * fp + 0.5 * fn), str(gt.id), prediction.image_id, prediction.location,
                    {"tp": tp, "fp": fp, "fn": fn},
                )
            )

    def _merge(self, other: "PanopticEvaluator") -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        for mine, theirs in zip(self.iou, other.iou):
            mine.merge(theirs)
        self.unknown_category_segments += other.unknown_category_segments

    def pq_average(self, isthing: bool | None) -> tuple[dict, dict]:
        """panopticapi's PQStat.pq_average: ({pq, sq, rq, n}, per-class {pq, sq, rq})."""
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for k, category in enumerate(self.categories):
            if isthing is not None and (category.get("isthing", 1) == 1) != isthing:
                continue
            iou = self.iou[k].value
            tp, fp, fn = int(self.tp[k]), int(self.fp[k]), int(self.fn[k])
            if tp + fp + fn == 0:
                per_class[category["id"]] = {"pq": None, "sq": None, "rq": None}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[category["id"]] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:
            return {"pq": None, "sq": None, "rq": None, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

    def evaluate(self) -> dict:
        results = {}
        per_class = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], classes = self.pq_average(isthing)
            if name == "All":
                per_class = classes
        return {
            "PQ": results["All"]["pq"],
            "SQ": results["All"]["sq"],
            "RQ": results["All"]["rq"],
            **{group: results[group] for group in ("All", "Things", "Stuff")},
            "per_class": [
                {
                    "id": c["id"],
                    "name": c.get("name", str(c["id"])),
                    "isthing": bool(c.get("isthing", 1)),
                    "PQ": per_class[c["id"]]["pq"],
                    "SQ": per_class[c["id"]]["sq"],
                    "RQ": per_class[c["id"]]["rq"],
                    "tp": int(self.tp[k]),
                    "fp": int(self.fp[k]),
                    "fn": int(self.fn[k]),
                    "iou_sum": self.iou[k].value,
                }
                for k, c in enumerate(self.categories)
            ],
            "unknown_category_segments": self.unknown_category_segments,
        }
