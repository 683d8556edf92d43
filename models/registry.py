"""Model names → builders. `rayseg models` prints this table."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from .base import SegmentationModel, Task
from .maskformer import build_mask2former, build_maskformer, hf_weights_file
from .maskrcnn import build_maskrcnn, build_maskrcnn_v2
from .oneformer import build_oneformer
from .sam import build_sam, sam_weights_file
from .torchvision_checkpoint import pth_weights_file
from .torchvision_semantic import build_deeplabv3, build_fcn
from .unet import build_unet, unet_weights_file


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, the task it performs, the weights it accepts, its builder.

    build(weights, *, weights_sha256, device, storage_options, score_threshold, **options)
    → model, where options are the model's own keyword arguments (see `model_options`).
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
        ModelEntry(
            "fcn",
            "semantic",
            "torchvision .pth state dict (path or URI); random",
            build_fcn,
            pth_weights_file,
        ),
        ModelEntry(
            "deeplabv3",
            "semantic",
            "torchvision .pth state dict (path or URI); random",
            build_deeplabv3,
            pth_weights_file,
        ),
        ModelEntry(
            "maskrcnn",
            "instance",
            "torchvision .pth state dict (path or URI); random",
            build_maskrcnn,
            pth_weights_file,
        ),
        ModelEntry(
            "maskrcnn_v2",
            "instance",
            "torchvision .pth state dict (path or URI); random",
            build_maskrcnn_v2,
            pth_weights_file,
        ),
        ModelEntry(
            "sam",
            "promptable",
            "HF SAM directory or segment-anything .pth (path or URI); random",
            build_sam,
            sam_weights_file,
        ),
        ModelEntry(
            "maskformer",
            "panoptic",
            "HF MaskFormer checkpoint directory (path or URI); random",
            build_maskformer,
            hf_weights_file,
        ),
        ModelEntry(
            "mask2former",
            "panoptic",
            "HF Mask2Former checkpoint directory (path or URI); random",
            build_mask2former,
            hf_weights_file,
        ),
        ModelEntry(
            "oneformer",
            "panoptic",
            "HF OneFormer checkpoint directory with tokenizer and class info (path or URI)",
            build_oneformer,
            hf_weights_file,
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
    """Refuses options the model does not take, naming the ones it does, before any work."""
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )


def build_model(name: str, weights: str, **arguments) -> SegmentationModel:
    """Builds the registered model `name` from `weights` (see ModelEntry.build for arguments)."""
    return get_entry(name).build(weights, **arguments)
