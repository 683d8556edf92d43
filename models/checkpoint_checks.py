"""What the driver can tell of a checkpoint before any actor loads it, without torch and
without unpickling: its config.json and, for safetensors, the tensor shapes in its header.

A family's check (`ModelEntry.checkpoint_check`) compares them with the family and the
run's categories, so a checkpoint of another architecture or a class count that disagrees
with the categories fails on the driver (exit 2) rather than in every actor. torchvision
`.pth` files are pickles: their shapes are read only when an actor loads them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .categories import Category
from .text_prompts import TOKENIZER_FILE, joined_prompt, too_long


@dataclass(frozen=True)
class CheckpointInfo:
    """config: the checkpoint's config.json (None: it has none); shapes: tensor name →
    shape from a safetensors header (None: not a safetensors file); categories: those the
    run names (a category file), None when it names none; text: a text-prompted run's
    phrases and tokenizer: its tokenizer.json (None: the checkpoint has none)."""

    config: dict | None
    shapes: dict[str, tuple[int, ...]] | None
    categories: list[Category] | None
    text: list[str] | None = None
    tokenizer: str | None = None


CheckpointCheck = Callable[[CheckpointInfo], "str | None"]


def safetensors_shapes(head: bytes) -> dict[str, tuple[int, ...]] | None:
    """Tensor name → shape from the start of a safetensors file (None when `head` does not
    hold its whole header)."""
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if len(head) < 8 + length:
        return None
    try:
        header = json.loads(head[8 : 8 + length])
    except ValueError:
        return None
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def hf_family(*model_types: str, labelled: bool = True) -> CheckpointCheck:
    """A transformers family's check: config.json names one of `model_types`, and, for a
    `labelled` family (its labels are its categories), a run's category file names only
    labels the checkpoint predicts (its id2label)."""

    def check(info: CheckpointInfo) -> str | None:
        if info.config is None:
            return None  # the weights finder and the loader name the missing file
        model_type = info.config.get("model_type")
        if model_type not in model_types:
            wanted = " or ".join(map(repr, model_types))
            return f"it holds a {model_type!r} checkpoint, not {wanted} (config.json model_type)"
        labels = {int(k) for k in (info.config.get("id2label") or {})}
        if labelled and info.categories is not None and labels:
            unknown = sorted({c.id for c in info.categories} - labels)
            if unknown:
                return (
                    f"the category file names ids {unknown[:10]} that the checkpoint does not predict "
                    f"(its labels are {min(labels)}..{max(labels)})"
                )
        return None

    return check


# The U-Net's 1×1 head: one output channel per category of its config.
UNET_HEAD = "head.weight"


def unet(info: CheckpointInfo) -> str | None:
    """A rayseg U-Net: a config that is a U-Net's, with as many categories as the head has channels."""
    if info.config is None:
        return None
    if info.config.get("architecture", "unet") != "unet" or "categories" not in info.config:
        return f"its config.json is not a rayseg U-Net config (model_type {info.config.get('model_type')!r})"
    if info.shapes is not None and UNET_HEAD in info.shapes:
        channels, count = info.shapes[UNET_HEAD][0], len(info.config["categories"])
        if channels != count:
            return f"its config lists {count} categories, its head predicts {channels} classes"
    return None


def text_prompted(*model_types: str, max_tokens: Callable[[dict | None], int], joined: bool) -> CheckpointCheck:
    """A text-prompted transformers family's check: `hf_family(model_types)`, and the run's
    phrases fit the text encoder — each phrase (`joined`: the prompt of all phrases, as the
    model reads them) at most `max_tokens(config)` tokens of the checkpoint's tokenizer."""
    family = hf_family(*model_types, labelled=False)

    def check(info: CheckpointInfo) -> str | None:
        if problem := family(info):
            return problem
        if info.text is None:
            return None
        if info.tokenizer is None:
            return f"it has no {TOKENIZER_FILE} to read the text prompts with (save the processor's fast tokenizer)"
        prompts = [joined_prompt(info.text)] if joined else info.text
        return too_long(info.tokenizer, prompts, max_tokens(info.config))

    return check
