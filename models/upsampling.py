"""Argmax and threshold counts of bilinearly upsampled channels, without upsampling them all.

Post-processing a mask-classification model (MaskFormer family) at the image's size takes,
per pixel, the argmax over C channels (classes or queries) of their bilinear upsampling, and
per channel the number of pixels whose upsampled value passes a threshold. Done directly
that is C full-size channels (133 × 1024 × 1024 floats for COCO panoptic). But a bilinear
output pixel is a convex combination of its four source pixels ("corners"), with the same
weights for every channel, so:

- where one channel is the argmax at all four corners, it is the argmax of the pixel;
- where a channel is ≥ t at all four corners the pixel passes, at none it fails.

Output pixels with the same four corners form a cell (a run of output rows × a run of
output columns). Cells are decided at the source resolution; only the pixels of the other
cells — a band along the low-resolution boundaries — are interpolated. Results equal
`F.interpolate(..., mode="bilinear", align_corners=False)` followed by argmax / `>= t` up to
float rounding at exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Boundary pixels × channels interpolated at a time (bounds the temporary (C, P) tensor).
BLOCK = 1 << 22
# Past this fraction of the output in boundary cells (fragmented, noisy maps), resizing every
# channel densely, CHUNK channels at a time, is the cheaper way to the same result.
DENSE_FRACTION = 0.25
CHUNK = 16


def source_corners(output: int, input: int, device: torch.device):
    """Per output index along one axis: the two source indices and their weights, as
    PyTorch's bilinear upsampling (align_corners=False) computes them.

    Returns (i0, i1) int64 and (w0, w1) float32, each of length `output`.
    """
    scale = input / output
    source = ((torch.arange(output, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = source.floor().long().clamp_max(input - 1)
    i1 = torch.where(i0 < input - 1, i0 + 1, i0)
    w1 = source - i0
    return i0, i1, 1 - w1, w1


@dataclass
class _Axis:
    """One axis of a resize: per output index its corners and weights, and the runs of
    output indices sharing both corners (start, length, and the runs' corners)."""

    i0: torch.Tensor
    i1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    run0: torch.Tensor
    run1: torch.Tensor

    @classmethod
    def of(cls, output: int, input: int, device: torch.device) -> _Axis:
        i0, i1, w0, w1 = source_corners(output, input, device)
        change = torch.ones(output, dtype=torch.bool, device=device)
        change[1:] = (i0[1:] != i0[:-1]) | (i1[1:] != i1[:-1])
        starts = change.nonzero()[:, 0]
        lengths = torch.diff(starts, append=torch.tensor([output], device=device))
        return cls(i0, i1, w0, w1, starts, lengths, i0[starts], i1[starts])

    def pixels(self, runs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.starts[runs] + offsets


def _mixed_pixels(rows: _Axis, cols: _Axis, row_runs: torch.Tensor, col_runs: torch.Tensor):
    """Every output pixel of the cells (row_runs[i], col_runs[i]): (cell index, row, col)."""
    dy = torch.arange(int(rows.lengths.max()), device=row_runs.device)
    dx = torch.arange(int(cols.lengths.max()), device=row_runs.device)
    inside = (dy[None, :, None] < rows.lengths[row_runs][:, None, None]) & (dx[None, None, :] < cols.lengths[col_runs][:, None, None])
    cell, oy, ox = inside.nonzero(as_tuple=True)
    return cell, rows.pixels(row_runs[cell], oy), cols.pixels(col_runs[cell], ox)


def _interpolate(x: torch.Tensor, rows: _Axis, cols: _Axis, r: torch.Tensor, c: torch.Tensor, channels=None) -> torch.Tensor:
    """x (C, h, w) interpolated at output pixels (r, c): (C, P), or (P,) at `channels` (P,)."""
    y0, y1, wy0, wy1 = rows.i0[r], rows.i1[r], rows.w0[r], rows.w1[r]
    x0, x1, wx0, wx1 = cols.i0[c], cols.i1[c], cols.w0[c], cols.w1[c]
    k = slice(None) if channels is None else channels
    top = x[k, y0, x0] * wx0 + x[k, y0, x1] * wx1
    bottom = x[k, y1, x0] * wx0 + x[k, y1, x1] * wx1
    return top * wy0 + bottom * wy1


def _corners(low: torch.Tensor, rows: _Axis, cols: _Axis):
    """A (..., h, w) tensor at each cell's four corners: four (..., R, K) tensors."""
    top, bottom = low.index_select(-2, rows.run0), low.index_select(-2, rows.run1)
    return (
        top.index_select(-1, cols.run0), top.index_select(-1, cols.run1),
        bottom.index_select(-1, cols.run0), bottom.index_select(-1, cols.run1),
    )  # fmt: skip


def upsampled_argmax(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """argmax over channels of x (C, h, w) bilinearly resized to `size` → (H, W) int64."""
    height, width = size
    if tuple(x.shape[-2:]) == (height, width):
        return x.argmax(0)
    rows, cols = _Axis.of(height, x.shape[1], x.device), _Axis.of(width, x.shape[2], x.device)
    a, b, c, d = _corners(x.argmax(0), rows, cols)
    mixed = (a != b) | (a != c) | (a != d)
    row_runs, col_runs = mixed.nonzero(as_tuple=True)
    if (rows.lengths[row_runs] * cols.lengths[col_runs]).sum() > DENSE_FRACTION * height * width:
        return _dense_argmax(x, size)
    labels = a.repeat_interleave(rows.lengths, 0).repeat_interleave(cols.lengths, 1)
    if len(row_runs):
        _, r, c = _mixed_pixels(rows, cols, row_runs, col_runs)
        step = max(1, BLOCK // max(1, x.shape[0]))
        for start in range(0, len(r), step):
            part_r, part_c = r[start : start + step], c[start : start + step]
            labels[part_r, part_c] = _interpolate(x, rows, cols, part_r, part_c).argmax(0)
    return labels


def upsampled_gather(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x (C, h, w) bilinearly resized to labels' (H, W), read at channel labels[p] per pixel."""
    height, width = labels.shape
    if tuple(x.shape[-2:]) == (height, width):
        return x.gather(0, labels[None])[0]
    rows, cols = _Axis.of(height, x.shape[1], x.device), _Axis.of(width, x.shape[2], x.device)
    y0, y1, wy0, wy1 = (t[:, None] for t in (rows.i0, rows.i1, rows.w0, rows.w1))
    x0, x1, wx0, wx1 = (t[None, :] for t in (cols.i0, cols.i1, cols.w0, cols.w1))
    top = x[labels, y0, x0] * wx0 + x[labels, y0, x1] * wx1
    bottom = x[labels, y1, x0] * wx0 + x[labels, y1, x1] * wx1
    return top * wy0 + bottom * wy1


def count_at_least(x: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Per channel of x (C, h, w) bilinearly resized to `size`: pixels ≥ threshold → (C,) int64.

    A cell whose corners all pass counts whole, one whose corners all fail not at all; the
    pixels of the others are interpolated.
    """
    height, width = size
    if tuple(x.shape[-2:]) == (height, width):
        return (x >= threshold).flatten(1).sum(1)
    rows, cols = _Axis.of(height, x.shape[1], x.device), _Axis.of(width, x.shape[2], x.device)
    a, b, c, d = _corners(x >= threshold, rows, cols)
    passing, failing = a & b & c & d, ~(a | b | c | d)
    cell_sizes = (rows.lengths[:, None] * cols.lengths[None, :]).flatten().double()
    counts = (passing.flatten(1).double() @ cell_sizes).round().long()
    channel, row_runs, col_runs = (~(passing | failing)).nonzero(as_tuple=True)
    if (rows.lengths[row_runs] * cols.lengths[col_runs]).sum() > DENSE_FRACTION * x.shape[0] * height * width:
        return _dense_count(x, size, threshold)
    if len(channel):
        cell, r, c = _mixed_pixels(rows, cols, row_runs, col_runs)
        channels = channel[cell]
        passed = _interpolate(x, rows, cols, r, c, channels) >= threshold
        counts += torch.bincount(channels[passed], minlength=x.shape[0])
    return counts


def _resized_chunks(x: torch.Tensor, size: tuple[int, int]):
    for start in range(0, x.shape[0], CHUNK):
        yield start, F.interpolate(x[None, start : start + CHUNK], size=size, mode="bilinear", align_corners=False)[0]


def _dense_argmax(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    best = labels = None
    for start, chunk in _resized_chunks(x, size):
        value, index = chunk.max(0)
        if best is None:
            best, labels = value, index
        else:
            better = value > best  # ties keep the earlier channel, as argmax does
            best, labels = torch.where(better, value, best), torch.where(better, index + start, labels)
    return labels


def _dense_count(x: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    return torch.cat([(chunk >= threshold).flatten(1).sum(1) for _, chunk in _resized_chunks(x, size)])


def upsampled_sum(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sum over channels of x (C, h, w) resized to `size`: by linearity, the resized sum (H, W)."""
    total = x.sum(0)
    if tuple(total.shape) == tuple(size):
        return total
    return F.interpolate(total[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
