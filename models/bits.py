"""Bit-packing on any torch device: 8 pixels per byte, most significant bit first — numpy's
`packbits` order, so bytes packed on an accelerator equal those numpy packs on the host."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (..., n) → uint8 (..., ⌈n/8⌉) on the bits' device, the last one zero-padded."""
    flat = bits.to(torch.uint8)
    padding = (-flat.shape[-1]) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros((*flat.shape[:-1], padding))], dim=-1)
    grouped = flat.view(*flat.shape[:-1], flat.shape[-1] // 8, 8)
    return (grouped << _SHIFTS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 (..., ⌈n/8⌉) → bool (..., n) for n = `count`."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :count].bool()
