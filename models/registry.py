"""Model names → builders. `rayseg models` prints this table.

Builders are imported when a model is built, not with the registry: a process imports only
the model family it runs (torchvision's detection models do not pull in transformers), and
the driver, which checks a run's options and pins its weights from the entry alone
(`options`, models/checkpoint_files.py), imports no model code and no torch at all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import checkpoint_files
from .amp import check_amp_dtype
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
class Scores:
    """What a model's segment `score` is, and what `--score-threshold F` does with it.

    meaning: what the number is; cut: which segments F keeps (`>=` or `>`, per task where
    they differ) and what happens without F; low/high: the values F may take (None:
    unbounded on that side), checked on the driver before any work."""

    meaning: str
    cut: str
    low: float | None = 0.0
    high: float | None = 1.0

    @property
    def range(self) -> str:
        if self.low is None and self.high is None:
            return "any number"
        if self.high is None:
            return f"≥ {self.low:g}"
        return f"{self.low:g} to {self.high:g}"

    def problem(self, threshold: float) -> str | None:
        """Why `threshold` is no score threshold for these scores, or None."""
        if (self.low is not None and threshold < self.low) or (self.high is not None and threshold > self.high):
            return f"must be {self.range} (its scores are {self.meaning}), got {threshold:g}"
        return None


# Scores of the semantic convnets: U-Net, FCN, DeepLabV3.
_CLASS_MEAN = Scores(
    "the mean softmax probability of the class over the segment's pixels",
    "keeps segments with score ≥ F; none dropped without F",
)
_DETECTION = Scores(
    "the detection's class probability",
    "keeps detections with score > F (torchvision's box_score_thresh, strict); default 0.05",
)
_MASKFORMER = Scores(
    "semantic: the mean normalised class score over the segment's pixels; instance: class probability × "
    "mean mask probability inside the mask; panoptic: the query's class probability",
    "semantic keeps score ≥ F (none dropped without F); instance keeps score ≥ F, panoptic keeps queries with "
    "score > F (both default 0.5)",
)


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, the task it performs, the weights it accepts, its builder.

    module: the module under rayseg.models that holds `builder`.
    build(weights, *, weights_sha256, device, storage_options, score_threshold, **options)
    → model, where options are the model's own keyword arguments.
    options: the names of those keyword arguments, as the builder's signature has them
    (tests/test_registry.py holds the two together): read without importing the builder.
    weights_file(weights) → the file whose sha256 identifies a checkpoint, by
    `weights_finder`'s name in models/checkpoint_files.py.
    default_weights: what `--weights` means when it is not given (None: it must be given).
    cpu_parallelism: DATA_PARALLEL or THREADED, how its actors use a CPU-only node.
    scores: what its segments' score is and the `--score-threshold` it takes (`Scores`).
    options_check: "module:function" under rayseg.models, a torch-free check of the options'
    values, called with them before any work (ValueError); None when the builder alone
    checks them.
    """

    name: str
    task: Task
    weights: str
    module: str
    builder: str
    weights_finder: str
    scores: Scores = _CLASS_MEAN
    default_weights: str | None = None
    cpu_parallelism: str = DATA_PARALLEL
    options: tuple[str, ...] = ()
    options_check: str | None = None
    # Whether `--weights random` builds it (oneformer's task input needs a checkpoint's tokenizer).
    random_weights: bool = True

    @property
    def build(self) -> Callable[..., SegmentationModel]:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.builder)

    @property
    def weights_file(self) -> Callable[[str], str]:
        return getattr(checkpoint_files, self.weights_finder)


@dataclass(frozen=True)
class OptionKind:
    """The values a model option takes, checked on the driver before any work: a number
    of `kind` (int or float) within [low, high], a string, or a list; `nullable` when None
    (the builder's default) may be given too. Options with their own checks (`task`,
    `amp_dtype`) are strings here."""

    kind: type
    low: float | None = None
    high: float | None = None
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        """Why `value` is not one of these values, or None."""
        if value is None:
            return None if self.nullable else "must not be null"
        if self.kind in (int, float):
            numeric = (int,) if self.kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, numeric):
                return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                bounds = f"at least {self.low:g}" if self.high is None else f"between {self.low:g} and {self.high:g}"
                return f"must be {bounds}, got {value!r}"
            return None
        if not isinstance(value, self.kind):
            return f"must be a {self.kind.__name__}, got {value!r}"
        return None


_COUNT = OptionKind(int, low=1)
_FRACTION = OptionKind(float, low=0, high=1)
# Every registered model's options, by name: an option means the same in every model that
# takes it (tests/test_registry.py checks that each has a kind).
OPTION_KINDS: dict[str, OptionKind] = {
    "task": OptionKind(str),
    "amp_dtype": OptionKind(str),
    "category_file": OptionKind(str, nullable=True),
    "categories": OptionKind(list, nullable=True),
    "min_area": OptionKind(int, low=0),
    "resize": OptionKind(int, low=1, nullable=True),
    "max_detections": _COUNT,
    "mask_threshold": OptionKind(float),  # a probability for most models, a logit for SAM
    "min_size": _COUNT,
    "max_size": _COUNT,
    "points_per_side": _COUNT,
    "points_per_batch": _COUNT,
    "pred_iou_thresh": OptionKind(float),
    "stability_score_thresh": OptionKind(float),
    "stability_score_offset": OptionKind(float),
    "box_nms_thresh": _FRACTION,
    "crops_n_layers": OptionKind(int, low=0),
    "crops_nms_thresh": _FRACTION,
    "crop_overlap_ratio": _FRACTION,
    "crop_n_points_downscale_factor": _COUNT,
    "min_mask_region_area": OptionKind(int, low=0),
    "model_type": OptionKind(str, nullable=True),
    "vit_num_heads": OptionKind(int, low=1, nullable=True),
    "target_size": OptionKind(int, low=1, nullable=True),
    "encoder_batch_size": OptionKind(int, low=1, nullable=True),
    "overlap_mask_area_threshold": _FRACTION,
}

_PTH = "torchvision .pth state dict (path or URI); random"
_TORCHVISION_SEMANTIC_OPTIONS = ("category_file", "resize", "amp_dtype")
_MASKRCNN_OPTIONS = ("category_file", "max_detections", "mask_threshold", "min_size", "max_size", "amp_dtype")
_MASKFORMER_OPTIONS = ("task", "category_file", "mask_threshold", "overlap_mask_area_threshold", "amp_dtype")

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
            scores=Scores(
                "semantic: the mean softmax probability of the class over the segment's pixels; instance: the same "
                "over the connected component",
                "keeps segments with score ≥ F; none dropped without F",
            ),
            default_weights=str(BUNDLED_WEIGHTS / "unet-shapes"),
            options=("task", "min_area", "amp_dtype"),
            options_check="unet_instances:check_unet_options",
        ),
        ModelEntry(
            "fcn", "semantic", _PTH, "torchvision_semantic", "build_fcn", "pth_weights_file",
            options=_TORCHVISION_SEMANTIC_OPTIONS,
        ),
        ModelEntry(
            "deeplabv3", "semantic", _PTH, "torchvision_semantic", "build_deeplabv3", "pth_weights_file",
            options=_TORCHVISION_SEMANTIC_OPTIONS,
        ),
        ModelEntry(
            "maskrcnn", "instance", _PTH, "maskrcnn", "build_maskrcnn", "pth_weights_file", scores=_DETECTION,
            options=_MASKRCNN_OPTIONS,
        ),
        ModelEntry(
            "maskrcnn_v2", "instance", _PTH, "maskrcnn", "build_maskrcnn_v2", "pth_weights_file", scores=_DETECTION,
            options=_MASKRCNN_OPTIONS,
        ),
        ModelEntry(
            "sam",
            "promptable",
            "HF SAM directory or segment-anything .pth (path or URI); random",
            "sam",
            "build_sam",
            "sam_weights_file",
            scores=Scores(
                "the mask's predicted IoU, SAM's IoU head: a regression output, not bounded to 0-1",
                "keeps masks with score ≥ F; none dropped without F (automatic masks are first cut by "
                "pred_iou_thresh, score > 0.88 by default)",
                low=None,
                high=None,
            ),
            cpu_parallelism=THREADED,
            options=(
                "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                "stability_score_offset", "box_nms_thresh", "crops_n_layers", "crops_nms_thresh",
                "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area",
                "mask_threshold", "model_type", "vit_num_heads", "target_size", "encoder_batch_size",
                "categories", "category_file", "amp_dtype",
            ),
        ),
        ModelEntry(
            "maskformer",
            "panoptic",
            "HF MaskFormer checkpoint directory (path or URI); random",
            "maskformer",
            "build_maskformer",
            "hf_weights_file",
            scores=_MASKFORMER,
            cpu_parallelism=THREADED,
            options=_MASKFORMER_OPTIONS,
            options_check="base:check_universal_options",
        ),
        ModelEntry(
            "mask2former",
            "panoptic",
            "HF Mask2Former checkpoint directory (path or URI); random",
            "maskformer",
            "build_mask2former",
            "hf_weights_file",
            scores=_MASKFORMER,
            cpu_parallelism=THREADED,
            options=_MASKFORMER_OPTIONS,
            options_check="base:check_universal_options",
        ),
        ModelEntry(
            "oneformer",
            "panoptic",
            "HF OneFormer checkpoint directory with tokenizer and class info (path or URI)",
            "oneformer",
            "build_oneformer",
            "hf_weights_file",
            scores=Scores(
                "semantic: the mean normalised class score over the segment's pixels; instance and panoptic: the "
                "query's class probability",
                "semantic keeps score ≥ F (none dropped without F); instance keeps score > F (none dropped without "
                "F); panoptic keeps queries with score > F (default 0.5)",
            ),
            cpu_parallelism=THREADED,
            options=_MASKFORMER_OPTIONS,
            options_check="base:check_universal_options",
            random_weights=False,
        ),
    ]
}


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


# Arguments every builder takes from the pipeline rather than from the user's options.
PIPELINE_ARGUMENTS = frozenset({"weights", "weights_sha256", "device", "storage_options", "score_threshold"})


def model_options(name: str) -> list[str]:
    """The model-specific options `name`'s builder accepts (e.g. max_detections)."""
    return list(get_entry(name).options)


def check_options(name: str, options: dict) -> None:
    """Refuses, before any work, options the model does not take (naming the ones it
    does) and values an option does not take (`OPTION_KINDS`, then the model's own check)."""
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    problems = [f"option {key} {problem}" for key, value in sorted(options.items()) if (problem := OPTION_KINDS[key].problem(value))]
    if problems:
        raise ValueError(f"model {name!r}: " + "; ".join(problems))
    if "amp_dtype" in options:
        check_amp_dtype(options["amp_dtype"])
    if check := get_entry(name).options_check:
        module, _, function = check.partition(":")
        getattr(importlib.import_module(f"{__package__}.{module}"), function)(**options)


def check_score_threshold(name: str, threshold: float | None) -> None:
    """Refuses, before any work, a score threshold outside what model `name`'s scores take."""
    if threshold is not None and (problem := get_entry(name).scores.problem(threshold)):
        raise ValueError(f"model {name!r}: score_threshold {problem}")


def build_model(name: str, weights: str, **arguments) -> SegmentationModel:
    """Builds the registered model `name` from `weights` (see ModelEntry.build for arguments)."""
    return get_entry(name).build(weights, **arguments)
