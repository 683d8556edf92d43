"""Validation on the workers: confusion counts on torch tensors, summed across workers with
an all-reduce; the IoUs follow from them as in the semantic evaluator
(pipeline/evaluation/confusion.py)."""

from __future__ import annotations

from .data import IGNORE


def confusion_matrix(predicted, labels, num_classes: int):
    """(C, C) int64 counts, rows ground truth, columns prediction; IGNORE pixels skipped.

    predicted and labels: integer tensors of one shape (N, H, W), channel indices.
    """
    import torch

    valid = labels != IGNORE
    index = labels[valid].long() * num_classes + predicted[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
