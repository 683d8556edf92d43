"""OneFormer (Jain et al., 2023) on transformers' OneFormerForUniversalSegmentation: one
network, the task (semantic | instance | panoptic) given as its text task input.

Weights: a transformers OneFormer checkpoint directory, local or any fsspec URI (copied to
a local temp dir), loaded offline (`local_files_only=True`):

- config.json and model.safetensors (or pytorch_model.bin);
- the image processor's settings: preprocessor_config.json, or processor_config.json
  (what newer transformers save, with `image_processor`, max_seq_length, task_seq_length);
- the CLIP tokenizer that turns "the task is {task}" into the task tokens: tokenizer.json,
  or vocab.json + merges.txt;
- class info: the processor settings' `metadata` (thing_ids, class names) when saved with
  it, else the `class_info_file` the settings name (e.g. ade20k_panoptic.json), which must
  be in the directory — it is never downloaded (transformers would fetch it from the
  processor's `repo_path` on the hub).

A missing file is a WeightsError naming it. `random` weights are not offered: the task
input needs a tokenizer, which only a checkpoint directory brings.

Categories: the config's id2label (ids as in the checkpoint); isthing from the class info's
thing_ids, or a `category_file`. Post-processing (models/maskformer.py's device-side,
vectorised equivalents of OneFormerImageProcessor's): semantic and panoptic as for
MaskFormer; instance as OneFormer's processor does it — the top num_queries (query, class)
pairs, non-overlapping masks from its compute_segments (applied, as transformers does, to
the mask *logits* weighted by the class scores), segment score = class probability;
score_threshold (default none) drops pairs at or below it, as the processor's demo mode.
Not reproduced: the processor's relabelling of ADE20K instance labels to thing indices
(triggered by "ade20k" in the class-info file name): labels stay the checkpoint's ids.
"""

from __future__ import annotations

import os
import posixpath

import numpy as np
import torch

from .categories import Category
from .device import to_device
from .hf_checkpoint import (
    HFCheckpoint,
    load_pretrained,
    open_checkpoint,
    processor_arguments,
    required_processor_settings,
)
from .maskformer import (
    MaskFormerSegmenter,
    categories_from_config,
    mask_logits_for,
    panoptic_segments,
)
from .options import UniversalOptions
from .segments import Segments
from .weights import RANDOM, WeightsError

TOKENIZER_FILES = ("tokenizer.json",)
BPE_FILES = ("vocab.json", "merges.txt")


def _tokenizer(checkpoint: HFCheckpoint):
    from transformers import CLIPTokenizer

    directory, uri = checkpoint.local, checkpoint.uri
    has_json = os.path.isfile(os.path.join(directory, "tokenizer.json"))
    missing_bpe = [name for name in BPE_FILES if not os.path.isfile(os.path.join(directory, name))]
    if not has_json and missing_bpe:
        raise WeightsError(
            f"{uri} is not a complete OneFormer checkpoint directory: tokenizer.json (or {' + '.join(BPE_FILES)}; "
            f"missing {', '.join(missing_bpe)}) not found — the task input is tokenised with the checkpoint's tokenizer"
        )
    try:
        return CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{uri}: cannot load the tokenizer: {e}") from e


def _image_processor(checkpoint: HFCheckpoint, settings: dict):
    from transformers import OneFormerImageProcessor
    from transformers.models.oneformer.image_processing_oneformer import (
        load_metadata,
        prepare_metadata,
    )

    directory, uri = checkpoint.local, checkpoint.uri
    metadata = settings.get("metadata")
    if not (isinstance(metadata, dict) and "thing_ids" in metadata):
        class_info_file = settings.get("class_info_file")
        if not class_info_file:
            raise WeightsError(
                f"{uri}: the image processor settings have neither metadata nor a class_info_file (thing/stuff classes)"
            )
        name = posixpath.basename(str(class_info_file))
        if not os.path.isfile(os.path.join(directory, name)):
            raise WeightsError(
                f"{uri} is not a complete OneFormer checkpoint directory: {name} (the class info file named by "
                f"class_info_file) not found — it is never downloaded"
            )
        metadata = prepare_metadata(load_metadata(directory, name))
    try:
        processor = OneFormerImageProcessor(**processor_arguments(settings))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{uri}: cannot build OneFormerImageProcessor from its settings: {e}") from e
    processor.metadata = metadata
    processor.class_info_file = settings.get("class_info_file")
    return processor


class OneFormerSegmenter(MaskFormerSegmenter):
    """OneFormer behind the model protocol: the task tokens are computed once and given
    with every batch; post-processing as the module docstring says."""

    def __init__(
        self,
        network,
        processor,
        task_tokens: torch.Tensor,
        categories: list[Category],
        options: UniversalOptions | None = None,
        **placement,
    ):
        super().__init__(network, processor, categories, options, **placement)
        self.task_tokens = task_tokens.to(self.device)

    def _encode(self, image: np.ndarray) -> dict:
        encoded = self.processor(images=[image], task_inputs=[self.task], return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "pixel_mask": encoded.get("pixel_mask")}

    def _inputs(self, batch: dict) -> dict:
        pixel_values = to_device(batch["pixel_values"], self.device)
        return {"pixel_values": pixel_values, "task_inputs": self.task_tokens.expand(len(pixel_values), -1)}

    def _postprocess_group(self, raw, sizes):
        if self.task != "instance":
            return super()._postprocess_group(raw, sizes)
        results = []
        for index, size in enumerate(sizes):
            results.append(self._instance(raw, index, (int(size[0]), int(size[1]))))
        return results

    def _instance(self, raw, index: int, size: tuple[int, int]) -> Segments:
        classes = raw.class_logits[index]
        num_queries, num_classes = classes.shape[0], classes.shape[1] - 1
        scores, pairs = classes.softmax(-1)[:, :-1].flatten().topk(num_queries, sorted=False)
        if self.given_threshold is not None:  # as transformers: no cut without a threshold
            keep = scores > self.given_threshold
            scores, pairs = scores[keep], pairs[keep]
        # Only the chosen queries' masks are resized.
        queries, inverse = torch.div(pairs, num_classes, rounding_mode="floor").unique(return_inverse=True)
        masks = mask_logits_for(raw, index, self.upsample_first, queries)[inverse]
        segments = panoptic_segments(
            masks, scores, pairs % num_classes, size,
            mask_threshold=self.options.mask_threshold, overlap_threshold=self.options.overlap_mask_area_threshold,
            fuse=torch.zeros_like(self.stuff), label_ids=self.label_ids, segment_ids=False,
        )  # fmt: skip
        return segments


def build_oneformer(
    weights: str,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> OneFormerSegmenter:
    """OneFormerForUniversalSegmentation from an HF checkpoint directory (path or URI).

    options: UniversalOptions (models/options.py); `task` is also the network's task input,
    and a category_file overrides the checkpoint's class info. score_threshold: panoptic
    queries kept at class probability > it (default 0.5), instance pairs kept at score > it
    (default none, as transformers), semantic segments kept at score ≥ it (default none).
    """
    from transformers import OneFormerForUniversalSegmentation, OneFormerProcessor

    parsed = UniversalOptions.parse("oneformer", options)
    if weights == RANDOM:
        raise WeightsError("oneformer has no random weights: its task input needs a checkpoint's tokenizer")
    with open_checkpoint(weights, ("oneformer",), weights_sha256, storage_options) as checkpoint:
        settings = required_processor_settings(checkpoint)
        image_processor = _image_processor(checkpoint, settings)
        tokenizer = _tokenizer(checkpoint)
        network = load_pretrained(OneFormerForUniversalSegmentation, checkpoint)
    outer = settings.get("_processor", {})
    task_length = int(outer.get("task_seq_length", network.config.task_seq_len))
    processor = OneFormerProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        max_seq_length=int(outer.get("max_seq_length", network.config.max_seq_len)), task_seq_length=task_length,
    )  # fmt: skip
    task_tokens = processor._preprocess_text([f"the task is {parsed.task}"], max_length=task_length)
    thing_ids = checkpoint.config.get("thing_ids", image_processor.metadata.get("thing_ids"))
    categories = categories_from_config(network.config.id2label, thing_ids, parsed.category_file, storage_options, weights)
    return OneFormerSegmenter(
        network, processor, task_tokens, categories, parsed, name="oneformer", device=device,
        score_threshold=score_threshold, weights=weights, weights_sha256=checkpoint.digest,
    )  # fmt: skip
