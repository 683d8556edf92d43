"""Which model a run uses: its name, weights and options, as the driver pins them and every
inference actor builds them (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.weights import RANDOM


@dataclass(frozen=True)
class ModelSpec:
    """Which model, from which weights, with which post-processing options.

    options: the model's own options, by name (its family's options class, models/options.py).
    """

    name: str
    weights: str = RANDOM
    weights_sha256: str | None = None
    score_threshold: float | None = None
    options: dict = field(default_factory=dict)
