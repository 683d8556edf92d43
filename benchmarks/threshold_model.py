"""The benchmark's trivial model: the pipeline's own cost, with almost no model in it.

Three masks per image, one per colour channel: the pixels whose red, green or blue value
is above 127. No weights, no torch in its forward. It is registered as `threshold` only
where the benchmark asks — in its own processes (`register()`) and in every Ray worker of
the benchmark's local Ray (benchmarks/register_threshold.py) — never in the product's
registry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayseg.models.base import Segment
from rayseg.models.categories import Category
from rayseg.models.registry import REGISTRY, ModelEntry

NAME = "threshold"
CATEGORIES = [Category(1, "red", True), Category(2, "green", True), Category(3, "blue", True)]
LEVEL = 127


class ThresholdModel:
    """uint8 (H, W, 3) images → per image three segments: channel c > 127, score 1."""

    name = NAME
    task = "semantic"
    categories = CATEGORIES

    def preprocess(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return images

    def forward(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """bool (H, W, 3) per image."""
        return [image > LEVEL for image in images]

    def postprocess(self, raw: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[list[Segment]]:
        return [[Segment(c.id, 1.0, above[..., i]) for i, c in enumerate(CATEGORIES)] for above in raw]


def build_threshold(
    weights: str = "random",
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
) -> ThresholdModel:
    """The registry's builder signature; the model has no weights and ignores all of it."""
    return ThresholdModel()


@dataclass(frozen=True)
class _BenchmarkEntry(ModelEntry):
    """A registry entry whose builder lives outside rayseg.models."""

    @property
    def build(self):
        return build_threshold

    @property
    def weights_file(self):
        return lambda weights: weights


def register() -> None:
    """Adds `threshold` to this process's model registry (idempotent)."""
    REGISTRY.setdefault(NAME, _BenchmarkEntry(NAME, "semantic", "none (random)", "", "", ""))
