"""FCN (Long et al., 2015) and DeepLabV3 (Chen et al., 2017) from torchvision: semantic output.

`fcn` is torchvision's `fcn_resnet50`, `deeplabv3` its `deeplabv3_resnet50`, built with
`weights=None, weights_backbone=None` (nothing is ever downloaded) and filled from a
torchvision `.pth` state dict. The number of classes and whether the checkpoint has the
auxiliary head (`aux_classifier.*`, used only in training: it is loaded, then dropped so
inference never computes it) are read from the checkpoint.

Output channels → categories, for a checkpoint with `num_classes` channels:

- no category file: torchvision's VOC label space (its COCO_WITH_VOC_LABELS weights) —
  channel c is category id c, 0 being "background" (a stuff category); needs 21 channels;
- a category file of K categories and num_classes == K: channel i is the i-th category as
  listed (background, if the model has one, must be listed — as in our U-Net configs);
- num_classes == K + 1: channel 0 is "background" (id 0), channel i (1..K) the i-th listed
  category — the VOC layout;
- anything else is a WeightsError naming both numbers.

One segment per class present in an image (the segments partition it), scored by the mean
of the maximum softmax probability over the class's pixels, computed on the device.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

from .base import DeviceSegments, Segment
from .categories import VOC, Category, load_category_file
from .device import AMP_AUTO, autocast, check_amp_dtype, host_batch, host_segments, pins, resolve_amp_dtype, to_device
from .torchvision_checkpoint import load_into, load_state_dict, tensor_shape
from .weights import RANDOM, WeightsError, seeded_random_init, warn_random

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fcn": fcn_resnet50,
    "deeplabv3": deeplabv3_resnet50,
}

# The last convolution of both heads (FCNHead and DeepLabHead are Sequentials ending in it).
CLASS_KEY = "classifier.4.weight"
AUX_PREFIX = "aux_classifier."

# torchvision's semantic weights normalise with ImageNet statistics.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

BACKGROUND = Category(0, "background", False)


def channel_categories(
    num_classes: int, categories: list[Category] | None, weights: str = "", category_file: str | None = None
) -> list[Category]:
    """Index = output channel → its category (see the module docstring for the rule)."""
    if categories is None:
        if num_classes != len(VOC):
            raise WeightsError(
                f"checkpoint {weights} predicts {num_classes} classes, but the default VOC categories "
                f"need {len(VOC)}; give the checkpoint's categories with category_file"
            )
        return list(VOC)
    count = len(categories)
    if num_classes == count:
        return list(categories)
    if num_classes == count + 1:
        if any(c.id == BACKGROUND.id for c in categories):
            raise WeightsError(
                f"checkpoint {weights} has {num_classes} classes and category file {category_file} {count}: "
                f"channel 0 would be background (id 0), but the file already uses id 0"
            )
        return [BACKGROUND, *categories]
    raise WeightsError(
        f"checkpoint {weights} predicts {num_classes} classes, but category file {category_file} lists "
        f"{count} categories: it needs {count} classes (channel i = the i-th listed category) or "
        f"{count + 1} (channel 0 = background)"
    )


class TorchvisionSemanticSegmenter:
    """A torchvision FCN/DeepLabV3 behind the model protocol.

    resize: None runs each image at its own size; an int resizes it first so its shorter
    side has that many pixels (bilinear with antialiasing on the uint8 image, as
    torchvision's `SemanticSegmentation` preset of its published weights, whose size is
    520). Logits are upsampled back to the original size before the argmax. Images are
    grouped by size, so a prediction never depends on its batch neighbours.
    amp_dtype: autocast setting (models/device.py); on CUDA the network runs channels_last.
    """

    task = "semantic"

    def __init__(
        self,
        network: nn.Module,
        categories: list[Category],
        *,
        name: str,
        device: torch.device | str = "cpu",
        score_threshold: float = 0.0,
        resize: int | None = None,
        weights: str = RANDOM,
        weights_sha256: str | None = None,
        amp_dtype: str = AMP_AUTO,
    ):
        if resize is not None and int(resize) < 1:
            raise ValueError(f"resize must be ≥ 1 (pixels of the shorter side) or None, got {resize}")
        self.name = name
        self.device = torch.device(device)
        self.amp_dtype = resolve_amp_dtype(amp_dtype, self.device)
        network.aux_classifier = None  # a training-only head: never computed at inference
        self.network = network.to(self.device).eval()
        if self.device.type == "cuda":
            self.network = self.network.to(memory_format=torch.channels_last)
        self.categories = categories
        self.score_threshold = score_threshold
        self.resize = None if resize is None else int(resize)
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self._mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)
        self._ids = [category.id for category in categories]

    def preprocess(self, images: list[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
        """uint8 (H, W, 3) images → groups of same-size images as uint8 (N, 3, H, W) tensors
        (NHWC memory, pinned when bound for CUDA)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
            groups.setdefault(image.shape[:2], []).append(index)
        pin = pins(self.device)
        return [
            (indices, host_batch([images[i] for i in indices], pin).permute(0, 3, 1, 2))
            for indices in groups.values()
        ]

    @torch.inference_mode()
    def forward(self, batch: list[tuple[list[int], torch.Tensor]]) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Per size group: (indices, labels int64 (N, H, W), max probability float (N, H, W))."""
        outputs = []
        for indices, pixels in batch:
            pixels = to_device(pixels, self.device)
            size = pixels.shape[-2:]
            if self.resize is not None:
                pixels = TF.resize(pixels, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
            x = (pixels.float() / 255 - self._mean) / self._std
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp_dtype):
                logits = self.network(x)["out"]
            logits = logits.float()
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            # The argmax of the logits themselves: softmax can round distinct logits to equal
            # probabilities, and the label must be torchvision's argmax.
            labels = logits.argmax(dim=1)
            probabilities = logits.softmax(dim=1).amax(dim=1)
            outputs.append((indices, labels, probabilities))
        return outputs

    def postprocess(self, raw: list[tuple[list[int], torch.Tensor, torch.Tensor]], sizes: list[tuple[int, int]]) -> list[list[Segment]]:
        return host_segments(self.postprocess_device(raw, sizes))

    @torch.inference_mode()
    def postprocess_device(self, raw: list[tuple[list[int], torch.Tensor, torch.Tensor]], sizes: list[tuple[int, int]]) -> list[DeviceSegments]:
        """Per image: one segment per class present (scored at least score_threshold), its
        mask `labels == class` computed on the device."""
        results: list[DeviceSegments | None] = [None] * len(sizes)  # every image is in one size group
        num_classes = len(self.categories)
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
                channels = [c for c in np.flatnonzero(counts[row]) if float(scores[row, c]) >= self.score_threshold]
                wanted = torch.tensor(channels, dtype=compact.dtype, device=compact.device)
                results[index] = DeviceSegments(
                    [Segment(self._ids[c], float(scores[row, c]), None) for c in channels],
                    compact[row][None] == wanted[:, None, None],
                )
        return results


def _build(
    architecture: str,
    weights: str,
    *,
    weights_sha256: str | None,
    device: str,
    storage_options: dict | None,
    score_threshold: float | None,
    category_file: str | None,
    resize: int | None,
    amp_dtype: str,
) -> TorchvisionSemanticSegmenter:
    check_amp_dtype(amp_dtype)
    categories = None if category_file is None else load_category_file(category_file, storage_options)
    build = ARCHITECTURES[architecture]
    if weights == RANDOM:
        warn_random(architecture)
        table = list(VOC) if categories is None else list(categories)
        with seeded_random_init():
            network = build(weights=None, weights_backbone=None, num_classes=len(table), aux_loss=False)
        digest = None
    else:
        state, digest = load_state_dict(weights, sha256=weights_sha256, storage_options=storage_options)
        num_classes = tensor_shape(state, CLASS_KEY, weights, architecture)[0]
        table = channel_categories(num_classes, categories, weights, category_file)
        aux_loss = any(key.startswith(AUX_PREFIX) for key in state)
        network = build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
        load_into(network, state, weights, architecture)
    return TorchvisionSemanticSegmenter(
        network.eval(),
        table,
        name=architecture,
        device=device,
        score_threshold=0.0 if score_threshold is None else float(score_threshold),
        resize=resize,
        weights=weights,
        weights_sha256=digest,
        amp_dtype=amp_dtype,
    )


def build_fcn(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    category_file: str | None = None,
    resize: int | None = None,
    amp_dtype: str = AMP_AUTO,
) -> TorchvisionSemanticSegmenter:
    """torchvision's fcn_resnet50 from a `.pth` state dict (path or URI) or `random`.

    score_threshold: drop a class's segment when its score is below it (default 0);
    category_file: a COCO json or list of categories (default the 21 VOC classes; see the
    module docstring); resize: shorter side in pixels to run at (torchvision's published
    weights use 520), default None = each image's own size; amp_dtype: auto | fp16 | bf16 |
    none, the network's autocast (auto: float16 on CUDA, none on the CPU).
    """
    return _build(
        "fcn", weights, weights_sha256=weights_sha256, device=device, storage_options=storage_options,
        score_threshold=score_threshold, category_file=category_file, resize=resize, amp_dtype=amp_dtype,
    )  # fmt: skip


def build_deeplabv3(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    category_file: str | None = None,
    resize: int | None = None,
    amp_dtype: str = AMP_AUTO,
) -> TorchvisionSemanticSegmenter:
    """torchvision's deeplabv3_resnet50; options as for `build_fcn`."""
    return _build(
        "deeplabv3", weights, weights_sha256=weights_sha256, device=device, storage_options=storage_options,
        score_threshold=score_threshold, category_file=category_file, resize=resize, amp_dtype=amp_dtype,
    )  # fmt: skip
