"""Argmax, gathers and threshold counts of bilinearly upsampled channels equal upsampling
every channel with F.interpolate first (up to float rounding at exact ties)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayseg.models.upsampling import (
    count_at_least,
    source_corners,
    upsampled_argmax,
    upsampled_gather,
    upsampled_sum,
)


def smooth_channels(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Channels with regions and boundaries, like class or mask scores (not pixel noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, channels, height // 4 + 2, width // 4 + 2, generator=generator) * 3
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def resized(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


CASES = [(5, 12, 17, (40, 33)), (40, 24, 24, (97, 101)), (3, 30, 30, (20, 25)), (6, 16, 16, (16, 16)), (1, 8, 8, (20, 20))]


@pytest.mark.parametrize("channels,height,width,size", CASES)
def test_equal_to_resizing_every_channel(channels, height, width, size):
    x = smooth_channels(channels, height, width)
    full = resized(x, size)
    labels = upsampled_argmax(x, size)
    top2 = full.topk(min(2, channels), dim=0).values
    clear = (top2[0] - top2[-1]) > 1e-5 if channels > 1 else torch.ones(size, dtype=torch.bool)
    assert torch.equal(labels[clear], full.argmax(0)[clear])
    assert torch.allclose(upsampled_gather(x, labels), full.gather(0, labels[None])[0], atol=1e-5)
    assert torch.allclose(upsampled_sum(x, size), full.sum(0), atol=1e-4)
    for threshold in (-1.0, 0.0, 0.5, 2.0):
        exact = (full >= threshold).flatten(1).sum(1)
        assert (count_at_least(x, size, threshold) - exact).abs().max() <= 1  # a pixel on an exact tie


def test_source_corners_are_pytorchs_bilinear_weights():
    i0, i1, w0, w1 = source_corners(10, 4, torch.device("cpu"))
    x = torch.tensor([0.0, 10.0, 20.0, 30.0])
    expected = F.interpolate(x[None, None], size=10, mode="linear", align_corners=False)[0, 0]
    assert torch.allclose(x[i0] * w0 + x[i1] * w1, expected)
    assert (i1 >= i0).all() and i1.max() == 3 and torch.allclose(w0 + w1, torch.ones(10))


def test_a_channel_equal_to_an_earlier_one_never_wins():
    x = smooth_channels(6, 10, 10, seed=2)
    x[4] = x[1] + 10  # channel 4 wins everywhere...
    x[5] = x[4]  # ...and 5 ties with it: argmax keeps the first maximum
    assert (upsampled_argmax(x, (33, 37)) == 4).all()



def test_fragmented_maps_take_the_dense_path_with_the_same_result(monkeypatch):
    from rayseg.models import upsampling

    x = torch.randn(20, 16, 16, generator=torch.Generator().manual_seed(5))  # pixel noise: boundaries everywhere
    full = resized(x, (50, 45))
    taken = []
    for name in ("_dense_argmax", "_dense_count"):
        original = getattr(upsampling, name)
        monkeypatch.setattr(upsampling, name, lambda *a, _f=original, _n=name: taken.append(_n) or _f(*a))
    monkeypatch.setattr(upsampling, "CHUNK", 3)  # several chunks, ties across them
    labels = upsampled_argmax(x, (50, 45))
    counts = count_at_least(x, (50, 45), 0.3)
    assert taken == ["_dense_argmax", "_dense_count"]
    top2 = full.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5
    assert torch.equal(labels[clear], full.argmax(0)[clear])
    assert (counts - (full >= 0.3).flatten(1).sum(1)).abs().max() <= 1
