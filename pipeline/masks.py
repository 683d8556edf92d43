"""Compact masks for crossing process boundaries: 1 bit per pixel, column-major.

Bits are laid out per mask in Fortran (column-major) order, so unpacking yields the
(H, W, N) Fortran-ordered uint8 array pycocotools' encoder takes without another copy.
"""

from __future__ import annotations

import numpy as np


def pack_masks(masks: np.ndarray) -> bytes:
    """bool (N, H, W) → N·H·W bits, each mask column-major."""
    return np.packbits(np.ascontiguousarray(masks.transpose(0, 2, 1)), axis=None).tobytes()


def unpack_masks(data: bytes, count: int, height: int, width: int) -> np.ndarray:
    """`pack_masks` inverse: uint8 {0, 1} (H, W, N), Fortran-ordered."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * height * width)
    return bits.reshape(count, width, height).transpose(2, 1, 0)
