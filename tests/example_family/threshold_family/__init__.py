"""The `threshold` model family's registration: what rayseg reads on the driver.

This module is what the entry point names, so it imports no torch and no model code: the
driver checks a run's options (`ThresholdOptions`) and pins its weights from `ENTRY` alone;
the builder (threshold_family/model.py) is imported in the inference actors only.
"""

from __future__ import annotations

from pydantic import Field

from rayseg.models.checkpoint_files import pth_weights_file
from rayseg.models.options import ModelOptions
from rayseg.models.registry import ModelEntry, Scores


class ThresholdOptions(ModelOptions):
    level: int = Field(127, ge=0, le=254, description="a pixel is in a channel's mask when its value exceeds it")


ENTRY = ModelEntry(
    name="threshold",
    task="semantic",
    weights="none: the model has no weights (--weights random)",
    builder="threshold_family.model:build_threshold",
    options=ThresholdOptions,
    weights_file=pth_weights_file,
    scores=Scores("always 1", "keeps segments with score ≥ F; none dropped without F"),
)
