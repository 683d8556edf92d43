"""EoMT (Kerssies et al., 2025, "Your ViT is Secretly an Image Segmentation Model") on
transformers: semantic, instance and panoptic output from a plain ViT with queries.

Weights: a transformers checkpoint directory (config.json, model.safetensors or
pytorch_model.bin, the image processor's settings) from a path or URI, read offline
(models/hf_checkpoint.py); or `random` (a tiny seeded config, for tests and benchmarks).
Categories: the config's id2label; thing/stuff from a config `thing_ids` or a
`category_file`, else every class is a thing.

Post-processing is the image processor's own `post_process_{semantic,instance,panoptic}_
segmentation`, run on each group of images, its maps turned into Segments on the model's
device — so the output is transformers' to the pixel (scores as it rounds them: 6
decimals for instance and panoptic). Semantic segments are scored as the MaskFormer
family's: the mean normalised class score over the segment's pixels.

Batches: each image is preprocessed alone (resized, padded, split into patches when the
checkpoint's processor does `do_split_image`), and images whose inputs then share a shape
run as one network call: a prediction never depends on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .categories import Category
from .device import DeviceModel, autocast, to_device
from .hf_checkpoint import load_with_processor
from .maskformer import categories_from_config
from .options import UniversalOptions
from .segments import Segments
from .weights import RANDOM, random_network

# transformers' defaults for the instance and panoptic `threshold`.
DEFAULT_SCORE_THRESHOLD = 0.8


@dataclass
class EomtBatch:
    """One group of images whose inputs share a shape: pixel_values float (P, 3, S, S) for
    their P patches (one per image unless the processor splits), patch_offsets [image index
    within the group, start, end] per patch (empty without splitting)."""

    indices: list[int]
    pixel_values: torch.Tensor
    patch_offsets: list[list[int]]


class EomtSegmenter(DeviceModel):
    """EoMT behind the model protocol (see the module docstring)."""

    name = "eomt"

    def __init__(self, network, processor, categories: list[Category], options: UniversalOptions | None = None, **placement):
        super().__init__(network, options or UniversalOptions(), **placement)
        self.task = self.options.task
        self.processor = processor
        self.categories = categories
        # Semantic output is cut only at a threshold given; the other tasks default to transformers'.
        self.given_threshold = self.score_threshold
        self.score_threshold = DEFAULT_SCORE_THRESHOLD if self.score_threshold is None else float(self.score_threshold)
        self.stuff = [c.id for c in categories if not c.isthing]

    def preprocess(self, images: list[np.ndarray]) -> list[EomtBatch]:
        """uint8 (H, W, 3) images → groups of images whose processed inputs share a shape."""
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for index, image in enumerate(images):
            encoded = self.processor(images=[image], return_tensors="pt")
            groups.setdefault(tuple(encoded["pixel_values"].shape[1:]), []).append((index, encoded))
        return [
            EomtBatch(
                [index for index, _ in members],
                torch.cat([encoded["pixel_values"] for _, encoded in members]),
                # The image's patches, renumbered from the image alone to its place in the group.
                [[position, start, end] for position, (_, encoded) in enumerate(members) for _, start, end in encoded.get("patch_offsets") or []],
            )
            for members in groups.values()
        ]

    @torch.inference_mode()
    def forward(self, batch: list[EomtBatch]) -> list[tuple[EomtBatch, SimpleNamespace]]:
        """Per group: the network's class_queries_logits (P, Q, C+1) and masks_queries_logits
        (P, Q, h, w), in float32."""
        outputs = []
        for group in batch:
            with autocast(self.device, self.amp_dtype):
                raw = self.network(pixel_values=to_device(group.pixel_values, self.device))
            outputs.append(
                (
                    group,
                    SimpleNamespace(
                        class_queries_logits=raw.class_queries_logits.float(),
                        masks_queries_logits=raw.masks_queries_logits.float(),
                        patch_offsets=group.patch_offsets,
                    ),
                )
            )
        return outputs

    @torch.inference_mode()
    def postprocess(self, raw: list[tuple[EomtBatch, SimpleNamespace]], sizes: list[tuple[int, int]]) -> list[Segments]:
        results: list[Segments | None] = [None] * len(sizes)  # every image is in one group
        for group, outputs in raw:
            targets = [tuple(int(v) for v in sizes[i]) for i in group.indices]
            for index, segments in zip(group.indices, self._task(outputs, targets)):
                results[index] = segments
        return results

    def _task(self, outputs: SimpleNamespace, targets: list[tuple[int, int]]) -> list[Segments]:
        processor = self.processor
        if self.task == "semantic":
            maps = processor.post_process_semantic_segmentation(outputs, targets, return_segmentation_scores=True)
            return [_semantic(m.segmentation, m.segmentation_scores).above(self.given_threshold) for m in maps]
        if self.task == "instance":
            maps = processor.post_process_instance_segmentation(outputs, targets, threshold=self.score_threshold)
            return [_from_map(m, segment_ids=False) for m in maps]
        maps = processor.post_process_panoptic_segmentation(
            outputs, targets, threshold=self.score_threshold, mask_threshold=self.options.mask_threshold,
            overlap_mask_area_threshold=self.options.overlap_mask_area_threshold, stuff_classes=self.stuff,
        )  # fmt: skip
        return [_from_map(m, segment_ids=True) for m in maps]


def _semantic(labels: torch.Tensor, scores: torch.Tensor) -> Segments:
    """An argmax map (H, W) and its class scores (C, H, W) → one segment per class present,
    scored by the mean over its pixels of its score / the sum of all classes' scores."""
    num_classes = scores.shape[0]
    confidence = scores.gather(0, labels[None])[0] / scores.sum(0).clamp_min(1e-12)
    counts = torch.bincount(labels.flatten(), minlength=num_classes)
    sums = torch.bincount(labels.flatten(), weights=confidence.flatten().double(), minlength=num_classes)
    present = torch.nonzero(counts).flatten()
    masks = labels[None] == present[:, None, None]
    return Segments.of(masks, present.tolist(), (sums[present] / counts[present]).tolist())


def _from_map(result: dict, segment_ids: bool) -> Segments:
    """A processor result ({segmentation: ids (H, W), segments_info}) → its segments, one
    per entry of segments_info (a later instance may cover an earlier one's pixels)."""
    segmentation, infos = result["segmentation"], result["segments_info"]
    ids = torch.tensor([info["id"] for info in infos], dtype=segmentation.dtype, device=segmentation.device)
    masks = segmentation[None] == ids[:, None, None]
    return Segments.of(
        masks, [info["label_id"] for info in infos], [info["score"] for info in infos],
        segment_ids=[info["id"] + 1 for info in infos] if segment_ids else None,
    )  # fmt: skip


def random_config():
    """A tiny EoMT: a 3-layer ViT of width 32 on 64×64 inputs (patch 16), 8 queries, 4 classes."""
    from transformers import EomtConfig

    id2label = {i: f"class_{i}" for i in range(4)}
    return EomtConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64, patch_size=16, num_blocks=1,
        num_queries=8, num_upscale_blocks=2, id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip


def build_eomt(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> EomtSegmenter:
    """EomtForUniversalSegmentation from an HF directory (path or URI) or `random`.

    score_threshold: instance and panoptic queries kept at score ≥ / > it (transformers'
    `threshold`, default 0.8), semantic segments kept at score ≥ it (default: none
    dropped); options: UniversalOptions (models/options.py).
    """
    from transformers import EomtForUniversalSegmentation, EomtImageProcessor

    parsed = UniversalOptions.parse("eomt", options)
    if weights == RANDOM:
        network = random_network("eomt", lambda: EomtForUniversalSegmentation(random_config())).eval()
        processor = EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True)
        config, digest = network.config.to_dict(), None
    else:
        network, processor, config, digest = load_with_processor(
            EomtForUniversalSegmentation, EomtImageProcessor, weights, ("eomt",), weights_sha256, storage_options
        )
    categories = categories_from_config(
        network.config.id2label, config.get("thing_ids"), parsed.category_file, storage_options, weights
    )
    return EomtSegmenter(
        network, processor, categories, parsed, device=device, score_threshold=score_threshold, weights=weights,
        weights_sha256=digest,
    )  # fmt: skip

