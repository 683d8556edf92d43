"""Each model family's options, defined once: name, type, range, default and meaning.

An options class is a frozen pydantic model, importable without torch. The registry names
it (`ModelEntry.options`), `rayseg models` lists it, the driver checks a run's options with
it before any work (spec validation, `pin_weights`), and the builder and the model read
their values from the same object. A value the driver accepts is therefore one the model
takes (tests/test_registry.py proves it for every registered family).

Values are strict: an integer option takes no float or bool, a string option no number, a
number option no string (YAML and `--model-option k=v` give typed values).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .amp import AMP_AUTO, AmpDtype
from .categories import parse_categories
from .checkpoint_files import is_segment_anything_file
from .text_prompts import check_phrases
from .weights import RANDOM

UniversalTask = Literal["semantic", "instance", "panoptic"]

_FIELD_TYPES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "list_type": "a list"}


class ModelOptions(BaseModel):
    """The options every model takes; a family's options class adds its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    amp_dtype: AmpDtype = Field(
        AMP_AUTO,
        description="the network's autocast: auto (float16 on CUDA, none on the CPU), fp16, bf16 or none",
    )

    @classmethod
    def parse(cls, model: str, values: Mapping[str, Any] | ModelOptions | None = None) -> ModelOptions:
        """`values` (option name → value) as this class; ValueError naming the model, the
        options it does not take (and those it does), and every value it refuses."""
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"model {model!r} does not take option(s) {', '.join(unknown)}"
                f"{did_you_mean(unknown[0], cls.model_fields)}; it takes: {', '.join(cls.model_fields)}"
            )
        try:
            return cls(**values)
        except ValidationError as e:
            raise ValueError(f"model {model!r}: " + "; ".join(_problem(cls, error) for error in e.errors())) from None

    def problem_with_weights(self, weights: str) -> str | None:
        """Why these options do not go with `weights` (known from its path alone), or None."""
        return None


def did_you_mean(name: str, known) -> str:
    """' (did you mean X?)' for the closest of `known` to a mistyped `name`, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _problem(cls: type[ModelOptions], error: dict) -> str:
    """One pydantic error as 'option NAME must be …, got VALUE'."""
    if not error["loc"]:  # a model validator's own message: it names its options
        return str(error["ctx"]["error"]) if "ctx" in error and "error" in error["ctx"] else error["msg"]
    name = str(error["loc"][0])
    got = f", got {error['input']!r}"
    kind = error["type"]
    if kind in _FIELD_TYPES:
        return f"option {name} must be {_FIELD_TYPES[kind]}{got}"
    if kind == "literal_error":
        return f"option {name} must be one of {', '.join(choices(cls, name))}{got}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"option {name} must be {value_range(cls, name)}{got}"
    if kind == "value_error":
        return f"option {name}: {error['ctx']['error']}"
    return f"option {name}: {error['msg']}{got}"


def choices(cls: type[ModelOptions], name: str) -> list[str]:
    """The values of option `name` when it is one of a fixed set (a Literal), else []."""
    annotation = cls.model_fields[name].annotation
    literals = [a for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal]
    return [str(value) for literal in literals for value in get_args(literal)]


def describe(cls: type[ModelOptions]) -> list[tuple[str, str, str]]:
    """Each option as (name, 'its values', meaning), for `rayseg models NAME`: 'int at
    least 1, default 32', 'one of auto, fp16, bf16, none; default auto'."""
    rows = []
    for name, field in cls.model_fields.items():
        if choices(cls, name):
            values = f"one of {', '.join(choices(cls, name))};"
        else:
            annotation = field.annotation
            kind = next((a for a in get_args(annotation) if a is not type(None)), annotation)
            values = " ".join(filter(None, [(get_origin(kind) or kind).__name__, value_range(cls, name)])) + ","
        rows.append((name, f"{values} default {field.default}", field.description or ""))
    return rows


def value_range(cls: type[ModelOptions], name: str) -> str:
    """The values option `name` takes, in words: 'between 0 and 1', 'at least 1', '' if any."""
    bounds = {}
    for constraint in cls.model_fields[name].metadata:
        bounds.update({key: getattr(constraint, key) for key in ("ge", "le", "lt") if hasattr(constraint, key)})
    if "ge" in bounds and "le" in bounds:
        return f"between {bounds['ge']:g} and {bounds['le']:g}"
    words = {"ge": "at least", "le": "at most", "lt": "below"}
    return " and ".join(f"{words[key]} {value:g}" for key, value in bounds.items())


def _category_file():
    return Field(None, description="a COCO json (its categories) or a JSON list naming the categories, path or URI")


def _probability(default: float, meaning: str):
    return Field(default, ge=0, le=1, description=meaning)


class UNetOptions(ModelOptions):
    task: Literal["semantic", "instance"] = Field(
        "semantic", description="semantic: one segment per class present; instance: one per connected component of a thing class"
    )
    min_area: int = Field(10, ge=0, description="instance task: smallest component kept, in pixels")


class TorchvisionSemanticOptions(ModelOptions):
    category_file: Optional[str] = _category_file()
    resize: Optional[int] = Field(
        None, ge=1, description="shorter side in pixels to run at (the published weights use 520); none: each image's own size"
    )


class MaskRCNNOptions(ModelOptions):
    category_file: Optional[str] = _category_file()
    max_detections: int = Field(100, ge=1, description="detections kept per image, after per-class NMS")
    mask_threshold: float = Field(
        0.5, ge=0, lt=1, description="a pixel is in the instance when its mask probability exceeds it"
    )
    min_size: int = Field(800, ge=1, description="images are resized so that their short side is min_size …")
    max_size: int = Field(1333, ge=1, description="… unless their long side would then exceed max_size")

    @model_validator(mode="after")
    def sizes_in_order(self) -> MaskRCNNOptions:
        if self.min_size > self.max_size:
            raise ValueError(f"need min_size ≤ max_size, got min_size={self.min_size}, max_size={self.max_size}")
        return self


class SegmentAnythingOptions(ModelOptions):
    """SAM and SAM 2 (`sam`, `sam2`): automatic mask generation and box prompts, with
    segment-anything's and transformers' names and defaults."""

    points_per_side: int = Field(32, ge=1, description="automatic: the point grid's side, per crop")
    points_per_batch: int = Field(64, ge=1, description="point prompts (prompted: boxes) per mask-decoder call")
    pred_iou_thresh: float = _probability(0.88, "automatic: keeps masks whose predicted IoU exceeds it")
    stability_score_thresh: float = _probability(0.95, "automatic: keeps masks whose stability score exceeds it")
    stability_score_offset: float = Field(1.0, description="automatic: the logit offset of the stability score")
    box_nms_thresh: float = _probability(0.7, "automatic: box IoU above which masks of one crop are suppressed")
    crops_n_layers: int = Field(0, ge=0, description="automatic: layers of image crops (0: the whole image only)")
    crops_nms_thresh: float = _probability(0.7, "automatic: box IoU above which masks of different crops are suppressed")
    crop_overlap_ratio: float = _probability(512 / 1500, "automatic: how much neighbouring crops overlap")
    crop_n_points_downscale_factor: int = Field(1, ge=1, description="automatic: grid side divisor per crop layer")
    min_mask_region_area: int = Field(0, ge=0, description="automatic: holes and islands below it are removed (0: off)")
    mask_threshold: float = Field(
        0.0, description="the mask LOGIT cut (segment-anything's mask_threshold; 0.0 is probability 0.5)"
    )
    encoder_batch_size: Optional[int] = Field(
        None, ge=1, description="images (crops) per image-encoder call (default 4 on CUDA, 1 on the CPU)"
    )
    categories: Optional[list] = Field(
        None, description="prompted: the prompts' categories, as {id, name} dicts or names"
    )
    category_file: Optional[str] = _category_file()

    @model_validator(mode="after")
    def consistent(self) -> SegmentAnythingOptions:
        if self.categories is not None and self.category_file is not None:
            raise ValueError("give categories or category_file, not both")
        if self.categories is not None:
            parse_categories(self.categories)  # ValueError naming the bad entry
        if self.crops_n_layers and self.points_per_side // self.crop_n_points_downscale_factor**self.crops_n_layers < 1:
            raise ValueError("crop_n_points_downscale_factor leaves no points in the last crop layer")
        return self


class SamOptions(SegmentAnythingOptions):
    """SAM: the shared options, and those of segment-anything `.pth` files and SAM's padding."""

    model_type: Optional[Literal["vit_b", "vit_l", "vit_h"]] = Field(
        None, description="segment-anything .pth only: the image encoder (default: read from the shapes)"
    )
    vit_num_heads: Optional[int] = Field(
        None, ge=1, description="segment-anything .pth only, without relative positions: the encoder's heads"
    )
    target_size: Optional[int] = Field(
        None, ge=1, description="longest side images are resized to (default: the model's image size)"
    )

    def problem_with_weights(self, weights: str) -> str | None:
        if weights != RANDOM and not is_segment_anything_file(weights) and (self.model_type or self.vit_num_heads):
            return "model_type and vit_num_heads apply to segment-anything .pth checkpoints, not to HF directories"
        return None


class Sam2Options(SegmentAnythingOptions):
    """SAM 2: the shared options. Images are resized to the model's square input (no
    target_size), and only transformers checkpoint directories load (no .pt)."""

    def problem_with_weights(self, weights: str) -> str | None:
        if is_segment_anything_file(weights):
            return (
                "SAM 2's own .pt checkpoints are not read: convert one to a transformers directory "
                "(transformers' convert_sam2_to_hf.py) or give a transformers SAM 2 directory"
            )
        return None


class UniversalOptions(ModelOptions):
    """MaskFormer, Mask2Former and OneFormer: transformers' names and defaults."""

    task: UniversalTask = Field("panoptic", description="the post-processing (OneFormer: also the network's task input)")
    category_file: Optional[str] = Field(
        None, description="a COCO json or JSON list with isthing, for the thing/stuff split (path or URI)"
    )
    mask_threshold: float = _probability(0.5, "panoptic: a query's pixels are those with mask probability ≥ it")
    overlap_mask_area_threshold: float = _probability(
        0.8, "panoptic: a query is kept when it wins more than this fraction of its own area"
    )


class TextPromptOptions(ModelOptions):
    """A text-prompted family's phrases (models/text_prompts.py): each phrase a category."""

    text: Optional[list[str]] = Field(
        None, description="the phrases to find, each a category (--text 'car, person', --text-file); "
        "default: the category file's names"
    )
    category_file: Optional[str] = Field(
        None, description="a COCO json or JSON list whose categories the phrases name (their ids), path or URI"
    )

    @model_validator(mode="after")
    def phrases_given(self) -> TextPromptOptions:
        if self.text is None and self.category_file is None:
            raise ValueError(
                "give the phrases to find: --text 'car, person' (text: in a spec), --text-file, or a --category-file"
            )
        if self.text is not None:
            check_phrases(self.text)
        return self


class Sam3Options(TextPromptOptions):
    """SAM 3's promptable concept segmentation: transformers' names and defaults."""

    mask_threshold: float = _probability(0.5, "a pixel is in the instance when its mask probability exceeds it")
    encoder_batch_size: Optional[int] = Field(
        None, ge=1, description="images per vision-encoder call (default 4 on CUDA, 1 on the CPU)"
    )
    prompt_batch_size: int = Field(
        16, ge=1, description="(image, phrase) pairs per detector and mask-decoder call"
    )


class GroundedSamOptions(TextPromptOptions):
    """Grounded SAM: Grounding DINO's boxes for the phrases (transformers' names and
    defaults), then a mask per box from a SAM-family segmenter."""

    text_threshold: float = _probability(
        0.25, "a box is kept when its phrase (the one whose tokens score it highest) has probability above it"
    )
    max_detections: int = Field(100, ge=1, description="boxes kept per image, the best-scoring ones")
    segmenter: Literal["sam", "sam2"] = Field("sam", description="the model that makes each box's mask")
    segmenter_weights: str = Field(
        RANDOM, description="the segmenter's checkpoint as its family takes it (sam: HF directory or segment-anything "
        ".pth; sam2: HF directory), path or URI; random only with --weights random"
    )
    points_per_batch: int = Field(64, ge=1, description="boxes per mask-decoder call")

    def problem_with_weights(self, weights: str) -> str | None:
        if weights != RANDOM and self.segmenter_weights == RANDOM:
            return "give the segmenter's checkpoint (segmenter_weights): a real detector's boxes with random masks are meaningless"
        if self.segmenter == "sam2":
            return Sam2Options().problem_with_weights(self.segmenter_weights)
        return None
