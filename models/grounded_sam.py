"""Grounded SAM (Ren et al., 2024): Grounding DINO (Liu et al., 2023) finds boxes for text
phrases, then SAM (models/sam.py) or SAM 2 (models/sam2.py) makes one mask per box — one
model, one actor.

Weights: `--weights` is a transformers Grounding DINO checkpoint directory (config.json with
model_type "grounding-dino" + model.safetensors and the processor's files: its image
processor's settings and tokenizer.json), local or any fsspec URI, read offline
(models/hf_checkpoint.py); or `random` (RANDOM_CONFIG below, seeded, with the byte
tokenizer on BERT's ids, `bert_byte_tokenizer`). The masks come from option
`segmenter` (`sam` or `sam2`) with `segmenter_weights`, a checkpoint as that family takes
it (`random` only with a random detector: the driver refuses a real detector with random
masks).

Text: the run's phrases (`text`, models/text_prompts.py) are one prompt, "car. person.
bicycle." (`joined_prompt`), tokenized once when the model is built; the detector reads it
for every image. A phrase's tokens are those inside its characters (the tokenizer's
offsets), less Grounding DINO's separator tokens.

Per model batch:
1. Detection. Each image is preprocessed alone by the checkpoint's GroundingDinoImageProcessor
   (resized, normalised; no padding), and images whose inputs share a shape run as one
   network call with the prompt repeated. Images of different shapes are not padded into
   one call: padding changes every prediction of the padded image (Swin's windows and the
   encoder see it; measured on a random model: relative box coordinates 0.9 apart), so a
   prediction would depend on its batch neighbours.
2. Boxes and scores are transformers' `GroundingDinoProcessor.post_process_grounded_object_
   detection`'s: a query's score is the sigmoid of its highest logit over the prompt's
   tokens, kept when score > the threshold (`--score-threshold`, default 0.25, its
   `threshold`); its box (cx, cy, w, h relative) becomes x0, y0, x1, y1 in the image's
   pixels. Then, per image, the max_detections best-scoring boxes are kept (transformers
   keeps every query), in query order.
3. Masks: every kept box of the batch goes to the segmenter's prompted mode at once
   (`Prompts` per image: SamSegmenter.preprocess → forward → postprocess), one mask per box,
   multimask_output=False. Its preprocessing runs after detection, in `forward`, because
   which images it encodes depends on the boxes: images without a box are not encoded.
   A segment's box and score are the detector's (the segmenter's predicted IoU is not kept).

Where this differs from transformers on purpose — the category of a box. transformers names
a box by decoding every token whose probability exceeds text_threshold (`text_labels`): a
string that may join several phrases ("car person"), hold part of one or a separator
("[SEP]"), or be empty. Here a box's category is ONE phrase: the phrase whose tokens carry
its highest logit (the max of the sigmoid over the phrase's tokens), and the box is dropped
when that phrase's probability is not above text_threshold (default 0.25, transformers'),
because it then names no phrase. The score stays transformers' (over all tokens, so it is
the phrase's own probability whenever the top token is a phrase's, not a separator's), so
boxes and scores equal transformers' for text_threshold 0; the phrase is the one
transformers' label holds when that label is one whole phrase (tests/test_grounded_sam.py).
As in transformers, there is no NMS, and boxes are not clipped to the image. A box of zero
width or height (which SAM refuses) is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.image_transforms import center_to_corners_format

from .base import Prompts
from .categories import Category, load_category_file
from .device import DeviceModel, autocast, to_device
from .hf_checkpoint import load_with_processor
from .options import GroundedSamOptions
from .segments import NO_ANNOTATION, Segments
from .text_prompts import (
    BERT_BYTE_VOCAB_SIZE,
    BERT_SPECIAL_IDS,
    GROUNDING_DINO_TEXT_TOKENS,
    PHRASE_SEPARATOR,
    bert_byte_tokenizer,
    joined_prompt,
    text_categories,
)
from .weights import RANDOM, WeightsError, random_network

# transformers' default `threshold` of post_process_grounded_object_detection.
DEFAULT_SCORE_THRESHOLD = 0.25

# `--weights random`: a tiny Grounding DINO (transformers' own test model is the guide): a
# 4-stage Swin of width 8 (one block per stage), a 1-layer BERT of width 32 over the byte
# tokenizer's ids, a 1-layer encoder and a 2-layer decoder of width 32 (the decoder's box
# heads are tied from layer 1 on: it needs two), 10 queries; images resized to a short side
# of 96 (long side at most 144: its coarsest feature map, 1/64, must hold more than one
# value for its GroupNorm). Seeded, so every actor builds the same model.
RANDOM_CONFIG = {
    "backbone_config": {
        "model_type": "swin", "image_size": 96, "patch_size": 4, "embed_dim": 8, "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 1, 1], "window_size": 7, "out_indices": [2, 3, 4],
    },
    "text_config": {
        "model_type": "bert", "vocab_size": BERT_BYTE_VOCAB_SIZE, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 37, "max_position_embeddings": GROUNDING_DINO_TEXT_TOKENS,
        "pad_token_id": BERT_SPECIAL_IDS["[PAD]"],
    },
    "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_queries": 10, "encoder_n_points": 2,
    "decoder_n_points": 2, "max_text_len": GROUNDING_DINO_TEXT_TOKENS,
}  # fmt: skip
RANDOM_IMAGE_SIZE = {"shortest_edge": 96, "longest_edge": 144}


@dataclass
class _Group:
    """Images of one processed shape: their indices in the batch, pixel_values float (B, 3, h, w)."""

    indices: list[int]
    pixel_values: torch.Tensor


@dataclass
class GroundedSamBatch:
    """The detector's input groups and the images themselves (for the segmenter's own
    preprocessing, once the boxes are known)."""

    groups: list[_Group]
    images: list[np.ndarray]


@dataclass
class Detections:
    """One image's kept boxes, on the model's device: boxes float32 (K, 4) x0, y0, x1, y1 in
    the image's pixels, scores float32 (K,), category_ids int64 (K,)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    category_ids: torch.Tensor

    def prompts(self) -> Prompts | None:
        """The boxes as the segmenter's box prompts (no annotation); None when there are none."""
        if not len(self.scores):
            return None
        count = len(self.scores)
        return Prompts(
            boxes=self.boxes.cpu().numpy().astype(np.float32),
            category_ids=self.category_ids.cpu().numpy().astype(np.int32),
            annotation_ids=np.full(count, NO_ANNOTATION, dtype=np.int64),
        )


@dataclass
class _Raw:
    detections: list[Detections]
    masks: list  # the segmenter's raw output, one per image


def phrase_of_tokens(text: str, phrases: list[str], offsets: list[tuple[int, int]], input_ids: list[int], special_ids) -> torch.Tensor:
    """Which phrase each token of `text` (= joined_prompt(phrases)) belongs to: int64 (T,),
    the phrase's index, or len(phrases) for tokens of none (special tokens, separators, the
    spaces between phrases). ValueError naming a phrase that has no token of its own."""
    owner = torch.full((len(input_ids),), len(phrases), dtype=torch.int64)
    start = 0
    special = set(int(i) for i in special_ids)
    for index, phrase in enumerate(phrases):
        end = start + len(phrase)
        assert text[start:end] == phrase, (text, phrase)
        inside = [
            t for t, ((first, last), token) in enumerate(zip(offsets, input_ids))
            if last > first and start <= first and last <= end and token not in special
        ]  # fmt: skip
        if not inside:
            raise ValueError(f"phrase {phrase!r} has no token of its own for the detector to score (only separators)")
        owner[inside] = index
        start = end + len(PHRASE_SEPARATOR)
    return owner


def detect(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    sizes: list[tuple[int, int]],
    owner: torch.Tensor,
    category_ids: torch.Tensor,
    *,
    score_threshold: float,
    text_threshold: float,
    max_detections: int,
) -> list[Detections]:
    """Grounding DINO's outputs for B images → each image's Detections (module docstring).

    logits float (B, Q, L) over L ≥ T text positions (-inf past the prompt), pred_boxes
    (B, Q, 4) relative cx, cy, w, h; sizes: each image's (H, W); owner int64 (T,) the phrase
    of each prompt token (`phrase_of_tokens`, P for none); category_ids int64 (P,)."""
    probs = logits.float().sigmoid()
    scores = probs.max(-1).values  # (B, Q): transformers' score, over every token
    count, queries, tokens = probs.shape[0], probs.shape[1], owner.shape[0]
    phrases = len(category_ids)
    # The max probability over each phrase's tokens: (B, Q, P) (the last slot: tokens of no phrase).
    per_phrase = torch.zeros((count, queries, phrases + 1), device=probs.device).scatter_reduce(
        -1, owner.to(probs.device).expand(count, queries, tokens), probs[..., :tokens], reduce="amax"
    )[..., :phrases]
    best_prob, best = per_phrase.max(-1)
    # post_process_grounded_object_detection's boxes: corners, scaled by float32 (W, H, W, H).
    heights = torch.Tensor([size[0] for size in sizes])
    widths = torch.Tensor([size[1] for size in sizes])
    scale = torch.stack([widths, heights, widths, heights], dim=1).to(pred_boxes.device)
    boxes = center_to_corners_format(pred_boxes.float()) * scale[:, None, :]
    keep = (scores > score_threshold) & (best_prob > text_threshold)
    keep &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]) & boxes.isfinite().all(-1)
    categories = category_ids.to(probs.device)
    found = []
    for row in range(count):
        kept = torch.nonzero(keep[row]).flatten()
        if len(kept) > max_detections:
            order = torch.sort(scores[row, kept], descending=True, stable=True).indices[:max_detections]
            kept = kept[order.sort().values]
        found.append(Detections(boxes[row, kept], scores[row, kept], categories[best[row, kept]]))
    return found


class GroundedSamSegmenter(DeviceModel):
    """Grounding DINO + a SAM-family segmenter behind the model protocol (module docstring)."""

    name = "grounded-sam"
    task = "instance"

    def __init__(self, network, processor, segmenter, categories: list[Category], options: GroundedSamOptions, **placement):
        """network: GroundingDinoForObjectDetection; processor: its GroundingDinoProcessor;
        segmenter: a SamSegmenter (or Sam2Segmenter) on the same device, given no score threshold."""
        super().__init__(network, options, **placement)
        self.processor = processor
        self.segmenter = segmenter
        self.categories = list(categories)
        self.score_threshold = DEFAULT_SCORE_THRESHOLD if self.score_threshold is None else float(self.score_threshold)
        self.phrases = [category.name for category in categories]
        self.prompt = joined_prompt(self.phrases)
        tokens = processor.tokenizer(self.prompt, return_token_type_ids=True, return_offsets_mapping=True)
        max_text_len = network.config.max_text_len
        if len(tokens["input_ids"]) > max_text_len:
            raise ValueError(
                f"the text prompt {self.prompt!r} is {len(tokens['input_ids'])} tokens long; "
                f"the model's text encoder takes {max_text_len}"
            )
        self.owner = phrase_of_tokens(
            self.prompt, self.phrases, tokens["offset_mapping"], tokens["input_ids"], network.model.special_tokens.tolist()
        )
        self.text = {
            name: to_device(torch.tensor([tokens[name]], dtype=torch.int64), self.device)
            for name in ("input_ids", "token_type_ids", "attention_mask")
        }
        self.category_ids = torch.tensor([category.id for category in categories], dtype=torch.int64)

    # -- preprocess (CPU) --

    def preprocess(self, images: list[np.ndarray]) -> GroundedSamBatch:
        """uint8 (H, W, 3) images → the image processor's pixel_values, each image alone,
        grouped by shape."""
        shapes: dict[tuple[int, ...], _Group] = {}
        for index, image in enumerate(images):
            pixel_values = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            group = shapes.setdefault(tuple(pixel_values.shape[-2:]), _Group([], []))
            group.indices.append(index)
            group.pixel_values.append(pixel_values)
        groups = [_Group(group.indices, torch.cat(group.pixel_values)) for group in shapes.values()]
        return GroundedSamBatch(groups, list(images))

    # -- forward (device) --

    @torch.inference_mode()
    def forward(self, batch: GroundedSamBatch) -> _Raw:
        """The detector per group of same-shaped images, then the segmenter on every kept box."""
        detections: list[Detections | None] = [None] * len(batch.images)
        for group in batch.groups:
            count = len(group.indices)
            with autocast(self.device, self.amp_dtype):
                outputs = self.network(
                    pixel_values=to_device(group.pixel_values, self.device),
                    **{name: value.expand(count, -1) for name, value in self.text.items()},
                )
            found = detect(
                outputs.logits, outputs.pred_boxes, [batch.images[i].shape[:2] for i in group.indices], self.owner,
                self.category_ids, score_threshold=self.score_threshold, text_threshold=self.options.text_threshold,
                max_detections=self.options.max_detections,
            )  # fmt: skip
            for index, image_detections in zip(group.indices, found):
                detections[index] = image_detections
        prompts = [image_detections.prompts() for image_detections in detections]
        masks = self.segmenter.forward(self.segmenter.preprocess(batch.images, prompts=prompts))
        return _Raw(detections, masks)

    # -- postprocess (device → host) --

    @torch.inference_mode()
    def postprocess(self, raw: _Raw, sizes: list[tuple[int, int]]) -> list[Segments]:
        """Per image: one mask per kept box (left on the device), the box's phrase, score and box."""
        results = []
        for detections, masks in zip(raw.detections, self.segmenter.postprocess(raw.masks, sizes)):
            if len(masks) != len(detections.scores):
                raise RuntimeError(f"{len(masks)} masks for {len(detections.scores)} boxes")
            results.append(
                Segments.of(
                    masks.masks, detections.category_ids.tolist(), detections.scores.cpu().numpy(),
                    boxes=detections.boxes.cpu().numpy(),
                )  # fmt: skip
            )
        return results


def random_parts():
    """(network, processor) of `--weights random`: RANDOM_CONFIG seeded, the byte tokenizer on BERT's ids."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        PreTrainedTokenizerFast,
    )

    network = random_network("grounded-sam", lambda: GroundingDinoForObjectDetection(GroundingDinoConfig(**RANDOM_CONFIG)))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bert_byte_tokenizer(), cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        model_max_length=GROUNDING_DINO_TEXT_TOKENS,
    )  # fmt: skip
    return network, GroundingDinoProcessor(GroundingDinoImageProcessor(size=RANDOM_IMAGE_SIZE), tokenizer)


def build_segmenter(options: GroundedSamOptions, device, storage_options: dict | None):
    """The SAM-family model that makes the masks: `segmenter` from `segmenter_weights`."""
    arguments = {"device": device, "storage_options": storage_options, "points_per_batch": options.points_per_batch,
                 "amp_dtype": options.amp_dtype}  # fmt: skip
    if options.segmenter == "sam2":
        from .sam2 import build_sam2

        return build_sam2(options.segmenter_weights, **arguments)
    from .sam import build_sam

    return build_sam(options.segmenter_weights, **arguments)


def build_grounded_sam(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> GroundedSamSegmenter:
    """Grounding DINO from an HF directory (path or URI) or `random`, with the segmenter of
    options `segmenter` / `segmenter_weights`.

    score_threshold: boxes kept at score > it (transformers' `threshold`, default 0.25);
    options: GroundedSamOptions (models/options.py) — the phrases among them.
    """
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    parsed = GroundedSamOptions.parse("grounded-sam", options)
    if problem := parsed.problem_with_weights(weights):
        raise WeightsError(f"model 'grounded-sam': {problem}")
    file_categories = None if parsed.category_file is None else load_category_file(parsed.category_file, storage_options)
    categories = text_categories(parsed.text, file_categories)
    if weights == RANDOM:
        (network, processor), digest = random_parts(), None
    else:
        network, processor, _, digest = load_with_processor(
            GroundingDinoForObjectDetection, GroundingDinoProcessor, weights, ("grounding-dino",), weights_sha256,
            storage_options,
        )  # fmt: skip
    return GroundedSamSegmenter(
        network.eval(), processor, build_segmenter(parsed, device, storage_options), categories, parsed, device=device,
        score_threshold=score_threshold, weights=weights, weights_sha256=digest,
    )  # fmt: skip
