"""The protocol every segmentation model implements, and the values it returns.

A model is three steps, so the pipeline can place each where it belongs:
`preprocess` (CPU, numpy in) → `forward` (on the model's device) → `postprocess` (device,
then compact masks to the host). Models know nothing of Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from .categories import Category

Task = Literal["semantic", "instance", "panoptic", "promptable"]


@dataclass
class Segment:
    """One predicted region of one image.

    mask: bool (H, W) at the original image size.
    segment_id: panoptic id within the image; None for semantic and instance output.
    annotation_id: for prompted output, the annotation the prompt came from; else None.
    """

    category_id: int
    score: float
    mask: np.ndarray
    segment_id: int | None = None
    iscrowd: bool = False
    annotation_id: int | None = None


@dataclass
class Prompts:
    """Box prompts for one image, travelling with it through the pipeline.

    boxes: float32 (K, 4) [x0, y0, x1, y1] in pixels of the decoded image.
    category_ids: int32 (K,) the category each box stands for (kept on its mask).
    annotation_ids: int64 (K,) the annotation each box came from, -1 when it has none.
    """

    boxes: np.ndarray
    category_ids: np.ndarray
    annotation_ids: np.ndarray


@runtime_checkable
class SegmentationModel(Protocol):
    name: str
    task: Task
    categories: list[Category]

    def preprocess(self, images: list[np.ndarray]) -> Any:
        """uint8 (H, W, 3) RGB images, any sizes → a model-specific batch (still on the CPU).

        Promptable models also take `prompts: list[Prompts | None]`, one per image.
        """

    def forward(self, batch: Any) -> Any:
        """Runs the network on the model's device; returns raw outputs for `postprocess`."""

    def postprocess(self, raw: Any, sizes: list[tuple[int, int]]) -> list[list[Segment]]:
        """Raw outputs → per image, its segments with masks at that image's (H, W)."""
