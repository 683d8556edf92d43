"""An image's masks, wherever the model left them, → the packed bytes that cross to encode.

On an accelerator the masks are bit-packed where they are, so 1 bit per pixel crosses to
the host instead of a byte; on the CPU numpy's packbits does it. Either way the bytes are
exactly `pipeline.masks.pack_masks`'s (each mask column-major, most significant bit first,
one stream over the image's masks), which `pipeline.masks.unpack_masks` reads.

Kept apart from pipeline/masks.py, which the encode tasks import: they must not load torch.
"""

from __future__ import annotations

import torch

from ..models.bits import pack_bits
from .masks import pack_masks


def pack_masks_on_device(masks: torch.Tensor) -> torch.Tensor:
    """bool (N, H, W) on any device → uint8 (⌈N·H·W/8⌉,) on that device, the bytes of
    `pack_masks(masks.cpu().numpy())`."""
    return pack_bits(masks.transpose(1, 2).reshape(-1))  # column-major per mask


def masks_to_wire(masks: torch.Tensor) -> bytes:
    """bool (N, H, W) masks (any device) → `pack_masks` bytes on the host; b"" for N = 0."""
    if masks.shape[0] == 0:
        return b""
    if masks.device.type == "cpu":
        return pack_masks(masks.numpy())
    return pack_masks_on_device(masks).cpu().numpy().tobytes()


def full_size_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool (N, h, w) → bool (N, H, W) for `size` = (H, W), nearest neighbour, on the masks'
    device: pixel (y, x) takes mask pixel (⌊y·h/H⌋, ⌊x·w/W⌋)."""
    rows = torch.arange(size[0], device=masks.device) * masks.shape[1] // size[0]
    cols = torch.arange(size[1], device=masks.device) * masks.shape[2] // size[1]
    return masks[:, rows[:, None], cols[None, :]]
