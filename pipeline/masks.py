"""Compact masks for crossing process boundaries: 1 bit per pixel, column-major.

Bits are laid out per mask in Fortran (column-major) order, so unpacking yields the
(H, W, N) Fortran-ordered uint8 array pycocotools' encoder takes without another copy.
"""

from __future__ import annotations

import numpy as np

# An image's masks are brought to full size, packed or encoded about this many bytes at a
# time: all of them at once, up to 64 MP × every detection, could take gigabytes.
MASK_CHUNK_BYTES = 256 * 1024 * 1024


def masks_per_chunk(height: int, width: int) -> int:
    """How many (height, width) masks make a chunk: a multiple of 8 (at least 8), so that
    chunks packed one by one join into `pack_masks`'s bit stream of them all."""
    return max(8, MASK_CHUNK_BYTES // max(1, height * width) // 8 * 8)


def pack_masks(masks: np.ndarray) -> bytes:
    """bool (N, H, W) → N·H·W bits, each mask column-major."""
    return np.packbits(np.ascontiguousarray(masks.transpose(0, 2, 1)), axis=None).tobytes()


def unpack_masks(data: bytes, count: int, height: int, width: int, first: int = 0) -> np.ndarray:
    """`pack_masks` inverse: uint8 {0, 1} (H, W, N), Fortran-ordered; N = `count` masks from
    mask `first` on (a multiple of 8, so that it starts on a byte)."""
    if first % 8:
        raise ValueError(f"masks are unpacked from a multiple of 8, not {first}")
    offset = first * height * width // 8
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=offset), count=count * height * width)
    return bits.reshape(count, width, height).transpose(2, 1, 0)
