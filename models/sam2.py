"""SAM 2 (Ravi et al., 2024) on transformers' `Sam2Model`: automatic masks and box prompts.

The `sam` family's model (models/sam.py, SamSegmenter) with SAM 2's network: the same two
modes, options (models/options.py, Sam2Options: SamOptions less the segment-anything-`.pth`
fields and target_size), filters, NMS, small-region clean-up, bit-packing and device
placement — only what SAM 2 does differently is here, as the hooks SamSegmenter marks:

- **preprocessing**: transformers' Sam2ImageProcessor — every image (crop) resized to the
  model's square input S×S (1024 for the published checkpoints; no aspect-preserving resize,
  no padding), rescaled and ImageNet-normalised: pixel_values float (N, 3, S, S).
- **image embeddings**: `Sam2Model.get_image_embeddings` gives three feature levels per
  image — (N, C/8, S/4, S/4) and (N, C/4, S/8, S/8) high-resolution features (already
  projected for the mask decoder) and the (N, C, S/16, S/16) embedding — run in stacks of
  encoder_batch_size on the model's device (autocast `amp_dtype`) and handed to the mask
  decoder together, sliced per image (crop).
- **coordinates**: points and boxes are scaled per axis from the image's (crop's) pixels to
  S×S, as Sam2Processor scales prompts (`_normalize_coordinates`).
- **masks**: the decoder's (1, P, 3, S/4, S/4) logits are resized straight to the image's
  (crop's) size by Sam2ImageProcessor.post_process_masks (bilinear; there is no padding to
  cut off). Scores are SAM 2's predicted IoU, a sigmoid: between 0 and 1. In prompted mode
  (multimask_output=False) the decoder may fall back from its single-mask output to its best
  multimask one when the former is unstable (`dynamic_multimask_via_stability`, SAM 2's own
  rule, inside Sam2Model).

Where this differs from transformers on purpose: the automatic point grid. Sam2ImageProcessor
inherits SamImageProcessor.generate_crop_boxes, which scales each crop's grid by SAM's
longest-side rule; SAM 2 resizes every crop to a square, so for a non-square crop those
points cover only part of it (a 64×48 crop's grid spans the left 75%: no mask is prompted in
the rest), and so does transformers' "mask-generation" pipeline. Here each crop's grid (the
same points in its pixels, `_build_point_grid` × its width and height) is scaled per axis as
Sam2Processor scales point prompts — what SAM 2's own SAM2AutomaticMaskGenerator does
(`transform_coords(normalize=True)`). For square crops both rules give the same points, and
the masks equal the transformers pipeline's (tests/test_sam2.py). The crops themselves, the
mask filters (filter_masks without its RLE round trip) and the NMS are transformers'.

Weights: a transformers SAM 2 checkpoint directory (config.json with model_type "sam2" +
model.safetensors, optionally its image processor's settings in preprocessor_config.json
or processor_config.json), local or any fsspec URI, loaded offline (models/hf_checkpoint.py);
or `random` (RANDOM_CONFIG below, seeded). SAM 2's own `.pt` checkpoints are not read:
unlike segment-anything's (models/sam_convert.py), their Hiera encoder's layout (blocks per
stage, global-attention blocks, window sizes) cannot be read from the tensors' shapes, so a
conversion needs the model's name — transformers' convert_sam2_to_hf.py does it, to a
directory this family loads. The driver refuses a `.pt` given as `sam2` weights.
"""

from __future__ import annotations

import torch
from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor
from transformers.models.sam2.image_processing_sam2 import _build_point_grid

from .options import Sam2Options
from .sam import SamSegmenter, crop_layers, load_hf_directory, prompt_categories
from .weights import RANDOM, WeightsError, random_network

# `--weights random`: a deliberately small SAM 2 (not Hiera-tiny): a 5-block Hiera of widths
# 16-128 on 128×128 inputs (patch stride 4, 4 stages, block 3 global), a 64-channel FPN neck,
# prompt encoder and a 2-layer mask decoder of width 64 with 4 heads. Seeded, so every actor
# builds the same model.
RANDOM_CONFIG = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model", "hidden_size": 16, "image_size": [128, 128],
            "embed_dim_per_stage": [16, 32, 64, 128], "num_attention_heads_per_stage": [1, 1, 2, 2],
            "blocks_per_stage": [1, 1, 2, 1], "global_attention_blocks": [3], "window_size_per_stage": [8, 4, 4, 2],
            "window_positional_embedding_background_size": [4, 4],
        },
        "backbone_channel_list": [128, 64, 32, 16], "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
        "fpn_hidden_size": 64,
    },
    "prompt_encoder_config": {"hidden_size": 64, "image_size": 128, "patch_size": 16, "mask_input_channels": 16},
    "mask_decoder_config": {
        "hidden_size": 64, "mlp_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "iou_head_hidden_dim": 64,
    },
}  # fmt: skip


def load_sam2(
    weights: str, *, sha256: str | None = None, storage_options: dict | None = None
) -> tuple[Sam2Model, Sam2ImageProcessor | None, str | None]:
    """(network, the checkpoint's own image processor or None, weights sha256) for `weights`."""
    if weights == RANDOM:
        return random_network("sam2", lambda: Sam2Model(Sam2Config(**RANDOM_CONFIG))).eval(), None, None
    if problem := Sam2Options().problem_with_weights(weights):
        raise WeightsError(f"{weights}: {problem}")
    return load_hf_directory(Sam2Model, Sam2ImageProcessor, "sam2", weights, sha256, storage_options)


def image_processor_for(network: Sam2Model, processor: Sam2ImageProcessor | None) -> Sam2ImageProcessor:
    """SAM 2's preprocessing for `network`: the checkpoint's own processor when it has one,
    else Sam2ImageProcessor's defaults at the model's input size; either must resize to the
    model's square input, which its feature maps' sizes fix."""
    image_size = network.config.prompt_encoder_config.image_size
    if processor is None:
        processor = Sam2ImageProcessor(size={"height": image_size, "width": image_size})
    size = processor.size
    if (size["height"], size["width"]) != (image_size, image_size):
        raise WeightsError(
            f"the image processor resizes to {size['height']}x{size['width']} but the model takes {image_size}x{image_size}"
        )
    return processor


class Sam2Segmenter(SamSegmenter):
    """SAM 2 behind the model protocol: SamSegmenter with SAM 2's hooks (module docstring)."""

    name = "sam2"
    options_class = Sam2Options

    def __init__(self, network: Sam2Model, processor: Sam2ImageProcessor, options: Sam2Options | None = None, **kwargs):
        super().__init__(network, processor, options, **kwargs)
        # Sam2Processor's coordinate scaling, for points and boxes alike.
        self.prompt_processor = Sam2Processor(image_processor=processor, target_size=self.target_size)

    def _target_size(self) -> int:
        return int(self.processor.size["height"])

    def _crop_points(self, image: torch.Tensor, points: torch.Tensor, cropped: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each crop's grid in its pixels, scaled per axis to the model's input (module docstring)."""
        per_crop = []
        for layer, pixels in zip(crop_layers(self.options.crops_n_layers), cropped):
            size = tuple(pixels.shape[-2:])
            in_pixels = _build_point_grid(self._points_per_side(layer)) * torch.tensor(size).flip(0)[None]
            per_crop.append(self.prompt_processor._normalize_coordinates(self.target_size, in_pixels, size))
        return per_crop

    def _pixel_values(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        inputs = self.processor(images=pixels, input_data_format="channels_first", return_tensors="pt")
        return inputs["pixel_values"].float(), [(self.target_size, self.target_size)] * len(pixels)

    def _scale_boxes(self, boxes: torch.Tensor, size: tuple[int, int], reshaped: tuple[int, int]) -> torch.Tensor:
        return self.prompt_processor._normalize_coordinates(self.target_size, boxes, size, is_bounding_box=True)

    def _image_embeddings(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.network.get_image_embeddings(pixel_values)

    def _decoder_embeddings(self, levels: list[torch.Tensor], index: int) -> list[torch.Tensor]:
        return [level[index : index + 1] for level in levels]

    def _upscale(self, pred_masks: torch.Tensor, size: tuple[int, int], reshaped: tuple[int, int], binarize: bool) -> torch.Tensor:
        (upscaled,) = self.processor.post_process_masks(
            pred_masks, [size], mask_threshold=self.options.mask_threshold, binarize=binarize
        )
        return upscaled


def build_sam2(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> Sam2Segmenter:
    """SAM 2 from a transformers checkpoint directory (path or URI) or `random`.

    options: Sam2Options (models/options.py), segment-anything's and transformers' names and
    defaults, as `sam`'s. score_threshold: drop segments whose predicted IoU is below it
    (default keep all). Prompted mode labels masks with `categories` or `category_file`;
    automatic mode emits `object` (id 1) and refuses a model given categories.
    """
    parsed = Sam2Options.parse("sam2", options)
    network, processor, digest = load_sam2(weights, sha256=weights_sha256, storage_options=storage_options)
    return Sam2Segmenter(
        network, image_processor_for(network, processor), parsed,
        categories=prompt_categories(parsed, storage_options), device=device, score_threshold=score_threshold,
        weights=weights, weights_sha256=digest,
    )  # fmt: skip
