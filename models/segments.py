"""One image's segments as columns, in the spirit of segment-anything's `MaskData`: a model's
post-processing makes them, and they are filtered and sent on as whole columns — masks where the model left them (on its device, or the host), metadata as numpy
arrays. `Segment` is one row of them, for reading.

Importable without torch (the driver reads models/base.py): torch is used only for masks
that are torch tensors, which only a process that made them holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# An annotation id column's value for a segment that came from no annotation.
NO_ANNOTATION = -1
# `Segments.metadata`'s keys, in order: what the output rows carry of each segment besides its mask.
METADATA_FIELDS = ("category_ids", "labels", "scores", "segment_ids", "iscrowd", "annotation_ids", "boxes")


@dataclass(frozen=True)
class Segment:
    """One row of Segments, its mask on the host.

    mask: bool (H, W) at the image's size; box: the model's own (x0, y0, x1, y1) or None;
    segment_id: panoptic id within the image, else None; annotation_id: for prompted output,
    the annotation the prompt came from, else None; iscrowd: always False (no model
    predicts crowds).
    """

    category_id: int
    score: float
    mask: np.ndarray
    segment_id: int | None = None
    iscrowd: bool = False
    annotation_id: int | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Segments:
    """N segments of one image of size (H, W).

    masks: bool (N, H, W), a torch tensor (on the model's device) or a numpy array;
    category_ids: int64 (N,); scores: float64 (N,);
    boxes: float64 (N, 4) x0, y0, x1, y1 in the image's pixels, for models that predict boxes
    (detectors), else None (the output bbox is then the mask's);
    segment_ids: int64 (N,) panoptic ids, else None;
    annotation_ids: int64 (N,) for prompted output, NO_ANNOTATION where a prompt had none, else None.
    No model predicts crowds: every segment's iscrowd is False.
    """

    masks: Any
    category_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray | None = None
    segment_ids: np.ndarray | None = None
    annotation_ids: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        masks: Any,
        category_ids: Sequence[int] | np.ndarray,
        scores: Sequence[float] | np.ndarray,
        *,
        boxes: Sequence | np.ndarray | None = None,
        segment_ids: Sequence[int] | np.ndarray | None = None,
        annotation_ids: Sequence[int] | np.ndarray | None = None,
    ) -> Segments:
        """Segments from columns given as sequences (lists, arrays or host tensors' lists)."""
        count = len(category_ids)

        def column(values, dtype, shape=(count,)) -> np.ndarray | None:
            return None if values is None else np.asarray(values, dtype=dtype).reshape(shape)

        return cls(
            masks,
            column(category_ids, np.int64),
            column(scores, np.float64),
            boxes=column(boxes, np.float64, (count, 4)),
            segment_ids=column(segment_ids, np.int64),
            annotation_ids=column(annotation_ids, np.int64),
        )

    @classmethod
    def empty(cls, size: tuple[int, int]) -> Segments:
        """No segments of an image of `size` (H, W); host masks."""
        return cls.of(np.zeros((0, *size), dtype=bool), [], [])

    def __len__(self) -> int:
        return len(self.category_ids)

    @property
    def size(self) -> tuple[int, int]:
        """The image's (H, W)."""
        return (int(self.masks.shape[1]), int(self.masks.shape[2]))

    def filter(self, keep: Sequence[bool] | Sequence[int] | np.ndarray) -> Segments:
        """The segments that `keep` selects (a bool per segment, or indices), in its order."""
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64).reshape(-1)

        def take(column: np.ndarray | None) -> np.ndarray | None:
            return None if column is None else column[index]

        if isinstance(self.masks, np.ndarray):
            masks = self.masks[index]
        else:
            import torch

            masks = self.masks[torch.as_tensor(index, dtype=torch.int64, device=self.masks.device)]
        return Segments(
            masks, self.category_ids[index], self.scores[index], take(self.boxes), take(self.segment_ids),
            take(self.annotation_ids),
        )  # fmt: skip

    def above(self, threshold: float | None) -> Segments:
        """The segments scoring at least `threshold`; all of them when it is None."""
        return self if threshold is None else self.filter(self.scores >= threshold)

    def on_host(self) -> Segments:
        """These segments with their masks as a numpy array."""
        if isinstance(self.masks, np.ndarray):
            return self
        return replace(self, masks=self.masks.cpu().numpy())

    def with_scaled_boxes(self, x_factor: float, y_factor: float) -> Segments:
        """Boxes multiplied by the factors (x0 and x1 by x_factor, y0 and y1 by y_factor)."""
        if self.boxes is None:
            return self
        return replace(self, boxes=self.boxes * np.array([x_factor, y_factor] * 2))

    def __iter__(self) -> Iterator[Segment]:
        host = self.on_host()
        for index in range(len(self)):
            yield host.row(index)

    def __getitem__(self, index: int) -> Segment:
        return self.on_host().row(index if index >= 0 else len(self) + index)

    def row(self, index: int) -> Segment:
        """Segment `index`, its mask as the masks hold it."""

        def value(column: np.ndarray | None, cast, missing=None):
            return missing if column is None else cast(column[index])

        box = None if self.boxes is None else tuple(float(v) for v in self.boxes[index])
        annotation = value(self.annotation_ids, int)
        return Segment(
            int(self.category_ids[index]),
            float(self.scores[index]),
            self.masks[index],
            segment_id=value(self.segment_ids, int),
            annotation_id=None if annotation == NO_ANNOTATION else annotation,
            box=box,
        )

    def metadata(self, labels: dict[int, str]) -> dict[str, list]:
        """The per-segment columns as lists, as the output rows carry them: category_ids,
        labels (`labels[category_id]`), scores, segment_ids, iscrowd, annotation_ids (None
        where none) and boxes ((x0, y0, x1, y1) or None)."""
        count = len(self)
        nothing = [None] * count
        annotations = nothing if self.annotation_ids is None else [None if a == NO_ANNOTATION else int(a) for a in self.annotation_ids]
        boxes = nothing if self.boxes is None else self.boxes.tolist()
        return dict(
            zip(
                METADATA_FIELDS,
                (
                    self.category_ids.tolist(),
                    [labels.get(c) for c in self.category_ids.tolist()],
                    self.scores.tolist(),
                    nothing if self.segment_ids is None else self.segment_ids.tolist(),
                    [False] * count,
                    annotations,
                    boxes,
                ),
            )
        )

