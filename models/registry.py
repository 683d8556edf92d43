"""Model names → builders. `rayseg models` prints this table.

Builders are imported when a model is built or its options are read, not with the registry:
a process imports only the model family it runs (torchvision's detection models do not pull
in transformers), which keeps actor start-up and the driver's memory small.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import SegmentationModel, Task

# Weights the project trained itself, installed with the package (models/bundled/*/README.md
# says how each was made).
BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "bundled"


# How a model family runs on CPU-only clusters (pipeline/resources.py, `plan_resources`):
# DATA_PARALLEL — one single-threaded actor per core: small convolutions split badly over
# intra-op threads, which wait for each other at every layer;
# THREADED — one actor per node (per 8 cores) on all its cores: large matrix products split
# well over threads, and parallel copies of the model compete for cache and memory bandwidth.
# Measured in BENCHMARKS.md (two single-threaded processes vs one 2-thread process): unet
# 0.97–1.47× over five runs, maskrcnn 1.25×, sam 0.9× at 1.28× the CPU; fcn and deeplabv3
# follow maskrcnn's ResNet, the maskformer family follows sam.
DATA_PARALLEL = "data-parallel"
THREADED = "threaded"


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, the task it performs, the weights it accepts, its builder.

    module: the module under rayseg.models that holds `builder` and `weights_finder`.
    build(weights, *, weights_sha256, device, storage_options, score_threshold, **options)
    → model, where options are the model's own keyword arguments (see `model_options`).
    weights_file(weights) → the file whose sha256 identifies a checkpoint.
    default_weights: what `--weights` means when it is not given (None: it must be given).
    cpu_parallelism: DATA_PARALLEL or THREADED, how its actors use a CPU-only node.
    """

    name: str
    task: Task
    weights: str
    module: str
    builder: str
    weights_finder: str
    default_weights: str | None = None
    cpu_parallelism: str = DATA_PARALLEL

    def _attribute(self, name: str) -> Callable:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), name)

    @property
    def build(self) -> Callable[..., SegmentationModel]:
        return self._attribute(self.builder)

    @property
    def weights_file(self) -> Callable[[str], str]:
        return self._attribute(self.weights_finder)


_PTH = "torchvision .pth state dict (path or URI); random"

REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        ModelEntry(
            "unet",
            "semantic",
            "rayseg U-Net directory (config.json + model.safetensors), path or URI; random "
            "[default: the bundled unet-shapes weights]",
            "unet",
            "build_unet",
            "unet_weights_file",
            default_weights=str(BUNDLED_WEIGHTS / "unet-shapes"),
        ),
        ModelEntry("fcn", "semantic", _PTH, "torchvision_semantic", "build_fcn", "pth_weights_file"),
        ModelEntry("deeplabv3", "semantic", _PTH, "torchvision_semantic", "build_deeplabv3", "pth_weights_file"),
        ModelEntry("maskrcnn", "instance", _PTH, "maskrcnn", "build_maskrcnn", "pth_weights_file"),
        ModelEntry("maskrcnn_v2", "instance", _PTH, "maskrcnn", "build_maskrcnn_v2", "pth_weights_file"),
        ModelEntry(
            "sam",
            "promptable",
            "HF SAM directory or segment-anything .pth (path or URI); random",
            "sam",
            "build_sam",
            "sam_weights_file",
            cpu_parallelism=THREADED,
        ),
        ModelEntry(
            "maskformer",
            "panoptic",
            "HF MaskFormer checkpoint directory (path or URI); random",
            "maskformer",
            "build_maskformer",
            "hf_weights_file",
            cpu_parallelism=THREADED,
        ),
        ModelEntry(
            "mask2former",
            "panoptic",
            "HF Mask2Former checkpoint directory (path or URI); random",
            "maskformer",
            "build_mask2former",
            "hf_weights_file",
            cpu_parallelism=THREADED,
        ),
        ModelEntry(
            "oneformer",
            "panoptic",
            "HF OneFormer checkpoint directory with tokenizer and class info (path or URI)",
            "oneformer",
            "build_oneformer",
            "hf_weights_file",
            cpu_parallelism=THREADED,
        ),
    ]
}


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


# Arguments every builder takes from the pipeline rather than from the user's options.
_PIPELINE_ARGUMENTS = {"weights", "weights_sha256", "device", "storage_options", "score_threshold"}


def model_options(name: str) -> list[str]:
    """The model-specific options `name`'s builder accepts (e.g. max_detections)."""
    parameters = inspect.signature(get_entry(name).build).parameters
    return [p for p in parameters if p not in _PIPELINE_ARGUMENTS]


def check_options(name: str, options: dict) -> None:
    """Refuses options the model does not take, naming the ones it does, and a bad value of
    the option every model takes (`amp_dtype`), before any work."""
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    if "amp_dtype" in options:
        from .device import check_amp_dtype

        check_amp_dtype(options["amp_dtype"])


def build_model(name: str, weights: str, **arguments) -> SegmentationModel:
    """Builds the registered model `name` from `weights` (see ModelEntry.build for arguments)."""
    return get_entry(name).build(weights, **arguments)
