"""Mask R-CNN (He et al., 2017) from torchvision: instance segmentation with RoIAlign.

`maskrcnn` is torchvision's `maskrcnn_resnet50_fpn`, `maskrcnn_v2` its
`maskrcnn_resnet50_fpn_v2`. Both are built with `weights=None, weights_backbone=None` —
nothing is ever downloaded — and filled from a torchvision `.pth` state dict.

The region features of both heads come from `MultiScaleRoIAlign` (torchvision.ops.roi_align,
bilinear sampling at fractional box coordinates, no quantisation): 7×7 for the box head,
14×14 for the mask head, sampling ratio 2.

Labels → categories (the rule, for a checkpoint with `num_classes` outputs, background
included, and label 0 = background, never emitted):

- no category file: the COCO-91 label space of torchvision's COCO weights — label index ==
  COCO category id; needs num_classes == 91; labels at the 11 "N/A" ids (no COCO category)
  are dropped;
- a category file of K categories and num_classes == K + 1: label i (1..K) is the i-th
  category as listed in the file (contiguous labels, e.g. torchvision's fine-tuning
  tutorial);
- otherwise, when num_classes == max(category id) + 1: label == category id (what
  torchvision's detection reference scripts train on a COCO json); labels without a
  category are dropped;
- anything else is a WeightsError naming both numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.mask_rcnn import (
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_Weights,
)
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
)

from .categories import COCO, Category, load_category_file
from .device import DeviceModel, autocast, host_tensor, pins, to_device
from .options import MaskRCNNOptions
from .segments import Segments
from .torchvision_checkpoint import load_into, load_state_dict, tensor_shape
from .weights import RANDOM, WeightsError, random_network

ARCHITECTURES: dict[str, Callable[..., MaskRCNN]] = {
    "maskrcnn": maskrcnn_resnet50_fpn,
    "maskrcnn_v2": maskrcnn_resnet50_fpn_v2,
}

# The checkpoint key whose first dimension is the number of classes, background included.
CLASS_KEY = "roi_heads.box_predictor.cls_score.weight"

COCO_NUM_CLASSES = 91
# torchvision's box_score_thresh: detections at or below it are dropped.
DEFAULT_SCORE_THRESHOLD = 0.05

# torchvision's published `maskrcnn_resnet50_fpn` COCO weights were trained with frozen batch
# norm of eps 0, and torchvision sets eps = 0 when it loads them (`overwrite_eps`). The file is
# recognised as torch.hub recognises it: by the sha256 prefix in its published name.
_EPS0_SHA256_PREFIXES = {
    MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url.rsplit("-", 1)[-1].split(".")[0],  # "bf2d0c1e"
}


class _BoxesOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's transform, except that its postprocess only maps boxes back to the
    original image size and leaves the 28×28 mask probabilities for `postprocess`, which
    pastes and thresholds them one at a time — torchvision's own postprocess would hold a
    float (H, W) mask per detection of the whole batch at once."""

    def postprocess(self, result, image_shapes, original_image_sizes):
        for prediction, size, original in zip(result, image_shapes, original_image_sizes):
            prediction["boxes"] = resize_boxes(prediction["boxes"], size, original)
        return result


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Mask probabilities (N, 1, M, M) in their boxes (N, 4) → bool (N, H, W) of `prob > threshold`.

    Exactly torchvision's `paste_masks_in_image(masks, boxes, size) > threshold` (the mask is
    padded by one pixel, its box enlarged to match, resized bilinearly to the box's integer
    size and written at the box's place), without a float full-size mask per detection.
    """
    height, width = size
    pasted = torch.zeros((len(masks), height, width), dtype=torch.bool, device=masks.device)
    if not len(masks):
        return pasted
    padded, scale = expand_masks(masks, padding=1)
    corners = expand_boxes(boxes, scale).to(torch.int64).tolist()  # one device sync for all boxes
    for index, (x0, y0, x1, y1) in enumerate(corners):
        box_width, box_height = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        left, right, top, bottom = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if right <= left or bottom <= top:
            continue
        resized = F.interpolate(padded[index : index + 1], size=(box_height, box_width), mode="bilinear", align_corners=False)
        pasted[index, top:bottom, left:right] = resized[0, 0, top - y0 : bottom - y0, left - x0 : right - x0] > threshold
    return pasted


def label_categories(
    num_classes: int, categories: list[Category] | None, weights: str = "", category_file: str | None = None
) -> list[Category | None]:
    """Index = the network's label → its category, None for background and unused labels.

    See the module docstring for the rule.
    """
    if categories is None:
        if num_classes != COCO_NUM_CLASSES:
            raise WeightsError(
                f"checkpoint {weights} predicts {num_classes} classes (background included), but the default "
                f"COCO categories need {COCO_NUM_CLASSES}; give the checkpoint's categories with category_file"
            )
        table: list[Category | None] = [None] * COCO_NUM_CLASSES
        for category in COCO:
            table[category.id] = category
        return table
    count = len(categories)
    if num_classes == count + 1:
        return [None, *categories]
    max_id = max((c.id for c in categories), default=0)
    if min((c.id for c in categories), default=0) >= 1 and num_classes == max_id + 1:
        table = [None] * num_classes
        for category in categories:
            table[category.id] = category
        return table
    raise WeightsError(
        f"checkpoint {weights} predicts {num_classes} classes (background included), but category file "
        f"{category_file} lists {count} categories: it needs {count + 1} classes (label i = the i-th listed "
        f"category) or {max_id + 1} (label = category id)"
    )


class MaskRCNNSegmenter(DeviceModel):
    """A torchvision Mask R-CNN behind the model protocol: one segment per kept detection.

    preprocess: uint8 (H, W, 3) → uint8 (3, H, W) tensors on the host (pinned when bound for
    CUDA), sizes unchanged;
    forward: each image to the device as uint8 and scaled to float [0, 1] there, lists of
    images through the network (torchvision resizes each image to min_size/max_size and pads
    the list), one call per padded shape, under autocast `amp_dtype` (models/device.py),
    detections with boxes in original-image pixels;
    postprocess: masks pasted and thresholded on the device, and left there. One segment per
    detection, an empty mask
    included; its score is the detection's class probability, its box the detector's box. The network keeps torch's default (NCHW) memory layout: channels_last is
    kept to the plain convnets (U-Net, FCN, DeepLabV3).
    """

    task = "instance"

    def __init__(
        self,
        network: MaskRCNN,
        labels: list[Category | None],
        options: MaskRCNNOptions | None = None,
        *,
        name: str = "maskrcnn",
        **placement,
    ):
        """network: built with the options' sizes, detections per image and score threshold
        (`network_options`), which torchvision's heads apply."""
        transform = network.transform
        network.transform = _BoxesOnlyTransform(
            transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
            size_divisible=transform.size_divisible, fixed_size=transform.fixed_size,
            _skip_resize=transform._skip_resize,
        )  # fmt: skip
        super().__init__(network, options or MaskRCNNOptions(), **placement)
        self.name = name
        self.labels = labels
        self.categories = [category for category in labels if category is not None]
        self.score_threshold = network.roi_heads.score_thresh
        self._emitted = torch.tensor([category is not None for category in labels], device=self.device)

    @property
    def max_detections(self) -> int:
        return self.network.roi_heads.detections_per_img

    def preprocess(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 (H, W, 3) images → uint8 (3, H, W) tensors (HWC memory) on the host."""
        tensors = []
        pin = pins(self.device)
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
            tensors.append(host_tensor(image, pin).permute(2, 0, 1))
        return tensors

    def padded_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) torchvision's transform gives this image alone: resized so its short side
        is min_size (long side at most max_size), then padded to a multiple of 32."""
        transform = self.network.transform
        scale = min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))
        divisor = transform.size_divisible
        # interpolate(scale_factor=s, recompute_scale_factor=True) outputs ⌊n·s⌋ per axis.
        return tuple(-(-math.floor(n * scale) // divisor) * divisor for n in (height, width))

    @torch.inference_mode()
    def forward(self, batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per image on the device: boxes (N, 4) in its original pixels, labels, scores, and
        mask probabilities (N, 1, 28, 28) of the predicted class, only kept detections.

        torchvision pads every image of a call to the call's largest (resized) image, and the
        padding changes an image's features near its border and the anchors the RPN ranks, so
        its detections would depend on its batch neighbours. Images are therefore run in
        groups that share the padded shape each would have alone: a prediction never depends
        on which other images share its batch.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(batch):
            groups.setdefault(self.padded_shape(*image.shape[-2:]), []).append(index)
        outputs: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for indices in groups.values():
            images = [to_device(batch[i], self.device).float().div_(255) for i in indices]
            with autocast(self.device, self.amp_dtype):
                for index, detections in zip(indices, self.network(images)):
                    outputs[index] = detections
        return outputs

    @torch.inference_mode()
    def postprocess(self, raw: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Per image: its kept detections, masks pasted at the image's size and thresholded
        on the device (mask probabilities in float32, also under autocast)."""
        results = []
        for detections, size in zip(raw, sizes):
            probabilities = detections["masks"].float()
            masks = paste_masks(probabilities, detections["boxes"].float(), tuple(size), self.options.mask_threshold)
            # Only labels with a category. A detection whose pasted mask is empty is kept (its
            # box and score are still the detector's), as torchvision returns it.
            keep = self._emitted[detections["labels"]]
            results.append(
                Segments.of(
                    masks[keep],
                    [self.labels[label].id for label in detections["labels"][keep].tolist()],
                    detections["scores"][keep].float().tolist(),
                    boxes=detections["boxes"][keep].float().tolist(),
                )
            )
        return results


def network_options(options: MaskRCNNOptions, score_threshold: float | None) -> dict:
    """torchvision's MaskRCNN keyword arguments for these options; score_threshold: the
    detections' class probability cut (torchvision's box_score_thresh, default 0.05)."""
    return dict(
        box_score_thresh=DEFAULT_SCORE_THRESHOLD if score_threshold is None else float(score_threshold),
        box_detections_per_img=options.max_detections,
        min_size=options.min_size,
        max_size=options.max_size,
    )


def build_maskrcnn_family(
    architecture: str,
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> MaskRCNNSegmenter:
    """torchvision's `architecture` (maskrcnn: maskrcnn_resnet50_fpn, maskrcnn_v2:
    maskrcnn_resnet50_fpn_v2) from a `.pth` state dict (path or URI) or `random`.

    score_threshold: keep detections whose class probability exceeds it (default 0.05,
    torchvision's box_score_thresh); options: MaskRCNNOptions (models/options.py); how
    labels map to a category file's categories is the module docstring's (default COCO's
    80, 91 labels).
    """
    parsed = MaskRCNNOptions.parse(architecture, options)
    categories = None if parsed.category_file is None else load_category_file(parsed.category_file, storage_options)
    arguments = network_options(parsed, score_threshold)
    build = ARCHITECTURES[architecture]
    if weights == RANDOM:
        num_classes = COCO_NUM_CLASSES if categories is None else len(categories) + 1
        network = random_network(
            architecture, lambda: build(weights=None, weights_backbone=None, num_classes=num_classes, **arguments)
        )
        labels, digest = label_categories(num_classes, categories), None
    else:
        state, digest = load_state_dict(weights, sha256=weights_sha256, storage_options=storage_options)
        num_classes = tensor_shape(state, CLASS_KEY, weights, architecture)[0]
        labels = label_categories(num_classes, categories, weights, parsed.category_file)
        network = build(weights=None, weights_backbone=None, num_classes=num_classes, **arguments)
        load_into(network, state, weights, architecture)
        if architecture == "maskrcnn" and digest[:8] in _EPS0_SHA256_PREFIXES:
            for module in network.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eps = 0.0
    return MaskRCNNSegmenter(
        network, labels, parsed, name=architecture, device=device, weights=weights, weights_sha256=digest
    )


# The registry's builders, one per architecture.
build_maskrcnn = functools.partial(build_maskrcnn_family, "maskrcnn")
build_maskrcnn_v2 = functools.partial(build_maskrcnn_family, "maskrcnn_v2")
