"""SAM 3 (Carion et al., 2025) on transformers' `Sam3Model`: promptable concept
segmentation — every instance of each text phrase, with its mask, box and score.

Weights: a transformers SAM 3 checkpoint directory (config.json + model.safetensors and the
processor's files: processor_config.json, tokenizer.json), local or any fsspec URI; or
`random` (RANDOM below: a tiny seeded network and a byte tokenizer, for tests and
benchmarks).

Prompts: the run's phrases (`text`, models/text_prompts.py), each one category. Box prompts
(`--prompts`) are SAM 3's visual exemplars: an image's boxes of a category join that
category's phrase (a category the run has no phrase for is prompted as transformers
prompts boxes alone, with the text "visual"), and the model finds every instance like
them — not one mask per box, as `sam` gives.

Batching, where the loop a user writes (`Sam3Processor(images=image, text=phrase)` then
`Sam3Model`, per image and phrase) repeats work:
- the text encoder runs once, for all phrases, when the model is built;
- the vision encoder runs once per image, encoder_batch_size images a call;
- the DETR encoder/decoder and mask decoder run on (image, phrase) pairs, prompt_batch_size
  pairs a call, each pair's image features taken from its image's encoding.
Masks of queries scoring at or below the threshold are dropped on the device before they
are resized. The result of each pair is transformers' own
`Sam3Processor.post_process_instance_segmentation` (score = sigmoid(logit) ×
sigmoid(presence), kept when > the threshold; masks resized bilinearly and cut at
mask_threshold; boxes x0, y0, x1, y1 in image pixels), so it equals the loop's (tests).
No NMS is applied, as transformers applies none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from .base import Prompts
from .categories import Category, load_category_file
from .device import DeviceModel, autocast, to_device
from .hf_checkpoint import load_with_processor
from .options import Sam3Options
from .sam import check_prompts
from .segments import Segments
from .text_prompts import SAM3_TEXT_TOKENS, byte_tokenizer, text_categories
from .weights import RANDOM, random_network

# transformers' default `threshold` of post_process_instance_segmentation.
DEFAULT_SCORE_THRESHOLD = 0.3
# The text transformers gives a box prompt without a phrase.
VISUAL = "visual"
ENCODER_BATCH_CUDA = 4

# `--weights random`: 2-layer ViT of width 32 on 112×112 inputs (patch 14), a 1-layer text
# encoder over the byte tokenizer's 258 tokens, 1-layer DETR encoder and decoder, 10 queries.
_WIDTH = 32
RANDOM_CONFIG = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam3_vit_model", "hidden_size": _WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 112, "patch_size": 14, "window_size": 4,
            "global_attn_indexes": [1], "pretrain_image_size": 112,
        },
        "fpn_hidden_size": _WIDTH, "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
    },
    "text_config": {
        "hidden_size": _WIDTH, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 258, "max_position_embeddings": SAM3_TEXT_TOKENS, "projection_dim": _WIDTH,
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 257,
    },
    "geometry_encoder_config": {"hidden_size": _WIDTH, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "detr_encoder_config": {"hidden_size": _WIDTH, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "detr_decoder_config": {
        "hidden_size": _WIDTH, "num_layers": 1, "num_queries": 10, "num_attention_heads": 2, "intermediate_size": 64,
    },
    "mask_decoder_config": {"hidden_size": _WIDTH, "num_attention_heads": 2},
}  # fmt: skip
RANDOM_IMAGE_SIZE = 112


@dataclass(frozen=True)
class _Pair:
    """One detector query set: image `image` with prompt `prompt` (an index of the model's
    prompts: its phrases, then VISUAL), category `category_id`, and exemplar boxes (a
    processor's normalised cx, cy, w, h float (1, K, 4) and labels (1, K); None: text only)."""

    image: int
    prompt: int
    category_id: int
    boxes: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def box_count(self) -> int:
        return 0 if self.boxes is None else self.boxes.shape[1]


@dataclass
class Sam3Batch:
    """pixel_values float (B, 3, S, S) of B images; their (image, prompt) pairs."""

    pixel_values: torch.Tensor
    pairs: list[_Pair]


@dataclass
class _Found:
    """One pair's detections, kept queries only: logits (1, Q'), boxes (1, Q', 4) x0, y0, x1,
    y1 in [0, 1], mask logits (1, Q', h, w) and presence logit (1, 1), float32."""

    pair: _Pair
    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor
    pred_masks: torch.Tensor
    presence_logits: torch.Tensor


class Sam3Segmenter(DeviceModel):
    """SAM 3 behind the model protocol (see the module docstring)."""

    name = "sam3"
    task = "promptable"

    def __init__(self, network, processor, categories: list[Category], options: Sam3Options, **placement):
        super().__init__(network, options, **placement)
        self.processor = processor
        self.categories = categories
        self.score_threshold = DEFAULT_SCORE_THRESHOLD if self.score_threshold is None else float(self.score_threshold)
        self.encoder_batch_size = options.encoder_batch_size or (ENCODER_BATCH_CUDA if self.device.type == "cuda" else 1)
        self.prompts = [category.name for category in categories] + [VISUAL]
        self._prompt_of = {category.id: index for index, category in enumerate(categories)}
        # As Sam3Processor tokenizes a prompt; the text encoder runs once for all of them.
        tokens = processor.tokenizer(self.prompts, return_tensors="pt", padding="max_length", max_length=SAM3_TEXT_TOKENS)
        with torch.inference_mode():
            features = self.network.get_text_features(
                input_ids=to_device(tokens["input_ids"], self.device),
                attention_mask=to_device(tokens["attention_mask"], self.device),
            )
        self.text_features = features.pooler_output.float()  # (P + 1, SAM3_TEXT_TOKENS, hidden)
        self.text_mask = to_device(tokens["attention_mask"], self.device)

    def preprocess(self, images: list[np.ndarray], prompts: list[Prompts | None] | None = None) -> Sam3Batch:
        """uint8 (H, W, 3) images (and per image its box prompts, or None) → the processor's
        pixel_values and each image's pairs: one per phrase, an image's exemplar boxes of a
        category with that category's phrase, boxes of other categories with VISUAL."""
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pairs = []
        for index, image in enumerate(images):
            boxes_by_category = {}
            if prompts is not None and prompts[index] is not None:
                boxes, category_ids, _ = check_prompts(prompts[index])
                for category_id in dict.fromkeys(category_ids):
                    chosen = [box.tolist() for box, c in zip(boxes, category_ids) if c == category_id]
                    boxes_by_category[category_id] = self._exemplars(chosen, image.shape[:2])
            for category_id in dict.fromkeys([c.id for c in self.categories] + list(boxes_by_category)):
                prompt = self._prompt_of.get(category_id, len(self.prompts) - 1)
                pairs.append(_Pair(index, prompt, category_id, *boxes_by_category.get(category_id, (None, None))))
        return Sam3Batch(pixel_values, pairs)

    def _exemplars(self, boxes: list[list[float]], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes x0, y0, x1, y1 in pixels → the processor's input_boxes and labels (positive)."""
        encoded = self.processor(
            original_sizes=[list(size)], input_boxes=[boxes], input_boxes_labels=[[1] * len(boxes)], return_tensors="pt"
        )
        return encoded["input_boxes"], encoded["input_boxes_labels"]

    @torch.inference_mode()
    def forward(self, batch: Sam3Batch) -> list[_Found]:
        """The vision encoder per image, then the detector per pair, in chunks of pairs with
        the same number of exemplar boxes; only queries scoring above the threshold kept."""
        levels, positions = self._encode(to_device(batch.pixel_values, self.device))
        groups: dict[int, list[_Pair]] = {}
        for pair in batch.pairs:
            groups.setdefault(pair.box_count, []).append(pair)
        found = []
        size = self.options.prompt_batch_size
        for pairs in groups.values():
            for start in range(0, len(pairs), size):
                found.extend(self._detect(pairs[start : start + size], levels, positions))
        return found

    def _encode(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per FPN level, every image's features and position encodings (B, C, h, w)."""
        chunks = []
        for start in range(0, len(pixel_values), self.encoder_batch_size):
            with autocast(self.device, self.amp_dtype):
                chunks.append(self.network.get_vision_features(pixel_values=pixel_values[start : start + self.encoder_batch_size]))
        levels = [torch.cat([c.fpn_hidden_states[i] for c in chunks]) for i in range(len(chunks[0].fpn_hidden_states))]
        positions = [torch.cat([c.fpn_position_encoding[i] for c in chunks]) for i in range(len(levels))]
        return levels, positions

    def _detect(self, pairs: list[_Pair], levels: list[torch.Tensor], positions: list[torch.Tensor]) -> list[_Found]:
        images = torch.tensor([pair.image for pair in pairs], device=self.device)
        prompts = torch.tensor([pair.prompt for pair in pairs], device=self.device)
        vision = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(level[images] for level in levels),
            fpn_position_encoding=tuple(position[images] for position in positions),
        )
        boxes = labels = None
        if pairs[0].boxes is not None:
            boxes = to_device(torch.cat([pair.boxes for pair in pairs]), self.device)
            labels = to_device(torch.cat([pair.labels for pair in pairs]), self.device)
        with autocast(self.device, self.amp_dtype):
            outputs = self.network(
                vision_embeds=vision,
                text_embeds=BaseModelOutputWithPooling(pooler_output=self.text_features[prompts]),
                attention_mask=self.text_mask[prompts],
                input_boxes=boxes,
                input_boxes_labels=labels,
            )
        presence = outputs.presence_logits.float()
        scores = outputs.pred_logits.float().sigmoid() * presence.sigmoid()
        found = []
        for row, pair in enumerate(pairs):
            keep = scores[row] > self.score_threshold
            found.append(
                _Found(
                    pair,
                    outputs.pred_logits[row][keep][None].float(),
                    outputs.pred_boxes[row][keep][None].float(),
                    outputs.pred_masks[row][keep][None].float(),
                    presence[row][None],
                )
            )
        return found

    @torch.inference_mode()
    def postprocess(self, raw: list[_Found], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Each pair through the processor's post_process_instance_segmentation at its
        image's size; an image's segments are its pairs', in prompt order."""
        per_image: list[list[tuple[_Found, dict]]] = [[] for _ in sizes]
        for found in raw:
            size = tuple(int(v) for v in sizes[found.pair.image])
            (result,) = self.processor.post_process_instance_segmentation(
                found, threshold=self.score_threshold, mask_threshold=self.options.mask_threshold, target_sizes=[size]
            )
            per_image[found.pair.image].append((found, result))
        return [self._segments(results, size) for results, size in zip(per_image, sizes)]

    def _segments(self, results: list[tuple[_Found, dict]], size: tuple[int, int]) -> Segments:
        if not results or not any(len(result["scores"]) for _, result in results):
            return Segments.empty(tuple(int(v) for v in size))
        masks = torch.cat([result["masks"] for _, result in results]).bool()
        return Segments.of(
            masks,
            [found.pair.category_id for found, result in results for _ in range(len(result["scores"]))],
            torch.cat([result["scores"] for _, result in results]).tolist(),
            boxes=torch.cat([result["boxes"] for _, result in results]).cpu().numpy(),
        )


def random_parts():
    """(network, processor) of `--weights random`: RANDOM_CONFIG seeded, the byte tokenizer."""
    from transformers import (
        PreTrainedTokenizerFast,
        Sam3Config,
        Sam3ImageProcessor,
        Sam3Model,
        Sam3Processor,
    )

    network = random_network("sam3", lambda: Sam3Model(Sam3Config(**RANDOM_CONFIG)))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer(), bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=SAM3_TEXT_TOKENS,
    )  # fmt: skip
    image_processor = Sam3ImageProcessor(size={"height": RANDOM_IMAGE_SIZE, "width": RANDOM_IMAGE_SIZE})
    return network, Sam3Processor(image_processor, tokenizer)


def build_sam3(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> Sam3Segmenter:
    """Sam3Model and Sam3Processor from an HF directory (path or URI) or `random`.

    score_threshold: instances kept at score > it (transformers' `threshold`, default 0.3);
    options: Sam3Options (models/options.py) — the phrases among them.
    """
    from transformers import Sam3Model, Sam3Processor

    parsed = Sam3Options.parse("sam3", options)
    file_categories = None if parsed.category_file is None else load_category_file(parsed.category_file, storage_options)
    categories = text_categories(parsed.text, file_categories)
    if weights == RANDOM:
        (network, processor), digest = random_parts(), None
    else:
        network, processor, _, digest = load_with_processor(
            Sam3Model, Sam3Processor, weights, ("sam3",), weights_sha256, storage_options
        )
    return Sam3Segmenter(
        network.eval(), processor, categories, parsed, device=device, score_threshold=score_threshold,
        weights=weights, weights_sha256=digest,
    )  # fmt: skip
