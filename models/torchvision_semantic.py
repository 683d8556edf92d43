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

import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .categories import VOC, Category, load_category_file
from .device import DeviceModel, autocast, pins, to_device
from .options import TorchvisionSemanticOptions
from .segments import Segments
from .semantic import SizeGroupOutput, class_segments, size_groups
from .torchvision_checkpoint import load_into, load_state_dict, tensor_shape
from .weights import RANDOM, WeightsError, random_network

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


class TorchvisionSemanticSegmenter(DeviceModel):
    """A torchvision FCN/DeepLabV3 behind the model protocol.

    options.resize: None runs each image at its own size; an int resizes it first so its
    shorter side has that many pixels (bilinear with antialiasing on the uint8 image, as
    torchvision's `SemanticSegmentation` preset of its published weights, whose size is
    520). Logits are upsampled back to the original size before the argmax. Images are
    grouped by size, so a prediction never depends on its batch neighbours.
    """

    task = "semantic"

    def __init__(
        self,
        network: nn.Module,
        categories: list[Category],
        options: TorchvisionSemanticOptions | None = None,
        *,
        name: str,
        **placement,
    ):
        network.aux_classifier = None  # a training-only head: never computed at inference
        super().__init__(network, options or TorchvisionSemanticOptions(), channels_last=True, **placement)
        self.name = name
        self.categories = categories
        self.score_threshold = self.score_threshold or 0.0
        self._mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: list[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
        """uint8 (H, W, 3) images → size groups (models/semantic.py)."""
        return size_groups(images, pins(self.device))

    @torch.inference_mode()
    def forward(self, batch: list[tuple[list[int], torch.Tensor]]) -> list[SizeGroupOutput]:
        """Per size group: (indices, labels int64 (N, H, W), max probability float (N, H, W))."""
        resize = self.options.resize
        outputs = []
        for indices, pixels in batch:
            pixels = to_device(pixels, self.device)
            size = pixels.shape[-2:]
            if resize is not None:
                pixels = TF.resize(pixels, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
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

    @torch.inference_mode()
    def postprocess(self, raw: list[SizeGroupOutput], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Per image: one segment per class present (models/semantic.py), its mask made on the device."""
        return class_segments(raw, len(sizes), [c.id for c in self.categories], self.score_threshold)


def build_torchvision_semantic(
    architecture: str,
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> TorchvisionSemanticSegmenter:
    """torchvision's `architecture` (fcn: fcn_resnet50, deeplabv3: deeplabv3_resnet50) from a
    `.pth` state dict (path or URI) or `random`.

    score_threshold: drop a class's segment when its score is below it (default 0);
    options: TorchvisionSemanticOptions (models/options.py); the category file's rule is
    the module docstring's.
    """
    parsed = TorchvisionSemanticOptions.parse(architecture, options)
    categories = None if parsed.category_file is None else load_category_file(parsed.category_file, storage_options)
    build = ARCHITECTURES[architecture]
    if weights == RANDOM:
        table = list(VOC) if categories is None else list(categories)
        network = random_network(
            architecture, lambda: build(weights=None, weights_backbone=None, num_classes=len(table), aux_loss=False)
        )
        digest = None
    else:
        state, digest = load_state_dict(weights, sha256=weights_sha256, storage_options=storage_options)
        num_classes = tensor_shape(state, CLASS_KEY, weights, architecture)[0]
        table = channel_categories(num_classes, categories, weights, parsed.category_file)
        aux_loss = any(key.startswith(AUX_PREFIX) for key in state)
        network = build(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
        load_into(network, state, weights, architecture)
    return TorchvisionSemanticSegmenter(
        network, table, parsed, name=architecture, device=device, score_threshold=score_threshold,
        weights=weights, weights_sha256=digest,
    )  # fmt: skip


# The registry's builders, one per architecture.
build_fcn = functools.partial(build_torchvision_semantic, "fcn")
build_deeplabv3 = functools.partial(build_torchvision_semantic, "deeplabv3")
