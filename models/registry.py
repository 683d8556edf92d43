"""Model names → builders. `rayseg models` prints this table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import SegmentationModel, Task
from .unet import build_unet, unet_weights_file


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, the task it performs, the weights it accepts, its builder.

    build(weights, *, weights_sha256, device, storage_options, score_threshold) → model.
    weights_file(weights) → the file whose sha256 identifies a checkpoint.
    """

    name: str
    task: Task
    weights: str
    build: Callable[..., SegmentationModel]
    weights_file: Callable[[str], str]


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        ModelEntry(
            "unet",
            "semantic",
            "rayseg U-Net directory (config.json + model.safetensors), path or URI; random",
            build_unet,
            unet_weights_file,
        ),
    ]
}


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def build_model(name: str, weights: str, **options) -> SegmentationModel:
    """Builds the registered model `name` from `weights` (see ModelEntry.build for options)."""
    return get_entry(name).build(weights, **options)
