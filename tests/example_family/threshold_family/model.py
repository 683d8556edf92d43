"""The `threshold` model: three masks per image, one per colour channel — the pixels whose
red, green or blue value exceeds the `level` option. No weights, no torch in its forward:
the benchmarks use it to measure the pipeline's own cost."""

from __future__ import annotations

import numpy as np

from rayseg.models.categories import Category
from rayseg.models.segments import Segments
from rayseg.models.weights import RANDOM, WeightsError

from . import ThresholdOptions

CATEGORIES = [Category(1, "red", True), Category(2, "green", True), Category(3, "blue", True)]


class ThresholdModel:
    """uint8 (H, W, 3) images → per image three segments: channel c > level, score 1."""

    name = "threshold"
    task = "semantic"
    categories = CATEGORIES

    def __init__(self, options: ThresholdOptions, score_threshold: float | None):
        self.level = options.level
        self.score_threshold = score_threshold

    def preprocess(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return images

    def forward(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """bool (H, W, 3) per image."""
        return [image > self.level for image in images]

    def postprocess(self, raw: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Per image: its three channel masks, bool (3, H, W) on the host, each scored 1."""
        ids = [c.id for c in CATEGORIES]
        return [Segments.of(above.transpose(2, 0, 1), ids, [1.0] * 3).above(self.score_threshold) for above in raw]


def build_threshold(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> ThresholdModel:
    """The registry's builder arguments; the model has no weights and runs on the host."""
    if weights != RANDOM:
        raise WeightsError(f"the threshold model has no weights; give --weights random, not {weights}")
    return ThresholdModel(ThresholdOptions.parse("threshold", options), score_threshold)
