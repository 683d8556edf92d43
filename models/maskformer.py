"""MaskFormer (Cheng et al., 2021) and Mask2Former (Cheng et al., 2022) on transformers:
semantic, instance and panoptic output from one mask-classification network.

Weights: a transformers checkpoint directory — config.json, model.safetensors (or
pytorch_model.bin, read by transformers with `weights_only=True`) and the image processor's
preprocessor_config.json — from a local path or any fsspec URI (copied to a local temp dir,
then `from_pretrained(local_files_only=True)`: nothing is ever fetched from a hub); or
`random` (a tiny seeded config, for tests and benchmarks).

Categories: the config's id2label, ids as in the checkpoint (label index = category id).
Thing/stuff: a config attribute `thing_ids` when the checkpoint has one, else a
`category_file` (COCO json or list with `isthing`), else every class is a thing (panoptic
output then fuses nothing; a warning says so).

`task` option (semantic | instance | panoptic) chooses the post-processing, which
re-implements the image processors' post_process_{semantic,instance,panoptic}_segmentation
with torch ops on the model's device, without their Python loop over queries (and its
device syncs), and leaves the final bool masks on the device. Semantic and instance
output run batched over the images of a batch that share a size; panoptic runs per image
(each keeps its own queries), its per-query work batched. Argmaxes and threshold counts at
the image size are exact but interpolate only along low-resolution boundaries
(models/upsampling.py), never a float (C, H, W) tensor.

- semantic: softmax(class)[..., :-1] · sigmoid(mask) summed over queries, resized to the
  image, argmax; one segment per class present, scored by the mean normalised class
  score over its pixels, kept at score ≥ score_threshold when one is given (none dropped
  without);
- instance: the top num_queries (query, class) pairs, score = class probability × mean mask
  probability inside the mask (logit > 0); masks resized (nearest) to the image;
  overlapping, scored instances with score ≥ score_threshold;
- panoptic: queries whose best class is not "no object" with probability > score_threshold,
  mask probabilities × scores resized (bilinear) to the image, argmax over queries, a query
  kept when it wins > overlap_mask_area_threshold of its own (prob ≥ mask_threshold) area;
  stuff classes fused into one segment; segment_id 1..S, non-overlapping.

Batches: the image processor pads a batch to its largest image, and these networks ignore
`pixel_mask`, so an image's outputs would depend on its neighbours. Each image is processed
alone and images whose inputs then share a shape run as one batch (`preprocess`).

Padding: the processors' post-processing resizes the padded mask straight to the image (a
known skew for padded images). Here the padding is cut off first (masks resized to the
padded input, cropped to the image's resized extent); Mask2Former always resizes to the
input first (the processor does, to 384×384, the input size of its published checkpoints).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .categories import Category, load_category_file
from .device import DeviceModel, autocast, to_device
from .hf_checkpoint import load_with_processor
from .options import UniversalOptions
from .segments import Segments
from .upsampling import (
    count_at_least,
    upsampled_argmax,
    upsampled_gather,
    upsampled_sum,
)
from .weights import RANDOM, WeightsError, random_network

log = logging.getLogger("rayseg.models")


# --- categories ----------------------------------------------------------------------------


def categories_from_config(
    id2label: dict, thing_ids: list[int] | None, category_file: str | None, storage_options: dict | None, uri: str
) -> list[Category]:
    """Categories of the checkpoint's labels (id = label index) with isthing from `thing_ids`
    or `category_file` (whose ids must be labels of the checkpoint), else all things."""
    labels = {int(k): str(v) for k, v in id2label.items()}
    if category_file is not None:
        listed = {c.id: c for c in load_category_file(category_file, storage_options)}
        unknown = sorted(set(listed) - set(labels))
        if unknown:
            raise WeightsError(
                f"category file {category_file} names ids {unknown[:10]} that checkpoint {uri} does not predict "
                f"(its labels are {min(labels)}..{max(labels)})"
            )
        return [Category(i, name, listed[i].isthing if i in listed else True) for i, name in sorted(labels.items())]
    if thing_ids is not None:
        things = {int(i) for i in thing_ids}
        return [Category(i, name, i in things) for i, name in sorted(labels.items())]
    return [Category(i, name, True) for i, name in sorted(labels.items())]


# --- post-processing (device, vectorised) ------------------------------------------------


@dataclass
class Raw:
    """Network outputs for a batch, on the device, with what post-processing needs."""

    class_logits: torch.Tensor  # (B, Q, C + 1), last = no object
    mask_logits: torch.Tensor  # (B, Q, h, w)
    input_size: tuple[int, int]  # padded input (H, W)
    valid: list[tuple[int, int]]  # per image, its resized extent inside the padded input


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.numel() == 0:  # no query kept: interpolate refuses empty tensors
        return x.new_zeros((*x.shape[:-2], *size))
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def mask_logits_for(raw: Raw, index: int, upsample_first: bool, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Image `index`'s mask logits (Q, h', w') with the padding cut off: at the network's
    resolution when there is no padding (and not upsample_first), else resized to the
    padded input and cropped to the image's extent. `queries` (indices or a bool mask)
    selects queries before any resizing."""
    logits = raw.mask_logits[index] if queries is None else raw.mask_logits[index][queries]
    valid = tuple(raw.valid[index])
    if not upsample_first and valid == tuple(raw.input_size):
        return logits
    logits = _resize(logits[None], raw.input_size)[0]
    return logits[:, : valid[0], : valid[1]]


# Classes scored first in semantic post-processing; more only when the bound says they may win.
SEMANTIC_CANDIDATES = 16


def class_argmax(classes: torch.Tensor, probs: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax over classes c of score_c = Σ_q classes[q, c] · probs[q], resized to `size`,
    and the winning score: ((H, W) class index, (H, W) score).

    classes (Q, C) class probabilities, probs (Q, h, w) mask probabilities. A class scores
    at most Σ_q classes[q, c] anywhere (probs ≤ 1, and resizing is a convex combination),
    so the classes with the largest such bounds are scored first; when every pixel's winning
    score beats the best bound left out, no other class can win anywhere and the result is
    exact. Otherwise the candidates grow (×4) up to all classes.
    """
    bound = classes.sum(0)
    order = bound.argsort(descending=True)
    count = min(SEMANTIC_CANDIDATES, len(order))
    while True:
        candidates = order[:count]
        scores = torch.einsum("qc,qhw->chw", classes[:, candidates], probs)
        labels = upsampled_argmax(scores, size)
        best = upsampled_gather(scores, labels)
        if count == len(order) or bool(best.min() > bound[order[count]]):
            return candidates[labels], best
        count = min(4 * count, len(order))


def semantic_segments(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int], label_ids: torch.Tensor
) -> list[Segments]:
    """class_logits (B, Q, C+1), mask_logits (B, Q, h, w) of images of one size → per image,
    one segment per class present, scored by the mean over its pixels of its normalised
    class score (its score / the sum of all classes' scores)."""
    batch, num_classes = class_logits.shape[0], class_logits.shape[-1] - 1
    classes = class_logits.softmax(-1)[..., :-1]
    probs = mask_logits.sigmoid()
    # Argmax and confidence at the image size, interpolating only along class boundaries.
    labels, best = (torch.stack(parts) for parts in zip(*(class_argmax(c, p, size) for c, p in zip(classes, probs))))
    # Σ_c score_c = Σ_q (Σ_c classes[q, c]) · probs[q]: one weighted sum over queries.
    total = torch.stack([upsampled_sum(torch.einsum("q,qhw->hw", c.sum(1), p)[None], size) for c, p in zip(classes, probs)])
    confidence = best / total.clamp_min(1e-12)
    # Per (image, class): pixel counts and summed confidence, in one bincount each.
    flat = (labels + torch.arange(batch, device=labels.device)[:, None, None] * num_classes).flatten()
    counts = torch.bincount(flat, minlength=batch * num_classes).view(batch, num_classes)
    sums = torch.bincount(flat, weights=confidence.flatten().double(), minlength=batch * num_classes).view(batch, num_classes)
    means = (sums / counts.clamp_min(1)).tolist()
    present = (counts > 0).tolist()
    results = []
    for b in range(batch):
        ids = [c for c in range(num_classes) if present[b][c]]
        index = torch.tensor(ids, dtype=torch.int64, device=labels.device)
        masks = labels[b][None] == index[:, None, None]
        results.append(Segments.of(masks, label_ids[index].tolist(), [means[b][c] for c in ids]))
    return results


def instance_segments(
    class_logits: torch.Tensor,
    mask_logits: Callable[[torch.Tensor], torch.Tensor],
    size: tuple[int, int],
    threshold: float,
    label_ids: torch.Tensor,
) -> Segments:
    """Mask(2)Former instance output for one image: scored, possibly overlapping masks.

    class_logits (Q, C+1); mask_logits(queries) → those queries' mask logits (K, h, w).
    The top Q (query, class) pairs by class probability are scored class probability × mean
    mask probability inside the mask (logit > 0), kept at ≥ threshold; a mask score is at
    most 1, so pairs whose class probability is below the threshold are dropped before any
    mask is resized.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    values, pairs = class_logits.softmax(-1)[:, :-1].flatten().topk(num_queries, sorted=False)
    possible = values >= threshold
    values, pairs = values[possible], pairs[possible]
    if not len(pairs):
        return _no_segments(size, label_ids.device)
    queries, inverse = torch.div(pairs, num_classes, rounding_mode="floor").unique(return_inverse=True)
    logits = mask_logits(queries)[inverse]  # (K, h, w)
    binary = (logits > 0).float()
    mask_scores = (logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = values * mask_scores
    keep = scores >= threshold
    if not keep.any():
        return _no_segments(size, label_ids.device)
    masks = _resize(binary[keep][None], size, mode="nearest")[0] > 0.5
    nonempty = masks.flatten(1).any(1)
    ids = label_ids[(pairs % num_classes)[keep][nonempty]].tolist()
    return Segments.of(masks[nonempty], ids, scores[keep][nonempty].tolist())


def panoptic_segments(
    probs: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int],
    *,
    mask_threshold: float,
    overlap_threshold: float,
    fuse: torch.Tensor,
    label_ids: torch.Tensor,
    segment_ids: bool = True,
) -> Segments:
    """transformers' compute_segments without its per-query loop.

    probs (K, h, w): the candidate queries' mask probabilities (OneFormer's instance
    output passes logits, as transformers does); scores, labels (K,); fuse: bool per label.
    """
    if not len(labels):
        return _no_segments(size, probs.device)
    weighted = probs * scores[:, None, None]
    owner = upsampled_argmax(weighted, size)
    original = count_at_least(weighted, size, mask_threshold)
    count = len(labels)
    area = torch.bincount(owner.flatten(), minlength=count)
    valid = (area > 0) & (original > 0) & (area.float() / original.clamp_min(1).float() > overlap_threshold)
    # Segment numbering (a few scalars per query, on the host).
    valid_list, label_list, fuse_list = valid.tolist(), labels.tolist(), fuse[labels].tolist()
    table, infos, fused = [-1] * count, [], {}
    for k in range(count):
        if not valid_list[k]:
            continue
        label = label_list[k]
        if label in fused:
            table[k] = fused[label]
            continue
        table[k] = len(infos)
        infos.append((label, k))
        if fuse_list[k]:
            fused[label] = table[k]
    if not infos:
        return _no_segments(size, owner.device)
    lookup = torch.tensor(table, device=owner.device)
    segment_map = lookup[owner]
    masks = segment_map[None] == torch.arange(len(infos), device=owner.device)[:, None, None]
    ids = label_ids[torch.tensor([label for label, _ in infos], device=label_ids.device)].tolist()
    values = scores[torch.tensor([k for _, k in infos], device=scores.device)].tolist()
    numbers = list(range(1, len(infos) + 1)) if segment_ids else None
    return Segments.of(masks, ids, values, segment_ids=numbers)


def _no_segments(size: tuple[int, int], device: torch.device) -> Segments:
    return Segments.of(torch.zeros((0, *size), dtype=torch.bool, device=device), [], [])


# --- the model ------------------------------------------------------------------------------


class MaskFormerSegmenter(DeviceModel):
    """A MaskFormer or Mask2Former network behind the model protocol (see the module docstring).

    preprocess: the checkpoint's image processor (resize, normalise, pad the batch), CPU;
    forward: the network on the device, under autocast `amp_dtype` (models/device.py);
    postprocess: the chosen task's post-processing on the device in float32, its bool masks
    left there.
    """

    def __init__(
        self,
        network,
        processor,
        categories: list[Category],
        options: UniversalOptions | None = None,
        *,
        name: str,
        upsample_first: bool = False,
        **placement,
    ):
        super().__init__(network, options or UniversalOptions(), **placement)
        self.name = name
        self.task = self.options.task
        self.processor = processor
        self.categories = categories
        # Semantic output (and OneFormer's instance output) is cut only at a threshold given.
        self.given_threshold = self.score_threshold
        self.score_threshold = 0.5 if self.score_threshold is None else float(self.score_threshold)
        self.upsample_first = upsample_first
        num_labels = int(self.network.config.num_labels)
        by_id = {c.id: c for c in categories}
        if sorted(by_id) != list(range(num_labels)):
            raise WeightsError(f"{self.weights}: id2label must name labels 0..{num_labels - 1}, got {sorted(by_id)[:10]}")
        self.label_ids = torch.arange(num_labels, device=self.device)
        self.stuff = torch.tensor([not by_id[i].isthing for i in range(num_labels)], device=self.device)
        if self.task == "panoptic" and not bool(self.stuff.any()):
            log.warning("%s: no stuff classes known (no thing_ids in the config, no category_file): nothing is fused", name)

    def preprocess(self, images: list[np.ndarray]) -> list[tuple[list[int], dict]]:
        """uint8 (H, W, 3) images → groups of (image indices, processor batch of those images).

        The processor pads a batch to its largest image and these networks ignore
        `pixel_mask`: the padding would change an image's outputs (measured: 21 of 24 mixed
        sizes differed from the image alone). So each image is processed alone and images
        whose processed (resized, padded-alone) inputs share a shape form one batch: a
        prediction never depends on its batch neighbours.
        """
        groups: dict[tuple[int, ...], list[tuple[int, dict]]] = {}
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
            encoded = self._encode(np.ascontiguousarray(image))
            groups.setdefault(tuple(encoded["pixel_values"].shape[-2:]), []).append((index, encoded))
        return [
            (
                [index for index, _ in members],
                {
                    key: torch.cat([encoded[key] for _, encoded in members])
                    for key in ("pixel_values", "pixel_mask")
                    if members[0][1].get(key) is not None
                },
            )
            for members in groups.values()
        ]

    def _encode(self, image: np.ndarray) -> dict:
        """One image → the processor's pixel_values (1, 3, H', W') and pixel_mask (1, H', W')."""
        return dict(self.processor(images=[image], return_tensors="pt"))

    @staticmethod
    def _extents(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
        heights = pixel_mask.any(2).sum(1).tolist()
        widths = pixel_mask.any(1).sum(1).tolist()
        return [(int(h), int(w)) for h, w in zip(heights, widths)]

    def _inputs(self, batch: dict) -> dict:
        return {"pixel_values": to_device(batch["pixel_values"], self.device)}

    @torch.inference_mode()
    def forward(self, groups: list[tuple[list[int], dict]]) -> list[tuple[list[int], Raw]]:
        """Per group of `preprocess`: its image indices and the network's outputs for it."""
        return [(indices, self._forward_group(batch)) for indices, batch in groups]

    def _forward_group(self, batch: dict) -> Raw:
        pixel_values = batch["pixel_values"]
        mask = batch.get("pixel_mask")
        if mask is None:
            mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.bool)
        with autocast(self.device, self.amp_dtype):
            outputs = self.network(**self._inputs(batch))
        return Raw(
            outputs.class_queries_logits.float(),
            outputs.masks_queries_logits.float(),
            tuple(pixel_values.shape[-2:]),
            self._extents(mask.bool()),
        )

    @torch.inference_mode()
    def postprocess(self, raw: list[tuple[list[int], Raw]], sizes: list[tuple[int, int]]) -> list[Segments]:
        results: list[Segments | None] = [None] * len(sizes)  # every image is in one group
        for indices, group in raw:
            for index, segments in zip(indices, self._postprocess_group(group, [sizes[i] for i in indices])):
                results[index] = segments
        return results

    def _postprocess_group(self, raw: Raw, sizes: list[tuple[int, int]]) -> list[Segments]:
        """The chosen task's segments of one group's images (sizes in the group's order)."""
        results: list[Segments | None] = [None] * len(sizes)
        if self.task == "panoptic":  # the kept queries differ per image
            for index, size in enumerate(sizes):
                results[index] = self._panoptic(raw, index, (int(size[0]), int(size[1])))
            return results
        if self.task == "instance":  # each image keeps its own queries
            for index, size in enumerate(sizes):
                results[index] = instance_segments(
                    raw.class_logits[index], functools.partial(mask_logits_for, raw, index, self.upsample_first),
                    (int(size[0]), int(size[1])), self.score_threshold, self.label_ids,
                )  # fmt: skip
            return results
        # Semantic: images of one size (and extent in the input) as one batch.
        for indices, logits, size in self._groups(raw, sizes):
            for index, segments in zip(indices, semantic_segments(raw.class_logits[indices], logits, size, self.label_ids)):
                results[index] = segments.above(self.given_threshold)
        return results

    def _groups(self, raw: Raw, sizes: list[tuple[int, int]]):
        """(image indices, their stacked padding-free mask logits, target size) per group of
        images that share the target size and the extent in the padded input."""
        groups: dict[tuple, list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault((tuple(raw.valid[index]), int(size[0]), int(size[1])), []).append(index)
        for (_, height, width), indices in groups.items():
            logits = torch.stack([mask_logits_for(raw, i, self.upsample_first) for i in indices])
            yield indices, logits, (height, width)

    def _panoptic(self, raw: Raw, index: int, size: tuple[int, int]) -> Segments:
        classes = raw.class_logits[index]
        scores, labels = classes.softmax(-1).max(-1)
        keep = (labels != classes.shape[-1] - 1) & (scores > self.score_threshold)
        logits = mask_logits_for(raw, index, self.upsample_first, keep)  # only kept queries are resized
        return panoptic_segments(
            logits.sigmoid(), scores[keep], labels[keep], size,
            mask_threshold=self.options.mask_threshold, overlap_threshold=self.options.overlap_mask_area_threshold,
            fuse=self.stuff, label_ids=self.label_ids,
        )  # fmt: skip


# --- builders --------------------------------------------------------------------------------

_FAMILIES = {
    "maskformer": ("maskformer", "MaskFormerForInstanceSegmentation", "MaskFormerImageProcessor", False),
    "mask2former": ("mask2former", "Mask2FormerForUniversalSegmentation", "Mask2FormerImageProcessor", True),
}


def random_config(name: str):
    """The tiny seeded network `--weights random` builds: a 4-stage Swin of width 16, 8
    queries of width 32, 4 classes."""
    from transformers import DetrConfig, Mask2FormerConfig, MaskFormerConfig, SwinConfig

    swin = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    id2label = {i: f"class_{i}" for i in range(4)}
    common = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if name == "maskformer":
        decoder = DetrConfig(d_model=32, decoder_layers=2, decoder_ffn_dim=64, decoder_attention_heads=4, encoder_layers=1, num_queries=8)
        return MaskFormerConfig(backbone_config=swin, decoder_config=decoder, mask_feature_size=32, fpn_feature_size=32, num_queries=8, **common)
    return Mask2FormerConfig(
        backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=4, num_queries=8, **common,
    )  # fmt: skip


def build_universal(
    name: str,
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> MaskFormerSegmenter:
    """`name` (maskformer: MaskFormerForInstanceSegmentation, mask2former:
    Mask2FormerForUniversalSegmentation) from an HF directory (path or URI) or `random`.

    score_threshold: instance score kept at ≥ it, panoptic queries kept at class probability
    > it (default 0.5, transformers' `threshold`), semantic segments kept at score ≥ it
    (default: none dropped); options: UniversalOptions (models/options.py).
    """
    import transformers

    parsed = UniversalOptions.parse(name, options)
    model_type, model_class, processor_class, upsample_first = _FAMILIES[name]
    network_cls, processor_cls = getattr(transformers, model_class), getattr(transformers, processor_class)
    if weights == RANDOM:
        network = random_network(name, lambda: network_cls(random_config(name))).eval()
        processor = processor_cls(size={"shortest_edge": 256, "longest_edge": 512})
        config, digest = network.config.to_dict(), None
    else:
        network, processor, config, digest = load_with_processor(
            network_cls, processor_cls, weights, (model_type,), weights_sha256, storage_options
        )
    categories = categories_from_config(
        network.config.id2label, config.get("thing_ids"), parsed.category_file, storage_options, weights
    )
    return MaskFormerSegmenter(
        network, processor, categories, parsed, name=name, upsample_first=upsample_first, device=device,
        score_threshold=score_threshold, weights=weights, weights_sha256=digest,
    )  # fmt: skip


# The registry's builders, one per architecture.
build_maskformer = functools.partial(build_universal, "maskformer")
build_mask2former = functools.partial(build_universal, "mask2former")
