"""The protocol every segmentation model implements, and the values it returns.

A model is three steps, so the pipeline can place each where it belongs:
`preprocess` (CPU, numpy in) → `forward` (on the model's device) → `postprocess` (device,
then compact masks to the host). Models know nothing of Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from .categories import Category

if TYPE_CHECKING:  # this module stays importable without torch
    import torch

Task = Literal["semantic", "instance", "panoptic", "promptable"]
# The post-processings a universal (MaskFormer-family) model offers: its `task` option.
UNIVERSAL_TASKS = ("semantic", "instance", "panoptic")


def check_universal_options(task: str = "panoptic", **_other) -> None:
    """A MaskFormer-family model's `task` option (ValueError names the choices): its
    builders call it, and the registry's options_check before any work."""
    if task not in UNIVERSAL_TASKS:
        raise ValueError(f"task must be one of {', '.join(UNIVERSAL_TASKS)}, got {task!r}")


@dataclass
class Segment:
    """One predicted region of one image.

    mask: bool (H, W) at the original image size; None only inside DeviceSegments, whose
    `masks` hold it.
    segment_id: panoptic id within the image; None for semantic and instance output.
    annotation_id: for prompted output, the annotation the prompt came from; else None.
    box: the model's own box (x0, y0, x1, y1), float pixels of the image it was given, for
    models that predict boxes (detectors); None for models that predict only masks, whose
    output bbox is then the mask's.
    """

    category_id: int
    score: float
    mask: np.ndarray | None
    segment_id: int | None = None
    iscrowd: bool = False
    annotation_id: int | None = None
    box: tuple[float, float, float, float] | None = None


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


@dataclass
class DeviceSegments:
    """One image's segments with their masks still where the model made them.

    segments: as `postprocess` returns them, but with `mask` None;
    masks: bool (N, H, W) tensor on the model's device (or the CPU), row i the mask of
    segments[i]. The pipeline bit-packs them there, so only 1 bit per pixel reaches the host.
    """

    segments: list[Segment]
    masks: torch.Tensor


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
        """Raw outputs → per image, its segments with masks at that image's (H, W).

        Models that threshold on the device may also define `postprocess_device(raw, sizes)
        -> list[DeviceSegments]`, the same segments with their masks left on the device;
        the pipeline prefers it (`postprocess` is then `models.device.host_segments` of it).
        """
