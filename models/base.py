"""The protocol every segmentation model implements, and the values it returns.

A model is three steps, so the pipeline can place each where it belongs:
`preprocess` (CPU, numpy in) → `forward` (on the model's device) → `postprocess` (on the
device: Segments, masks left there). Models know nothing of Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from .categories import Category
from .segments import Segments

Task = Literal["semantic", "instance", "panoptic", "promptable"]


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

    def postprocess(self, raw: Any, sizes: list[tuple[int, int]]) -> list[Segments]:
        """Raw outputs → per image, its Segments (models/segments.py), masks at that image's
        (H, W), left where the model made them: on its device the pipeline bit-packs them
        there, so that 1 bit per pixel reaches the host."""
