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
    """

    category_id: int
    score: float
    mask: np.ndarray
    segment_id: int | None = None
    iscrowd: bool = False


@runtime_checkable
class SegmentationModel(Protocol):
    name: str
    task: Task
    categories: list[Category]

    def preprocess(self, images: list[np.ndarray]) -> Any:
        """uint8 (H, W, 3) RGB images, any sizes → a model-specific batch (still on the CPU)."""

    def forward(self, batch: Any) -> Any:
        """Runs the network on the model's device; returns raw outputs for `postprocess`."""

    def postprocess(self, raw: Any, sizes: list[tuple[int, int]]) -> list[list[Segment]]:
        """Raw outputs → per image, its segments with masks at that image's (H, W)."""
