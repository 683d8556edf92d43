"""segment-anything `.pth` checkpoints → transformers' `SamModel` layout and config.

The official checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth)
are plain state dicts of segment-anything's `Sam` module. transformers converts them with
`src/transformers/models/sam/convert_sam_to_hf.py` (`KEYS_TO_MODIFY_MAPPING`,
`replace_keys`, `get_config`); that script is not installed with the package and imports
httpx and huggingface_hub at module level, so its mapping is reimplemented here:

- the same ordered substring renames (`image_encoder` → `vision_encoder`, `blocks` →
  `layers`, `.norm` → `.layer_norm`, `neck.0..3`, `patch_embed.proj`, the prompt encoder's
  `mask_downscaling.*`, `point_embeddings`, `pe_layer...`, the mask decoder's
  `output_upscaling.*`);
- segment-anything's `MLP(layers.0 … layers.N-1)` (the IoU head and the hypernetwork MLPs)
  → transformers' `proj_in`, `layers.0 … layers.N-3`, `proj_out` — generalised from the
  script's fixed depth 3 to any depth;
- `pixel_mean`/`pixel_std` dropped (transformers' image processor normalises), and the
  positional embedding's matrix shared with `shared_image_embedding`.

The config is read from the tensors' shapes, so any ViT size loads — the published
vit_b/vit_l/vit_h and tiny test checkpoints alike (see `infer_config`).
"""

from __future__ import annotations

import re

import torch
from transformers import SamConfig

from .weights import WeightsError

# Published image-encoder configurations (convert_sam_to_hf.get_config; segment-anything's
# build_sam.py): hidden size, depth, heads, global-attention blocks. Image size 1024, patch 16,
# window 14, neck 256 channels for all three.
MODEL_TYPES: dict[str, dict] = {
    "vit_b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "vit_l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "global_attn_indexes": [7, 15, 23, 31]},
}

# segment-anything's TwoWayTransformer always has 8 heads (build_sam.py); the shapes do not
# say it (the attention projections do not depend on the head count).
DECODER_HEADS = 8

# convert_sam_to_hf.KEYS_TO_MODIFY_MAPPING, in its order (each rule is a substring replace).
KEYS_TO_MODIFY = (
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)

# The mask decoder's MLPs: segment-anything numbers all their linear layers `layers.i`.
_MLP = re.compile(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.layers\.(\d+)\.(.+)$")

_POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"
_SHARED_POSITIONAL = "shared_image_embedding.positional_embedding"


def is_segment_anything(state: dict[str, torch.Tensor]) -> bool:
    return "image_encoder.patch_embed.proj.weight" in state and "mask_decoder.iou_token.weight" in state


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """segment-anything `Sam.state_dict()` keys → transformers `SamModel.state_dict()` keys."""
    depths: dict[str, int] = {}
    for key in state:
        if match := _MLP.match(key):
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        if match := _MLP.match(key):
            index, last = int(match[2]), depths[match[1]] - 1
            layer = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            key = f"{match[1]}.{layer}.{match[3]}"
        else:
            for old, new in KEYS_TO_MODIFY:
                key = key.replace(old, new)
        converted[key] = value
    if _POSITIONAL in converted:
        converted[_SHARED_POSITIONAL] = converted[_POSITIONAL]
    return converted


def _count(state: dict, prefix: str) -> int:
    """Number of consecutive numbered children `prefix.N.` in the state dict."""
    indices = {int(m[1]) for key in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _shape(state: dict, key: str, weights: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"{weights} is not a segment-anything checkpoint: it has no {key!r}")
    return tuple(state[key].shape)


def infer_config(
    state: dict[str, torch.Tensor], weights: str = "", *, model_type: str | None = None, vit_num_heads: int | None = None
) -> SamConfig:
    """The SamConfig a segment-anything state dict was built with, read from tensor shapes.

    Image encoder: hidden size and patch size from the patch embedding, image size from the
    absolute position embedding (tokens per side × patch), depth from the blocks, MLP width
    from lin1, heads from the relative-position tables (head dim = their width), and which
    blocks attend globally from those tables' length (2·side − 1 for the whole token grid,
    2·window − 1 for windowed blocks). Prompt encoder and mask decoder: widths, depths and
    output counts from their tensors; the decoder's heads are segment-anything's 8.

    model_type ("vit_b", "vit_l", "vit_h") fixes the image encoder to the published
    configuration instead (a mismatching file then fails to load, naming the tensors);
    vit_num_heads gives the encoder's heads for a checkpoint without relative positions.
    """
    if model_type is not None and model_type not in MODEL_TYPES:
        raise WeightsError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    hidden, _, patch, _ = _shape(state, "image_encoder.patch_embed.proj.weight", weights)
    if "image_encoder.pos_embed" in state:
        side = _shape(state, "image_encoder.pos_embed", weights)[1]
        image_size = side * patch
    else:
        image_size = 1024
        side = image_size // patch
    depth = _count(state, "image_encoder.blocks")
    if depth == 0:
        raise WeightsError(f"{weights} is not a segment-anything checkpoint: its image encoder has no blocks")
    vision = {
        "hidden_size": hidden,
        "patch_size": patch,
        "image_size": image_size,
        "num_hidden_layers": depth,
        "mlp_dim": _shape(state, "image_encoder.blocks.0.mlp.lin1.weight", weights)[0],
        "output_channels": _shape(state, "image_encoder.neck.0.weight", weights)[0],
        "num_pos_feats": _shape(state, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", weights)[1],
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state,
        "use_abs_pos": "image_encoder.pos_embed" in state,
        "use_rel_pos": "image_encoder.blocks.0.attn.rel_pos_h" in state,
    }
    if vision["use_rel_pos"]:
        sizes = [(_shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", weights)[0] + 1) // 2 for i in range(depth)]
        head_dim = _shape(state, "image_encoder.blocks.0.attn.rel_pos_h", weights)[1]
        if hidden % head_dim:
            raise WeightsError(f"{weights}: relative position width {head_dim} does not divide hidden size {hidden}")
        windows = {size for size in sizes if size != side}
        if len(windows) > 1:
            raise WeightsError(f"{weights}: blocks use several window sizes {sorted(windows)}; SAM has one")
        vision["num_attention_heads"] = hidden // head_dim
        # A window as large as the token grid is global attention under another name.
        vision["window_size"] = windows.pop() if windows else 14
        vision["global_attn_indexes"] = [i for i, size in enumerate(sizes) if size == side]
    elif vit_num_heads is not None:
        vision["num_attention_heads"] = vit_num_heads
    elif model_type is None:
        raise WeightsError(
            f"{weights} has no relative position tables, so its attention heads cannot be read from it; "
            "give model_type (vit_b, vit_l, vit_h) or vit_num_heads"
        )
    if vit_num_heads is not None:
        vision["num_attention_heads"] = vit_num_heads
    if model_type is not None:
        vision.update(MODEL_TYPES[model_type], image_size=1024, patch_size=16, window_size=14, output_channels=256)
        vision.pop("mlp_dim")
    prompt_hidden = _shape(state, "prompt_encoder.no_mask_embed.weight", weights)[1]
    prompt = {
        "hidden_size": prompt_hidden,
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "mask_input_channels": _shape(state, "prompt_encoder.mask_downscaling.3.weight", weights)[0],
        "num_point_embeddings": _count(state, "prompt_encoder.point_embeddings"),
    }
    decoder_hidden = _shape(state, "mask_decoder.iou_token.weight", weights)[1]
    cross_width = _shape(state, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", weights)[0]
    decoder = {
        "hidden_size": decoder_hidden,
        "mlp_dim": _shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", weights)[0],
        "num_hidden_layers": _count(state, "mask_decoder.transformer.layers"),
        "num_attention_heads": DECODER_HEADS,
        "attention_downsample_rate": decoder_hidden // cross_width,
        "num_multimask_outputs": _shape(state, "mask_decoder.mask_tokens.weight", weights)[0] - 1,
        "iou_head_depth": _count(state, "mask_decoder.iou_prediction_head.layers"),
        "iou_head_hidden_dim": _shape(state, "mask_decoder.iou_prediction_head.layers.0.weight", weights)[0],
    }
    try:
        return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{weights}: cannot build a SAM config from its tensors: {e}") from e
