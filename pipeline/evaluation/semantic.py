"""Semantic segmentation evaluation against label PNGs: a confusion matrix, and what follows from it.

Per image, the prediction row becomes a label map: each segment's mask painted with its
`category_id`, lowest score first, so where segments overlap the highest-scoring one wins
(semantic models emit a partition, where the order does not matter). Pixels no segment
covers are "unpredicted". Ground-truth pixels whose label is an ignore label (default 0 =
unlabelled and 255) are not counted at all; a prediction of an ignore label counts as
unpredicted.

The confusion matrix counts, over all evaluated images, ground-truth label (row) ×
predicted label (column), plus an "unpredicted" column. From it, per class c:

    IoU_c = TP_c / (GT_c + P_c − TP_c)     (undefined when the class is absent from both)
    Acc_c = TP_c / GT_c                    (undefined when the class has no ground truth)

where GT_c counts every non-ignored ground-truth pixel of c (unpredicted ones included) and
P_c the pixels predicted as c on non-ignored ground truth. mIoU and mAcc average the
defined values (a class predicted but absent from the ground truth has IoU 0 and lowers
mIoU); fwIoU weights IoU_c by GT_c / ΣGT; pAcc = ΣTP / ΣGT. Counts are integers, so merging
shards is exact.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..run_reader import Prediction
from ..storage import filesystem
from .base import DatasetEvaluator, EvaluationError, RankedImage, finite_or_none
from .confusion import class_iou, mean_defined
from .data import SemanticImage

# Label ids above this would make the dense confusion matrix unreasonably large.
MAX_LABEL = 4095


def read_label_png(uri: str, storage_options: dict | None = None) -> np.ndarray:
    """A single-channel label PNG as an (H, W) int64 array of label ids."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
        image.load()
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise EvaluationError(f"{uri}: a semantic label PNG has one channel of label ids, this one is {image.mode}")
    return np.asarray(image).astype(np.int64)


def paint_semantic(prediction: Prediction, ignore_labels: frozenset = frozenset()) -> np.ndarray:
    """The prediction as an (H, W) int64 label map; -1 where no segment (or an ignore label) is."""
    height, width = int(prediction.height), int(prediction.width)
    labels = np.full((height, width), -1, dtype=np.int64)
    for index in np.argsort(prediction.score, kind="stable").tolist():
        category = int(prediction.category_id[index])
        mask = mask_utils.decode(prediction.rle_dict(index)).astype(bool)
        labels[mask] = -1 if category in ignore_labels else category
    return labels


class SemanticEvaluator(DatasetEvaluator):
    """Confusion-matrix metrics against label PNGs (module docstring)."""

    task = "semantic"

    def __init__(
        self,
        *,
        ignore_labels=(0, 255),
        categories: list[dict] | None = None,
        names: dict[int, str] | None = None,
        storage_options: dict | None = None,
        ranking_k: int = 6,
    ) -> None:
        """categories: the classes (and names) to evaluate besides those seen; names: only
        names for ids (e.g. the model's label list from `_run.json`), the class set unchanged."""
        self.ignore_labels = frozenset(int(v) for v in ignore_labels)
        self.categories = [dict(c) for c in categories] if categories else None
        self.names = {int(k): str(v) for k, v in (names or {}).items()}
        self.storage_options = storage_options
        super().__init__(ranking_k)

    def _reset(self) -> None:
        # matrix[g, p]: ground truth g predicted as p; the last column counts unpredicted pixels.
        self.matrix = np.zeros((0, 1), dtype=np.int64)
        self.labels: dict[int, str] = {}

    def _grow(self, size: int) -> None:
        n = self.matrix.shape[0]
        if size <= n:
            return
        if size - 1 > MAX_LABEL:
            raise EvaluationError(f"label id {size - 1} is above {MAX_LABEL}; semantic labels must be small integers")
        grown = np.zeros((size, size + 1), dtype=np.int64)
        grown[:n, :n] = self.matrix[:, :n]
        grown[:n, size] = self.matrix[:, n]
        self.matrix = grown

    def _process_one(self, gt: SemanticImage, prediction: Prediction) -> None:
        label = read_label_png(gt.png, self.storage_options)
        prediction = self._mismatch(prediction, *label.shape)
        for category, name in zip(prediction.category_id.tolist(), prediction.label):
            if name and category not in self.labels:
                self.labels[category] = name
        if prediction.ok and len(prediction):
            predicted = paint_semantic(prediction, self.ignore_labels)
        else:
            predicted = np.full(label.shape, -1, dtype=np.int64)
        valid = ~np.isin(label, list(self.ignore_labels))
        g = label[valid]
        p = predicted[valid]
        if (g < 0).any() or (p < -1).any():
            raise EvaluationError(f"negative label ids in {gt.png}")
        size = int(max(g.max(initial=-1), p.max(initial=-1))) + 1
        self._grow(size)
        n = self.matrix.shape[0]
        columns = n + 1
        p = np.where(p < 0, n, p)
        counts = np.bincount(g * columns + p, minlength=n * columns).reshape(n, columns)
        self.matrix += counts
        # Ranking: the image's own mIoU over the classes in its ground truth or prediction.
        if g.size:
            present = np.union1d(np.unique(g), np.unique(p[p < n]))
            tp = counts[present, present]
            union = counts[present].sum(axis=1) + counts[:, present].sum(axis=0) - tp
            quality = float(np.mean(tp / union))
            self.ranking.add(
                RankedImage(
                    quality, gt.key, prediction.image_id, prediction.location,
                    {"pixel_accuracy": float(np.trace(counts[:, :n]) / g.size)},
                )
            )

    def _merge(self, other: "SemanticEvaluator") -> None:
        self._grow(other.matrix.shape[0])
        n = self.matrix.shape[0]
        m = other.matrix.shape[0]
        self.matrix[:m, :m] += other.matrix[:, :m]
        self.matrix[:m, n] += other.matrix[:, m]
        for category, name in other.labels.items():
            self.labels.setdefault(category, name)

    def class_ids(self) -> list[int]:
        """The evaluated classes: given categories, plus every id in ground truth or predictions."""
        n = self.matrix.shape[0]
        seen = set(np.nonzero(self.matrix[:, :n].sum(axis=1) + self.matrix[:, :n].sum(axis=0) + self.matrix[:, n])[0].tolist())
        given = {int(c["id"]) for c in self.categories} if self.categories else set()
        return sorted((seen | given) - self.ignore_labels)

    def class_names(self, ids: list[int]) -> list[str]:
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in self.categories or []}
        return [names.get(i) or self.labels.get(i) or self.names.get(i) or str(i) for i in ids]

    def confusion(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(class ids, K×K matrix ground truth × prediction, unpredicted pixels per class)."""
        ids = self.class_ids()
        self._grow(max(ids, default=-1) + 1)
        n = self.matrix.shape[0]
        index = np.array(ids, dtype=np.int64)
        return ids, self.matrix[np.ix_(index, index)], self.matrix[index, n]

    def evaluate(self) -> dict:
        ids, conf, unpredicted = self.confusion()
        n = self.matrix.shape[0]
        index = np.array(ids, dtype=np.int64)
        tp = np.diag(conf).astype(np.float64)
        pos_gt = self.matrix[index].sum(axis=1).astype(np.float64)  # every prediction + unpredicted
        pos_pred = self.matrix[:, index].sum(axis=0).astype(np.float64) if len(ids) else np.zeros(0)
        iou = class_iou(tp, pos_gt, pos_pred)
        acc = np.full(len(ids), np.nan)
        np.divide(tp, pos_gt, out=acc, where=pos_gt > 0)
        total = pos_gt.sum()
        has_gt = pos_gt > 0
        metrics = {
            "mIoU": mean_defined(iou),
            "fwIoU": float(np.sum(pos_gt[has_gt] / total * iou[has_gt])) if total else None,
            "mAcc": mean_defined(acc),
            "pAcc": float(tp.sum() / total) if total else None,
        }
        names = self.class_names(ids)
        per_class = [
            {
                "id": i,
                "name": name,
                "IoU": finite_or_none(iou[k]),
                "Acc": finite_or_none(acc[k]),
                "gt_pixels": int(pos_gt[k]),
                "predicted_pixels": int(pos_pred[k]),
                "true_positive_pixels": int(tp[k]),
                "unpredicted_pixels": int(unpredicted[k]),
            }
            for k, (i, name) in enumerate(zip(ids, names))
        ]
        return {
            **metrics,
            "per_class": per_class,
            "ignore_labels": sorted(self.ignore_labels),
            "confusion_matrix": {
                "class_ids": ids,
                "rows": "ground truth",
                "columns": "prediction, then unpredicted",
                "counts": [row.tolist() + [int(u)] for row, u in zip(conf, unpredicted)],
            },
            "pixels": {"evaluated": int(total), "unpredicted": int(self.matrix[:, n].sum())},
        }
