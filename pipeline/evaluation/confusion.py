"""IoU from pixel counts, defined once: the semantic evaluator's metrics and the U-Net's
validation mIoU during training (pipeline/training/validation.py) both come from here."""

from __future__ import annotations

import numpy as np

from .base import finite_or_none


def class_iou(true_positive: np.ndarray, ground_truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per class IoU = TP / (GT + P − TP), float64 (K,) from (K,) pixel counts; NaN for a
    class absent from both ground truth and prediction."""
    union = ground_truth + predicted - true_positive
    iou = np.full(len(true_positive), np.nan)
    np.divide(true_positive, union, out=iou, where=union > 0)
    return iou


def mean_defined(values: np.ndarray) -> float | None:
    """The mean of the values that are not NaN; None when there are none."""
    defined = values[~np.isnan(values)]
    return float(np.sum(defined) / len(defined)) if len(defined) else None


def iou_from_confusion(confusion: np.ndarray) -> tuple[float | None, list[float | None], float | None]:
    """(mIoU, per-class IoU, pixel accuracy) of a (C, C) confusion matrix (rows ground truth,
    columns prediction); a class absent from ground truth and prediction has IoU None and is
    left out of the mean (the evaluator's convention)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    iou = class_iou(tp, confusion.sum(axis=1), confusion.sum(axis=0))
    total = confusion.sum()
    return mean_defined(iou), [finite_or_none(v) for v in iou], (float(tp.sum() / total) if total else None)
