"""SAM (Kirillov et al., 2023) on transformers' `SamModel`: automatic masks and box prompts.

Weights: a transformers SAM checkpoint directory (config.json + model.safetensors, optional
preprocessor_config.json), local or any fsspec URI (copied to a local temp dir, then
`from_pretrained(local_files_only=True)` — nothing is ever fetched from a hub); an official
segment-anything `.pth` (vit_b/vit_l/vit_h, or any size: the config is read from the
tensors' shapes, models/sam_convert.py), loaded with `torch.load(weights_only=True)` and
converted to the transformers layout; or `random` (RANDOM_CONFIG below, seeded).

Two modes, chosen per batch by whether the pipeline passes prompts:

- **automatic** (no prompts column): segment-anything's SamAutomaticMaskGenerator as
  transformers' "mask-generation" pipeline runs it — a grid of points_per_side² point
  prompts per crop (crops_n_layers extra crop layers), decoded points_per_batch at a time
  against one image embedding per crop, 3 masks per point; masks filtered by predicted IoU
  (pred_iou_thresh) and stability (stability_score_thresh, stability_score_offset),
  thresholded, masks touching a crop's inner edge dropped, then box NMS within each crop
  (box_nms_thresh, segment-anything) and over the whole image (crops_nms_thresh, as the
  transformers pipeline does — scored by predicted IoU), and optionally small holes and
  islands removed (min_mask_region_area, segment-anything's postprocess_small_regions).
  One category, `object` (id 1); a segment's score is its predicted IoU.
- **prompted** (`preprocess(images, prompts=[Prompts | None, ...])`): one mask per box
  (multimask_output=False), keeping the box's category_id and annotation_id; score =
  predicted IoU. An image without prompts gets no segments; an invalid box (not finite,
  x1 ≤ x0 or y1 ≤ y0) fails its image with a ValueError naming the annotation.

Where the work happens: the image encoder runs once per image (per crop in automatic
mode) on the model's device, in stacks of encoder_batch_size; the mask decoder in chunks
of points_per_batch prompts; upsampling, thresholding, filtering and NMS on the device.
Kept masks wait for the NMS bit-packed (1 bit per pixel), and only the final ones are
unpacked to bool masks at the original image size (left on the device by
`postprocess`, for the pipeline to bit-pack there). The image encoder runs under
autocast `amp_dtype` (models/device.py; auto: float16 on CUDA); the prompt encoder, mask
decoder and every threshold stay in float32. Preprocessing (resize to
target_size on the longest side, ImageNet normalisation, padding to the model's image
size) is transformers' SamImageProcessor; the helpers of its mask-generation path are
reused (generate_crop_boxes, post_process_masks and the functions filter_masks is made of)
— except its RLE round trip, which only served to hold masks compactly on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops.boxes import batched_nms
from transformers import SamConfig, SamImageProcessor, SamModel
from transformers.image_utils import SizeDict
from transformers.models.sam.image_processing_sam import (
    _batched_mask_to_box,
    _compute_stability_score,
    _is_box_near_crop_edge,
    _pad_masks,
)

from .base import Prompts
from .bits import pack_bits, unpack_bits
from .categories import Category, load_category_file, parse_categories
from .checkpoint_files import is_segment_anything_file
from .device import DeviceModel, autocast, to_device
from .hf_checkpoint import (
    load_pretrained,
    open_checkpoint,
    processor_arguments,
    processor_settings,
)
from .options import SamOptions, SegmentAnythingOptions
from .sam_convert import convert_state_dict, infer_config, is_segment_anything
from .segments import NO_ANNOTATION, Segments
from .torchvision_checkpoint import load_state_dict
from .weights import RANDOM, WeightsError, random_network

log = logging.getLogger("rayseg.models")

OBJECT = Category(1, "object", True)

# `--weights random`: a deliberately small SAM (not ViT-B, whose random init alone takes
# seconds and whose CPU forward takes more): a 2-block ViT of width 64 on 256×256 inputs
# (patch 16, window 8, block 1 global), 64-channel neck, prompt encoder and a 2-layer mask
# decoder of width 64 with 8 heads. Seeded, so every actor builds the same model.
RANDOM_CONFIG = {
    "vision_config": {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 256, "patch_size": 16,
        "window_size": 8, "global_attn_indexes": [1], "output_channels": 64, "num_pos_feats": 32, "mlp_dim": 256,
    },
    "prompt_encoder_config": {"hidden_size": 64, "image_size": 256, "patch_size": 16, "mask_input_channels": 16},
    "mask_decoder_config": {
        "hidden_size": 64, "mlp_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "iou_head_hidden_dim": 64,
    },
}  # fmt: skip

# Images (crops) per image-encoder call on CUDA; on the CPU it is 1 (see SamSegmenter).
ENCODER_BATCH_CUDA = 4



# --- loading -------------------------------------------------------------------------

# The prompt encoder's positional embedding is tied to the model's shared one, stored once.
_TIED_KEYS = ("shared_embedding.positional_embedding",)


def load_hf_directory(
    network_cls, processor_cls, model_type: str, weights: str, sha256: str | None, storage_options: dict | None,
    tied_keys: tuple[str, ...] = (),
) -> tuple:
    """(network, the checkpoint's own image processor or None, weights sha256) of a SAM-family
    HF directory: config.json's model_type must be `model_type`; the processor is read from
    preprocessor_config.json or processor_config.json's image_processor, when there is one."""
    with open_checkpoint(weights, (model_type,), sha256, storage_options) as checkpoint:
        network = load_pretrained(network_cls, checkpoint, tied_keys)
        settings = processor_settings(checkpoint)
        processor = None
        if settings is not None:
            try:
                processor = processor_cls(**processor_arguments(settings))
            except (ValueError, TypeError) as e:
                raise WeightsError(f"{checkpoint.uri}: cannot build {processor_cls.__name__} from its settings: {e}") from e
    return network, processor, checkpoint.digest


def _load_segment_anything(
    weights: str, sha256: str | None, storage_options: dict | None, model_type: str | None, vit_num_heads: int | None
) -> tuple[SamModel, str]:
    """A segment-anything `.pth`: read safely (weights_only=True), converted, loaded strictly."""
    state, digest = load_state_dict(weights, sha256=sha256, storage_options=storage_options)
    if not is_segment_anything(state):
        raise WeightsError(
            f"{weights} is not a segment-anything checkpoint (no image_encoder.patch_embed / mask_decoder.iou_token)"
        )
    config = infer_config(state, weights, model_type=model_type, vit_num_heads=vit_num_heads)
    converted = convert_state_dict(state)
    with torch.device("meta"):
        network = SamModel(config)
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise WeightsError(f"{weights} does not convert to SAM's layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        network.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        message = str(e)
        raise WeightsError(f"{weights} does not match the SAM config read from it: {message[:600]}") from e
    return network.float(), digest


def load_sam(
    weights: str,
    *,
    sha256: str | None = None,
    storage_options: dict | None = None,
    model_type: str | None = None,
    vit_num_heads: int | None = None,
) -> tuple[SamModel, SamImageProcessor | None, str | None]:
    """(network, the checkpoint's own image processor or None, weights sha256) for `weights`."""
    if weights == RANDOM:
        return random_network("sam", lambda: SamModel(SamConfig(**RANDOM_CONFIG))).eval(), None, None
    if is_segment_anything_file(weights):
        network, digest = _load_segment_anything(weights, sha256, storage_options, model_type, vit_num_heads)
        return network.eval(), None, digest
    if model_type is not None or vit_num_heads is not None:
        raise WeightsError("model_type and vit_num_heads apply to segment-anything .pth checkpoints, not to HF directories")
    return load_hf_directory(SamModel, SamImageProcessor, "sam", weights, sha256, storage_options, _TIED_KEYS)


def image_processor_for(network: SamModel, processor: SamImageProcessor | None, target_size: int | None) -> SamImageProcessor:
    """SAM's preprocessing for `network`: the checkpoint's own processor when it has one,
    else SamImageProcessor's defaults (resize the longest side, ImageNet mean/std, pad) —
    with the longest side `target_size` (default: the model's image size, 1024 for the
    published checkpoints) and padding to the model's image size, which its patch
    embedding requires."""
    image_size = network.config.vision_config.image_size
    if processor is None:
        processor = SamImageProcessor(
            size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}
        )
    pad = processor.pad_size
    if (pad["height"], pad["width"]) != (image_size, image_size):
        raise WeightsError(f"the image processor pads to {pad['height']}x{pad['width']} but the model takes {image_size}x{image_size}")
    if target_size is not None:
        if not 1 <= target_size <= image_size:
            raise ValueError(f"target_size must be between 1 and the model's image size {image_size}, got {target_size}")
        processor.size = SizeDict(longest_edge=target_size)
    return processor


# --- small regions (segment-anything's utils/amg.py remove_small_regions, on scipy) -----------

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fills holes ("holes") or removes islands ("islands") smaller than area_thresh pixels
    (8-connected, as segment-anything's cv2 version). Returns the mask and whether it changed."""
    correct_holes = mode == "holes"
    working = correct_holes ^ mask
    regions, count = ndimage.label(working, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    small = [i + 1 for i, size in enumerate(sizes) if size < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not correct_holes:
        fill = [i for i in range(count + 1) if i not in fill]
        if not fill:  # every region is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


# --- the model ---------------------------------------------------------------------------


@dataclass
class _Crop:
    box: list[int]  # x0, y0, x1, y1 in the image
    points: torch.Tensor  # float (N, 2), in the resized crop's pixels
    size: tuple[int, int]  # crop (H, W)
    reshaped: tuple[int, int]  # crop after resizing, before padding


@dataclass
class _AutomaticImage:
    first: int  # index of its first crop in the batch's pixel_values
    crops: list[_Crop]
    size: tuple[int, int]


@dataclass
class _PromptedImage:
    index: int | None  # its row in pixel_values; None when it has no prompts
    boxes: torch.Tensor | None  # float64 (K, 4), in resized pixels (as SamProcessor scales them)
    category_ids: list[int]
    annotation_ids: list[int]
    size: tuple[int, int]
    reshaped: tuple[int, int] | None


@dataclass
class SamBatch:
    pixel_values: torch.Tensor | None  # float (N, 3, S, S) on the CPU
    images: list  # _AutomaticImage or _PromptedImage, one per input image
    prompted: bool


@dataclass
class _Masks:
    masks: torch.Tensor  # bool (K, H, W)
    scores: torch.Tensor  # float (K,)
    category_ids: list[int] | None  # None: automatic (OBJECT)
    annotation_ids: list[int] | None


def check_prompts(prompts: Prompts) -> tuple[np.ndarray, list[int], list[int]]:
    """(boxes float64 (K, 4), category ids, annotation ids (NO_ANNOTATION for none)) of valid prompts;
    ValueError naming the first invalid box's annotation otherwise."""
    boxes = np.asarray(prompts.boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box prompts must be an array of shape (K, 4), got shape {boxes.shape}")
    categories = np.asarray(prompts.category_ids).reshape(-1)
    annotations = np.asarray(prompts.annotation_ids).reshape(-1)
    if len(categories) != len(boxes) or len(annotations) != len(boxes):
        raise ValueError(
            f"{len(boxes)} box prompts but {len(categories)} category ids and {len(annotations)} annotation ids"
        )
    invalid = ~np.isfinite(boxes).all(axis=1) | ~(boxes[:, 2] > boxes[:, 0]) | ~(boxes[:, 3] > boxes[:, 1])
    if invalid.any():
        first = int(np.argmax(invalid))
        owner = f"annotation {int(annotations[first])}" if annotations[first] >= 0 else f"box {first}"
        raise ValueError(
            f"invalid box prompt for {owner}: {boxes[first].tolist()} "
            f"(a box is 4 finite numbers x0, y0, x1, y1 with x0 < x1 and y0 < y1; {int(invalid.sum())} invalid)"
        )
    return boxes, [int(c) for c in categories], [int(a) if a >= 0 else NO_ANNOTATION for a in annotations]


def crop_layers(crops_n_layers: int) -> list[int]:
    """The crop layer of each crop generate_crop_boxes makes: the image (0), then 4**l crops per layer l."""
    return [layer for layer in range(crops_n_layers + 1) for _ in range(4**layer)]


class SamSegmenter(DeviceModel):
    """SAM behind the model protocol; see the module docstring for the two modes.

    What SAM 2 (models/sam2.py) does differently is in the methods marked "hook": its
    preprocessing, point and box coordinates, image embeddings and mask upscaling."""

    name = "sam"
    task = "promptable"
    options_class: type[SegmentAnythingOptions] = SamOptions

    def __init__(
        self,
        network: SamModel,
        processor: SamImageProcessor,
        options: SegmentAnythingOptions | None = None,
        *,
        categories: list[Category] | None = None,
        **placement,
    ):
        """categories: what prompted mode labels its masks with (None: automatic mode only)."""
        super().__init__(network, options or self.options_class(), **placement)
        # On the CPU one image per call: nothing to gain from stacking, and an image's masks
        # then never depend on its batch neighbours (bit for bit).
        default_batch = ENCODER_BATCH_CUDA if self.device.type == "cuda" else 1
        self.encoder_batch_size = self.options.encoder_batch_size or default_batch
        self.processor = processor
        self.target_size = self._target_size()
        self.prompt_categories = categories is not None
        self.categories = list(categories) if categories is not None else [OBJECT]

    # -- hooks: SAM's own ways (SAM 2 overrides them) --

    def _target_size(self) -> int:
        """The longest side images are resized to (the point grid's frame)."""
        return int(self.processor.size["longest_edge"])

    def _crop_points(self, image: torch.Tensor, points: torch.Tensor, cropped: list[torch.Tensor]) -> list[torch.Tensor]:
        """Float (N, 2) point prompts per crop, in the resized crop's pixels, given the points
        (1, N, crops, 2) and crops generate_crop_boxes made for `image`."""
        per_crop = [points[0, :, c] for c in range(points.shape[2])]
        layers = self.options.crops_n_layers
        if layers and self.options.crop_n_points_downscale_factor != 1:
            # generate_crop_boxes stacks one grid per crop, which fails when layers' grids
            # differ: take layer l's crops from a call with that layer's points per side.
            of_crop = crop_layers(layers)
            for layer in range(1, layers + 1):
                _, layer_points, _, _ = self.processor.generate_crop_boxes(
                    image, self.target_size, layers, self.options.crop_overlap_ratio, self._points_per_side(layer), 1
                )
                per_crop = [layer_points[0, :, c] if of_crop[c] == layer else p for c, p in enumerate(per_crop)]
        return per_crop

    def _points_per_side(self, layer: int) -> int:
        """The point grid's side in crop layer `layer` (segment-anything's build_all_layer_point_grids)."""
        return int(self.options.points_per_side / self.options.crop_n_points_downscale_factor**layer)

    def _pixel_values(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """uint8 (3, H, W) images → (pixel_values float (N, 3, S, S), each one's size once resized)."""
        inputs = self.processor(images=pixels, input_data_format="channels_first", return_tensors="pt")
        return inputs["pixel_values"].float(), [tuple(size) for size in inputs["reshaped_input_sizes"].tolist()]

    def _scale_boxes(self, boxes: torch.Tensor, size: tuple[int, int], reshaped: tuple[int, int]) -> torch.Tensor:
        """Float64 (K, 4) boxes in the image's pixels → in the resized image's."""
        (old_h, old_w), (new_h, new_w) = size, reshaped
        # SamProcessor._normalize_coordinates: original pixels → resized pixels, in float64.
        return boxes * torch.tensor([new_w / old_w, new_h / old_h, new_w / old_w, new_h / old_h], dtype=torch.float64)

    def _image_embeddings(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's output for a stack of images: its feature levels, each (N, C, h, w)."""
        return [self.network.get_image_embeddings(pixel_values)]

    def _decoder_embeddings(self, levels: list[torch.Tensor], index: int):
        """The network's `image_embeddings` argument for image (crop) `index` of the batch."""
        return levels[0][index : index + 1]

    def _upscale(self, pred_masks: torch.Tensor, size: tuple[int, int], reshaped: tuple[int, int], binarize: bool) -> torch.Tensor:
        """The decoder's low-resolution masks (1, P, M, h, w) at the image's (crop's) `size`: (P, M, H, W)."""
        (upscaled,) = self.processor.post_process_masks(
            pred_masks, [size], [reshaped], mask_threshold=self.options.mask_threshold, binarize=binarize
        )
        return upscaled

    # -- preprocess (CPU) --

    def preprocess(self, images: list[np.ndarray], prompts: list[Prompts | None] | None = None) -> SamBatch:
        """uint8 (H, W, 3) images (and per image its box prompts or None) → a SamBatch."""
        if prompts is None:
            if self.prompt_categories:
                raise ValueError(
                    "this SAM model was given categories for box prompts, but the images have no prompts "
                    "(automatic mask generation labels everything 'object', id 1)"
                )
            return self._preprocess_automatic(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt entries")
        return self._preprocess_prompted(images, prompts)

    def _crops(self, image: torch.Tensor) -> tuple[list[_Crop], list[torch.Tensor]]:
        """The crops of one (3, H, W) image, their point grids and pixels, from transformers'
        SamImageProcessor.generate_crop_boxes (segment-anything's crop and grid rules)."""
        crop_boxes, points, cropped, _ = self.processor.generate_crop_boxes(
            image, self.target_size, self.options.crops_n_layers, self.options.crop_overlap_ratio, self.options.points_per_side, 1
        )
        per_crop = self._crop_points(image, points, cropped)
        crops = [
            _Crop(
                box=[int(v) for v in box.tolist()],
                points=points_of_crop,
                size=tuple(pixels.shape[-2:]),
                reshaped=(0, 0),
            )
            for box, points_of_crop, pixels in zip(crop_boxes, per_crop, cropped)
        ]
        return crops, list(cropped)

    def _preprocess_automatic(self, images: list[np.ndarray]) -> SamBatch:
        items, pixels = [], []
        for image in images:
            tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
            crops, cropped = self._crops(tensor)
            items.append(_AutomaticImage(first=len(pixels), crops=crops, size=tuple(image.shape[:2])))
            pixels.extend(cropped)
        if not pixels:
            return SamBatch(None, [], prompted=False)
        pixel_values, reshaped = self._pixel_values(pixels)
        for item in items:
            for offset, crop in enumerate(item.crops):
                crop.reshaped = reshaped[item.first + offset]
        return SamBatch(pixel_values, items, prompted=False)

    def _preprocess_prompted(self, images: list[np.ndarray], prompts: list[Prompts | None]) -> SamBatch:
        items: list[_PromptedImage] = []
        to_encode: list[torch.Tensor] = []
        for image, prompt in zip(images, prompts):
            size = tuple(image.shape[:2])
            if prompt is None or len(prompt.boxes) == 0:
                items.append(_PromptedImage(None, None, [], [], size, None))
                continue
            boxes, category_ids, annotation_ids = check_prompts(prompt)
            items.append(_PromptedImage(len(to_encode), torch.from_numpy(boxes), category_ids, annotation_ids, size, None))
            to_encode.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        if not to_encode:
            return SamBatch(None, items, prompted=True)
        pixel_values, reshaped = self._pixel_values(to_encode)
        for item in items:
            if item.index is not None:
                item.reshaped = reshaped[item.index]
                item.boxes = self._scale_boxes(item.boxes, item.size, item.reshaped)
        return SamBatch(pixel_values, items, prompted=True)

    # -- forward (device) --

    def _encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Image embeddings, per feature level (N, C, h, w), float, on the device: the encoder
        once per image/crop, in stacks of encoder_batch_size."""
        chunks = []
        for start in range(0, len(pixel_values), self.encoder_batch_size):
            chunk = to_device(pixel_values[start : start + self.encoder_batch_size], self.device)
            with autocast(self.device, self.amp_dtype):
                chunks.append([level.float() for level in self._image_embeddings(chunk)])
        return [torch.cat(level) for level in zip(*chunks)]

    @torch.inference_mode()
    def forward(self, batch: SamBatch) -> list[_Masks]:
        embeddings = self._encode(batch.pixel_values) if batch.pixel_values is not None else None
        if batch.prompted:
            return [self._decode_boxes(embeddings, item) for item in batch.images]
        return [self._generate(embeddings, item) for item in batch.images]

    def _decode_boxes(self, embeddings: list[torch.Tensor] | None, item: _PromptedImage) -> _Masks:
        height, width = item.size
        if item.index is None:
            empty = torch.zeros((0, height, width), dtype=torch.bool, device=self.device)
            return _Masks(empty, torch.zeros(0, device=self.device), [], [])
        boxes = item.boxes.to(self.device)
        masks, scores = [], []
        for start in range(0, len(boxes), self.options.points_per_batch):
            output = self.network(
                image_embeddings=self._decoder_embeddings(embeddings, item.index),
                input_boxes=boxes[None, start : start + self.options.points_per_batch],
                multimask_output=False,
            )
            masks.append(self._upscale(output.pred_masks, item.size, item.reshaped, binarize=True)[:, 0])
            scores.append(output.iou_scores[0, :, 0])
        return _Masks(torch.cat(masks), torch.cat(scores).float(), item.category_ids, item.annotation_ids)

    def _filter(self, masks: torch.Tensor, iou_scores: torch.Tensor, size: tuple[int, int], crop_box: list[int]):
        """SamImageProcessor.filter_masks without its RLE encoding: (bool masks at crop size,
        scores, boxes in image pixels) of the masks that pass the filters."""
        height, width = size
        masks, iou_scores = masks.flatten(0, 1), iou_scores.flatten(0, 1)
        keep = torch.ones(len(masks), dtype=torch.bool, device=masks.device)
        if self.options.pred_iou_thresh > 0.0:
            keep &= iou_scores > self.options.pred_iou_thresh
        masks, iou_scores = masks[keep], iou_scores[keep]
        if self.options.stability_score_thresh > 0.0:
            stable = _compute_stability_score(masks, self.options.mask_threshold, self.options.stability_score_offset) > self.options.stability_score_thresh
            masks, iou_scores = masks[stable], iou_scores[stable]
        masks = masks > self.options.mask_threshold
        boxes = _batched_mask_to_box(masks)
        inside = ~_is_box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
        masks, iou_scores, boxes = masks[inside], iou_scores[inside], boxes[inside]
        left, top = crop_box[0], crop_box[1]
        boxes = boxes + torch.tensor([left, top, left, top], device=boxes.device)
        return masks, iou_scores, boxes

    def _generate(self, embeddings: list[torch.Tensor], item: _AutomaticImage) -> _Masks:
        height, width = item.size
        packed, boxes, scores, crop_of = [], [], [], []
        for c, crop in enumerate(item.crops):
            crop_masks, crop_scores, crop_boxes = [], [], []
            points = crop.points.to(self.device)
            for start in range(0, len(points), self.options.points_per_batch):
                chunk = points[start : start + self.options.points_per_batch]
                output = self.network(
                    image_embeddings=self._decoder_embeddings(embeddings, item.first + c),
                    input_points=chunk[None, :, None, :],
                    input_labels=torch.ones((1, len(chunk), 1), dtype=torch.int64, device=self.device),
                    multimask_output=True,
                )
                upscaled = self._upscale(output.pred_masks, crop.size, crop.reshaped, binarize=False)
                kept_masks, kept_scores, kept_boxes = self._filter(upscaled, output.iou_scores[0], item.size, crop.box)
                crop_masks.append(pack_bits(kept_masks.flatten(1)))  # held until the NMS: 1 bit a pixel
                crop_scores.append(kept_scores)
                crop_boxes.append(kept_boxes)
            crop_scores, crop_boxes = torch.cat(crop_scores), torch.cat(crop_boxes)
            # Duplicates within the crop (segment-anything's box_nms_thresh); indices kept in
            # their original order, so the image-wide NMS sees them as transformers does.
            keep = batched_nms(crop_boxes.float(), crop_scores, torch.zeros_like(crop_scores), self.options.box_nms_thresh)
            keep = keep.sort().values
            packed.append(torch.cat(crop_masks)[keep])
            scores.append(crop_scores[keep])
            boxes.append(crop_boxes[keep])
            crop_of.append(torch.full((len(keep),), c, dtype=torch.int64, device=self.device))
        scores, boxes, crop_of = torch.cat(scores), torch.cat(boxes), torch.cat(crop_of)
        local = torch.cat([torch.arange(len(p), device=self.device) for p in packed])
        # Duplicates over the whole image (transformers' post_process_for_mask_generation).
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), self.options.crops_nms_thresh)
        masks = torch.zeros((len(keep), height, width), dtype=torch.bool, device=self.device)
        kept_crops = crop_of[keep]
        for c, crop in enumerate(item.crops):
            positions = torch.nonzero(kept_crops == c).flatten()
            if len(positions):
                crop_masks = unpack_bits(packed[c][local[keep[positions]]], crop.size[0] * crop.size[1]).unflatten(1, crop.size)
                masks[positions] = _pad_masks(crop_masks, crop.box, height, width)
        return _Masks(masks, scores[keep].float(), None, None)

    # -- postprocess (device → host) --

    @torch.inference_mode()
    def postprocess(self, raw: list[_Masks], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Per image: its masks (still on the device, except after the small-region clean-up,
        which is scipy's on the host) with their scores, minus those below score_threshold."""
        results = []
        for output, size in zip(raw, sizes):
            masks, scores = output.masks, output.scores.cpu().numpy()
            if tuple(masks.shape[1:]) != tuple(size):
                raise RuntimeError(f"masks of shape {tuple(masks.shape[1:])} for an image of size {tuple(size)}")
            if output.category_ids is None:
                if self.options.min_mask_region_area > 0 and len(masks):
                    cleaned, scores = self._remove_small_regions(masks.cpu().numpy(), scores)
                    masks = torch.from_numpy(cleaned)
                segments = Segments.of(masks, [OBJECT.id] * len(scores), scores)
            else:
                segments = Segments.of(masks, output.category_ids, scores, annotation_ids=output.annotation_ids)
            results.append(segments.above(self.score_threshold))
        return results

    def _remove_small_regions(self, masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """segment-anything's postprocess_small_regions: holes and islands below
        min_mask_region_area removed, then NMS again preferring masks that did not change."""
        cleaned, unchanged = [], []
        for mask in masks:
            mask, holes = remove_small_regions(mask, self.options.min_mask_region_area, "holes")
            mask, islands = remove_small_regions(mask, self.options.min_mask_region_area, "islands")
            cleaned.append(mask)
            unchanged.append(float(not (holes or islands)))
        cleaned = np.stack(cleaned)
        boxes = _batched_mask_to_box(torch.from_numpy(cleaned))
        keep = batched_nms(
            boxes.float(), torch.tensor(unchanged), torch.zeros(len(boxes)), max(self.options.box_nms_thresh, self.options.crops_nms_thresh)
        )
        keep = keep.sort().values.numpy()  # keep the predicted-IoU order
        return cleaned[keep], scores[keep]


def prompt_categories(options: SegmentAnythingOptions, storage_options: dict | None) -> list[Category] | None:
    """What prompted mode labels masks with: `category_file`'s or `categories`, else None."""
    if options.category_file is not None:
        return load_category_file(options.category_file, storage_options)
    if options.categories is not None:
        return parse_categories(options.categories)
    return None


def build_sam(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> SamSegmenter:
    """SAM from an HF directory, a segment-anything `.pth` (path or URI) or `random`.

    options: SamOptions (models/options.py), segment-anything's and transformers' names and
    defaults. score_threshold: drop segments whose predicted IoU is below it (default keep
    all). Prompted mode labels masks with `categories` or `category_file`; automatic mode
    emits `object` (id 1) and refuses a model given categories.
    """
    parsed = SamOptions.parse("sam", options)
    network, processor, digest = load_sam(
        weights, sha256=weights_sha256, storage_options=storage_options,
        model_type=parsed.model_type, vit_num_heads=parsed.vit_num_heads,
    )  # fmt: skip
    return SamSegmenter(
        network, image_processor_for(network, processor, parsed.target_size), parsed,
        categories=prompt_categories(parsed, storage_options), device=device, score_threshold=score_threshold,
        weights=weights, weights_sha256=digest,
    )  # fmt: skip
