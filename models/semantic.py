"""What the semantic convnets (U-Net, FCN, DeepLabV3) share: images grouped by size on the
way in, one segment per class present on the way out.

Images are grouped by size rather than padded together, so an image's prediction never
depends on which other images share its batch.
"""

from __future__ import annotations

import numpy as np
import torch

from .device import host_batch
from .segments import Segments

# Per size group: (indices into the batch, labels int64 (N, H, W), the probability the
# label's pixels carry, float (N, H, W)).
SizeGroupOutput = tuple[list[int], torch.Tensor, torch.Tensor]


def size_groups(images: list[np.ndarray], pin: bool) -> list[tuple[list[int], torch.Tensor]]:
    """uint8 (H, W, 3) images → per size, (their indices, uint8 (N, 3, H, W) tensor in NHWC
    memory, page-locked when `pin`); ValueError for an array that is no such image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        groups.setdefault(image.shape[:2], []).append(index)
    return [(indices, host_batch([images[i] for i in indices], pin).permute(0, 3, 1, 2)) for indices in groups.values()]


def class_segments(
    raw: list[SizeGroupOutput], count: int, category_ids: list[int], score_threshold: float
) -> list[Segments]:
    """Per image of `count`: one segment per class present whose score — the mean of the
    probabilities over the class's pixels — is at least `score_threshold`, its mask
    `labels == class` computed on the labels' device. category_ids[c]: channel c's id."""
    results: list[Segments | None] = [None] * count  # every image is in one size group
    num_classes = len(category_ids)
    for indices, labels, probabilities in raw:
        flat_labels = labels.flatten(1)
        # Per image and class: pixel count and probability sum, in two scatter-adds.
        counts = torch.zeros(len(indices), num_classes, device=labels.device).scatter_add_(
            1, flat_labels, torch.ones_like(flat_labels, dtype=torch.float32)
        )
        sums = torch.zeros_like(counts).scatter_add_(1, flat_labels, probabilities.flatten(1))
        scores = (sums / counts.clamp(min=1)).cpu().numpy()
        counts = counts.cpu().numpy()
        # One byte per label makes the per-class comparisons below 8× lighter on memory.
        compact = labels.to(torch.uint8 if num_classes <= 256 else torch.int32)
        for row, index in enumerate(indices):
            channels = [c for c in np.flatnonzero(counts[row]) if float(scores[row, c]) >= score_threshold]
            wanted = torch.tensor(channels, dtype=compact.dtype, device=compact.device)
            results[index] = Segments.of(
                compact[row][None] == wanted[:, None, None], [category_ids[c] for c in channels], scores[row, channels]
            )
    return results
