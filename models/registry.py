"""Model names → families: ours, and outside ones found through entry points. `rayseg
models` prints this table.

Builders are imported when a model is built, not with the registry: a process imports only
the model family it runs (torchvision's detection models do not pull in transformers), and
the driver, which checks a run's options and pins its weights from the entry alone (its
options class, models/options.py, and its weights finder, models/checkpoint_files.py),
imports no model code and no torch at all.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import checkpoint_checks, checkpoint_files
from .base import SegmentationModel, Task
from .checkpoint_checks import CheckpointCheck
from .options import (
    GroundedSamOptions,
    MaskRCNNOptions,
    ModelOptions,
    Sam2Options,
    Sam3Options,
    SamOptions,
    TorchvisionSemanticOptions,
    UNetOptions,
    UniversalOptions,
    did_you_mean,
)
from .text_prompts import GROUNDING_DINO_TEXT_TOKENS, SAM3_TEXT_TOKENS

log = logging.getLogger(__name__)

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
    """A registered model family: its name, task, weights, builder and options.

    builder: "package.module:function", imported only when a model is built (any package:
    outside families register through the `rayseg.models` entry point group);
    builder(weights, *, weights_sha256, device, storage_options, score_threshold, **options)
    → a SegmentationModel, its options parsed by `options`.
    options: the family's options class (models/options.py), torch-free: what the driver
    checks and the builder reads.
    weights_file(weights, storage_options) → the file whose sha256 identifies a checkpoint
    (models/checkpoint_files.py), torch-free.
    default_weights: what `--weights` means when it is not given (None: it must be given).
    cpu_parallelism: DATA_PARALLEL or THREADED, how its actors use a CPU-only node.
    scores: what its segments' score is and the `--score-threshold` it takes (`Scores`).
    random_weights: whether `--weights random` builds it.
    checkpoint_check: what the driver can tell of a checkpoint without loading it — its
    config.json and safetensors header against the family and the run's categories
    (models/checkpoint_checks.py): a reason it cannot be this family's, or None.
    """

    name: str
    task: Task
    weights: str
    builder: str
    options: type[ModelOptions]
    weights_file: Callable[[str, dict | None], str]
    scores: Scores = _CLASS_MEAN
    default_weights: str | None = None
    cpu_parallelism: str = DATA_PARALLEL
    random_weights: bool = True
    checkpoint_check: CheckpointCheck | None = None

    def build(self, weights: str, **arguments) -> SegmentationModel:
        """The model from `weights`; `arguments` are the builder's (options included)."""
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(weights, **arguments)

    def check(self, options: Mapping[str, Any], weights: str | None = None) -> ModelOptions:
        """`options` parsed by the family's options class, checked with `weights` where
        given; ValueError naming the model and every problem, before any work."""
        parsed = self.options.parse(self.name, options)
        if weights is not None and (problem := parsed.problem_with_weights(weights)):
            raise ValueError(f"model {self.name!r}: {problem}")
        return parsed


_PTH = "torchvision .pth state dict (path or URI); random"
_MODELS = "rayseg.models"

OURS: list[ModelEntry] = [
    ModelEntry(
        "unet",
        "semantic",
        "rayseg U-Net directory (config.json + model.safetensors), path or URI; random "
        "[default: the bundled unet-shapes weights]",
        f"{_MODELS}.unet:build_unet",
        UNetOptions,
        checkpoint_files.unet_weights_file,
        scores=Scores(
            "semantic: the mean softmax probability of the class over the segment's pixels; instance: the same "
            "over the connected component",
            "keeps segments with score ≥ F; none dropped without F",
        ),
        default_weights=str(BUNDLED_WEIGHTS / "unet-shapes"),
        checkpoint_check=checkpoint_checks.unet,
    ),
    ModelEntry(
        "fcn", "semantic", _PTH, f"{_MODELS}.torchvision_semantic:build_fcn", TorchvisionSemanticOptions,
        checkpoint_files.pth_weights_file,
    ),
    ModelEntry(
        "deeplabv3", "semantic", _PTH, f"{_MODELS}.torchvision_semantic:build_deeplabv3", TorchvisionSemanticOptions,
        checkpoint_files.pth_weights_file,
    ),
    ModelEntry(
        "maskrcnn", "instance", _PTH, f"{_MODELS}.maskrcnn:build_maskrcnn", MaskRCNNOptions,
        checkpoint_files.pth_weights_file, scores=_DETECTION,
    ),
    ModelEntry(
        "maskrcnn_v2", "instance", _PTH, f"{_MODELS}.maskrcnn:build_maskrcnn_v2", MaskRCNNOptions,
        checkpoint_files.pth_weights_file, scores=_DETECTION,
    ),
    ModelEntry(
        "sam",
        "promptable",
        "HF SAM directory or segment-anything .pth (path or URI); random",
        f"{_MODELS}.sam:build_sam",
        SamOptions,
        checkpoint_files.sam_weights_file,
        scores=Scores(
            "the mask's predicted IoU, SAM's IoU head: a regression output, not bounded to 0-1",
            "keeps masks with score ≥ F; none dropped without F (automatic masks are first cut by "
            "pred_iou_thresh, score > 0.88 by default)",
            low=None,
            high=None,
        ),
        cpu_parallelism=THREADED,
        checkpoint_check=checkpoint_checks.hf_family("sam", labelled=False),
    ),
    ModelEntry(
        "sam2",
        "promptable",
        "HF SAM 2 directory (path or URI; SAM 2's own .pt: convert it first); random",
        f"{_MODELS}.sam2:build_sam2",
        Sam2Options,
        checkpoint_files.hf_weights_file,
        scores=Scores(
            "the mask's predicted IoU, SAM 2's IoU head: a sigmoid, 0-1",
            "keeps masks with score ≥ F; none dropped without F (automatic masks are first cut by "
            "pred_iou_thresh, score > 0.88 by default)",
        ),
        cpu_parallelism=THREADED,
        checkpoint_check=checkpoint_checks.hf_family("sam2", labelled=False),
    ),
    *(
        ModelEntry(
            name,
            "panoptic",
            f"HF {title} checkpoint directory (path or URI); random",
            f"{_MODELS}.maskformer:build_{name}",
            UniversalOptions,
            checkpoint_files.hf_weights_file,
            scores=_MASKFORMER,
            cpu_parallelism=THREADED,
            checkpoint_check=checkpoint_checks.hf_family(name),
        )
        for name, title in (("maskformer", "MaskFormer"), ("mask2former", "Mask2Former"))
    ),
    ModelEntry(
        "sam3",
        "promptable",
        "HF SAM 3 directory with its processor and tokenizer.json (path or URI); random",
        f"{_MODELS}.sam3:build_sam3",
        Sam3Options,
        checkpoint_files.hf_weights_file,
        scores=Scores(
            "the query's score: sigmoid(class logit) × sigmoid(presence logit), transformers' score",
            "keeps instances with score > F (default 0.3, transformers' threshold)",
        ),
        cpu_parallelism=THREADED,
        checkpoint_check=checkpoint_checks.text_prompted("sam3", max_tokens=lambda config: SAM3_TEXT_TOKENS, joined=False),
    ),
    ModelEntry(
        "grounded-sam",
        "instance",
        "HF Grounding DINO directory with its processor and tokenizer.json (path or URI), masks from option "
        "segmenter_weights (a sam or sam2 checkpoint); random",
        f"{_MODELS}.grounded_sam:build_grounded_sam",
        GroundedSamOptions,
        checkpoint_files.hf_weights_file,
        scores=Scores(
            "the box's detection score, transformers': the sigmoid of its highest logit over the prompt's tokens",
            "keeps boxes with score > F (default 0.25, transformers' threshold), then max_detections per image",
        ),
        cpu_parallelism=THREADED,
        checkpoint_check=checkpoint_checks.text_prompted(
            "grounding-dino",
            max_tokens=lambda config: int((config or {}).get("max_text_len", GROUNDING_DINO_TEXT_TOKENS)),
            joined=True,
        ),
    ),
    ModelEntry(
        "eomt",
        "panoptic",
        "HF EoMT checkpoint directory (path or URI); random",
        f"{_MODELS}.eomt:build_eomt",
        UniversalOptions,
        checkpoint_files.hf_weights_file,
        scores=Scores(
            "semantic: the mean normalised class score over the segment's pixels; instance: class probability × "
            "mean mask probability inside the mask; panoptic: the query's class probability",
            "semantic keeps score ≥ F (none dropped without F); instance keeps score ≥ F, panoptic keeps queries "
            "with score > F (both default 0.8, transformers' threshold)",
        ),
        cpu_parallelism=THREADED,
        checkpoint_check=checkpoint_checks.hf_family("eomt"),
    ),
    ModelEntry(
        "oneformer",
        "panoptic",
        "HF OneFormer checkpoint directory with tokenizer and class info (path or URI)",
        f"{_MODELS}.oneformer:build_oneformer",
        UniversalOptions,
        checkpoint_files.hf_weights_file,
        scores=Scores(
            "semantic: the mean normalised class score over the segment's pixels; instance and panoptic: the "
            "query's class probability",
            "semantic keeps score ≥ F (none dropped without F); instance keeps score > F (none dropped without "
            "F); panoptic keeps queries with score > F (default 0.5)",
        ),
        cpu_parallelism=THREADED,
        random_weights=False,
        checkpoint_check=checkpoint_checks.hf_family("oneformer"),
    ),
]

# Outside model families: installed distributions that name a ModelEntry in this entry
# point group, e.g. in their pyproject.toml
#   [project.entry-points."rayseg.models"]
#   threshold = "threshold_family:ENTRY"
# The module named must import without torch (the driver reads the entry to check a run).
ENTRY_POINT_GROUP = "rayseg.models"


def discovered_entries() -> list[ModelEntry]:
    """The ModelEntry objects that installed distributions register in ENTRY_POINT_GROUP.
    One that does not load, is no ModelEntry or takes a name already taken is left out,
    with a warning naming it: a broken plug-in never hides the other models."""
    found: list[ModelEntry] = []
    taken = {entry.name for entry in OURS}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry = point.load()
        except Exception as e:  # any error of an outside module: reported, not raised
            log.warning("model family %r (%s) does not load: %s", point.name, point.value, e)
            continue
        if not isinstance(entry, ModelEntry):
            log.warning("model family %r (%s) is a %s, not a ModelEntry", point.name, point.value, type(entry).__name__)
        elif entry.name in taken:
            log.warning("model family %r (%s) takes the registered name %r; left out", point.name, point.value, entry.name)
        else:
            found.append(entry)
            taken.add(entry.name)
    return found


class Registry(Mapping[str, ModelEntry]):
    """Model name → ModelEntry: ours, then the outside families, discovered on first use
    rather than on import, because an outside family's module imports this one."""

    def __init__(self, ours: list[ModelEntry]):
        self._ours = ours
        self._entries: dict[str, ModelEntry] | None = None

    def _all(self) -> dict[str, ModelEntry]:
        if self._entries is None:
            self._entries = {entry.name: entry for entry in [*self._ours, *discovered_entries()]}
        return self._entries

    def __getitem__(self, name: str) -> ModelEntry:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


REGISTRY = Registry(OURS)


def get_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_model(name)) from None


def unknown_model(name: str) -> str:
    """'unknown model …', with the closest registered names and all of them."""
    return f"unknown model {name!r}{did_you_mean(name, REGISTRY)}; registered: {', '.join(sorted(REGISTRY))}"


def check_options(name: str, options: Mapping[str, Any], weights: str | None = None) -> ModelOptions:
    """Model `name`'s options parsed and checked before any work (`ModelEntry.check`)."""
    return get_entry(name).check(options, weights)


def check_score_threshold(name: str, threshold: float | None) -> None:
    """Refuses, before any work, a score threshold outside what model `name`'s scores take."""
    if threshold is not None and (problem := get_entry(name).scores.problem(threshold)):
        raise ValueError(f"model {name!r}: score_threshold {problem}")


def build_model(name: str, weights: str, **arguments) -> SegmentationModel:
    """Builds the registered model `name` from `weights` (see ModelEntry for the arguments)."""
    return get_entry(name).build(weights, **arguments)
