"""Overlay thumbnails: ground truth and prediction drawn over the image, side by side.

Only the report's handful of best and worst images are drawn: their prediction rows are
read back from their Parquet location, the ground truth from its files, the image from the
row's `uri`, shown in its own colours. An image that cannot be read is drawn on a grey
canvas instead.

Masks are drawn at the thumbnail's size, so outlines and marks keep their width whatever the
image's size. Semantic segments take their class's colour. Instance and panoptic segments
take one colour each, chosen so that touching segments get colours far apart: two touching
objects of one class are two colours (an instance model that merges them draws one), and a
prediction matched to a ground-truth segment takes its colour. For instance tasks the match
is the evaluation's own (IoU 0.5), which also outlines a false positive red and white and a
missed ground truth yellow and black, in both panels (in the prediction's as an outline
only, where it was). Panoptic colours pair segments of one class at IoU > 0.5
(panopticapi's criterion, unique), for the colours only.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..coco_masks import annotation_mask
from ..decode import decode_image
from ..run_reader import Prediction
from ..storage import filesystem
from .data import InstanceImage, PanopticImage, SemanticImage

log = logging.getLogger("rayseg")

# Distinct, colour-blind-friendlier hues (Tableau 10 + extra); ids beyond cycle with a shift.
PALETTE = [
    (78, 121, 167), (242, 142, 43), (225, 87, 89), (118, 183, 178), (89, 161, 79),
    (237, 201, 72), (176, 122, 161), (255, 157, 167), (156, 117, 95), (186, 176, 172),
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
# One colour per instance: saturated, none red or yellow (the marks' colours), no grey.
INSTANCE_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (23, 190, 207), (227, 119, 194),
    (140, 86, 75), (188, 189, 34), (57, 59, 121), (0, 128, 128), (152, 223, 138), (255, 152, 150),
]  # fmt: skip
# (dash, gap) colours of the marks: each pair stands out on light and dark images alike.
FALSE_POSITIVE_MARK = ((228, 26, 28), (255, 255, 255))
MISSED_MARK = ((255, 221, 0), (0, 0, 0))
THUMBNAIL_SIDE = 256
ALPHA = 0.45
# Segments this close (thumbnail pixels) are neighbours for colouring: at 256 px a 1-2 px gap
# between two objects is not seen as one.
NEIGHBOUR_GAP = 2
MARK_WIDTH = 2
DASH = 4


def category_color(category_id: int) -> tuple[int, int, int]:
    base = PALETTE[category_id % len(PALETTE)]
    if category_id < len(PALETTE):
        return base
    shift = (category_id // len(PALETTE)) * 37
    return tuple(int((c + shift) % 256) for c in base)


def read_image(uri: str | None, storage_options: dict | None = None) -> np.ndarray | None:
    """The image at `uri` as RGB uint8, or None when there is none or it cannot be read:
    decoded as the run decoded it (EXIF orientation, 16-bit), so its masks fit it."""
    if not uri:
        return None
    try:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            return decode_image(f.read())
    except Exception as e:  # noqa: BLE001 - a thumbnail is never worth failing a report
        log.debug("thumbnail image %s unreadable: %s", uri, e)
        return None


# --- geometry ---------------------------------------------------------------------------------


def thumbnail_size(height: int, width: int, side: int = THUMBNAIL_SIDE) -> tuple[int, int]:
    """(height, width) of the thumbnail of an image, its longer side `side`."""
    factor = side / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


class _Sampler:
    """Nearest-neighbour resampling of full-size masks to the thumbnail's size."""

    def __init__(self, height: int, width: int, size: tuple[int, int]) -> None:
        th, tw = size
        self.size = size
        self.rows = np.minimum(((np.arange(th) + 0.5) * height / th).astype(np.int64), height - 1)
        self.cols = np.minimum(((np.arange(tw) + 0.5) * width / tw).astype(np.int64), width - 1)

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        return mask[np.ix_(self.rows, self.cols)]


def _canvas(image: np.ndarray | None, height: int, width: int, size: tuple[int, int]) -> np.ndarray:
    """The image in its own colours at the thumbnail's size; grey when it is not the GT's size."""
    if image is None or image.shape[:2] != (height, width):
        return np.full((*size, 3), 110, dtype=np.uint8)
    resample = Image.NEAREST if size[0] >= height else Image.LANCZOS
    return np.asarray(Image.fromarray(image[..., :3]).resize((size[1], size[0]), resample))


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _edge(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's inner boundary band, `width` pixels wide."""
    inner = mask
    for _ in range(width):
        inner = _erode(inner)
    return mask & ~inner


# --- colours ----------------------------------------------------------------------------------


def _distance(a, b) -> float:
    """'Redmean' RGB distance: a cheap approximation of how different two colours look."""
    r = (a[0] + b[0]) / 2
    dr, dg, db = (float(a[i]) - float(b[i]) for i in range(3))
    return ((2 + r / 256) * dr * dr + 4 * dg * dg + (2 + (255 - r) / 256) * db * db) ** 0.5


_PALETTE_DISTANCE = np.array([[_distance(a, b) for b in INSTANCE_PALETTE] for a in INSTANCE_PALETTE])


def neighbours(masks: list[np.ndarray], gap: int = NEIGHBOUR_GAP) -> set[tuple[int, int]]:
    """Pairs (i < j) of masks that overlap or come within `gap` pixels of each other."""
    boxes = []
    for mask in masks:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        boxes.append((rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) if len(rows) else None)
    grown: dict[int, np.ndarray] = {}
    pairs = set()
    # Only masks whose boxes, grown by `gap`, meet are compared, and only where they meet.
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(masks)):
            b = boxes[j]
            if a is None or b is None:
                continue
            y0, y1 = max(a[0], b[0] - gap), min(a[1], b[1] + gap)
            x0, x1 = max(a[2], b[2] - gap), min(a[3], b[3] + gap)
            if y0 >= y1 or x0 >= x1:
                continue
            if i not in grown:
                grown[i] = masks[i]
                for _ in range(gap):
                    grown[i] = _dilate(grown[i])
            ys, xs = slice(max(0, y0 - gap), y1 + gap), slice(max(0, x0 - gap), x1 + gap)
            if (grown[i][ys, xs] & masks[j][ys, xs]).any():
                pairs.add((i, j))
    return pairs


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def instance_colors(count: int, edges: set[tuple[int, int]], fixed: dict[int, int] | None = None) -> list[int]:
    """A palette index per node: neighbours (edges) get colours as far apart as the palette
    allows, ties to the colour used least so far; `fixed` nodes keep theirs."""
    colors = dict(fixed or {})
    adjacent: list[list[int]] = [[] for _ in range(count)]
    for i, j in edges:
        adjacent[i].append(j)
        adjacent[j].append(i)
    used = np.zeros(len(INSTANCE_PALETTE), dtype=np.int64)
    for color in colors.values():
        used[color] += 1
    for node in range(count):
        if node in colors:
            continue
        taken = [colors[n] for n in adjacent[node] if n in colors]
        closeness = _PALETTE_DISTANCE[:, taken].min(axis=1) if taken else np.full(len(INSTANCE_PALETTE), np.inf)
        best = min(range(len(INSTANCE_PALETTE)), key=lambda c: (-closeness[c], used[c], c))
        colors[node] = best
        used[best] += 1
    return [colors[node] for node in range(count)]


# --- drawing ----------------------------------------------------------------------------------


def draw(
    canvas: np.ndarray,
    fills: list[tuple[np.ndarray, tuple[int, int, int]]],
    marks: list[tuple[np.ndarray, tuple[tuple[int, int, int], tuple[int, int, int]]]] = (),
    alpha: float = ALPHA,
) -> np.ndarray:
    """Masks blended over the canvas, each with a solid outline; then the marks on top: the
    masks' boundaries dashed in (dash, gap) colours."""
    out = canvas.astype(np.float32).copy()
    for mask, color in fills:
        if mask.any():
            out[mask] = out[mask] * (1 - alpha) + np.array(color, dtype=np.float32) * alpha
    for mask, color in fills:
        out[_edge(mask)] = color
    if marks:
        height, width = canvas.shape[:2]
        y, x = np.mgrid[0:height, 0:width]
        dash = ((y + x) // DASH) % 2 == 0
        for mask, (on, off) in marks:
            band = _edge(mask, MARK_WIDTH)
            out[band & dash] = on
            out[band & ~dash] = off
    return np.clip(out, 0, 255).astype(np.uint8)


def _drawn_rows(prediction: Prediction, task: str, score_threshold: float, limit: int = 100) -> list[int]:
    """The prediction's rows to draw, lowest score first (the best is drawn on top): for
    instance tasks those scoring ≥ threshold, the best `limit`."""
    if not prediction.ok or not len(prediction):
        return []
    order = np.argsort(-prediction.score, kind="stable").tolist()
    if task == "instance":
        order = [i for i in order if prediction.score[i] >= score_threshold][:limit]
    return order[::-1]


def shared_colors(gt_masks: list[np.ndarray], pred_masks: list[np.ndarray], partner: list[int]) -> tuple[list[int], list[int]]:
    """Palette indices of both panels: a prediction with a partner (its matched ground truth's
    index, else < 0) takes that one's colour; the ground truth's colouring keeps apart objects
    that touch or whose predictions touch, the rest of the predictions their neighbours."""
    pred_edges = neighbours(pred_masks)
    gt_edges = neighbours(gt_masks) | {
        (min(partner[p], partner[q]), max(partner[p], partner[q]))
        for p, q in pred_edges
        if partner[p] >= 0 and partner[q] >= 0 and partner[p] != partner[q]
    }
    gt_colors = instance_colors(len(gt_masks), gt_edges)
    fixed = {p: gt_colors[partner[p]] for p in range(len(pred_masks)) if partner[p] >= 0}
    return gt_colors, instance_colors(len(pred_masks), pred_edges, fixed)


def _panoptic_partners(ids: np.ndarray, segments_info: list[dict], prediction: Prediction, rows: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """For colours only: per drawn row, the ground-truth segment (index into segments_info)
    of its class it overlaps with IoU > 0.5 (panopticapi's criterion: at most one), else -1;
    and the rows' full-size masks."""
    labels, counts = np.unique(ids, return_counts=True)
    area = dict(zip(labels.tolist(), counts.tolist()))
    position = {int(s["id"]): k for k, s in enumerate(segments_info)}
    partners, masks = [], []
    for i in rows:
        mask = mask_utils.decode(prediction.rle_dict(i)).astype(bool)
        masks.append(mask)
        partner = -1
        inside, overlap = np.unique(ids[mask], return_counts=True)
        for label, intersection in zip(inside.tolist(), overlap.tolist()):
            k = position.get(label)
            if k is None or segments_info[k]["category_id"] != int(prediction.category_id[i]):
                continue
            if intersection / (int(mask.sum()) + area[label] - intersection) > 0.5:
                partner = k
        partners.append(partner)
    return partners, masks


def _instance_panels(gt: InstanceImage, prediction: Prediction | None, canvas: np.ndarray, sample: _Sampler, rows: list[int], matches):
    from .instance import UNMATCHED

    gt_masks = [sample(annotation_mask(a, gt.height, gt.width)) for a in gt.annotations]
    pred_masks = [sample(mask_utils.decode(prediction.rle_dict(i)).astype(bool)) for i in rows] if prediction is not None else []
    partner = [int(matches.detections[i]) if matches is not None else UNMATCHED for i in rows]
    gt_colors, pred_colors = shared_colors(gt_masks, pred_masks, partner)
    missed = [m for k, m in enumerate(gt_masks) if matches is not None and matches.ground_truths[k] == UNMATCHED]
    false_positives = [pred_masks[p] for p in range(len(rows)) if matches is not None and partner[p] == UNMATCHED]
    gt_panel = draw(
        canvas, [(m, INSTANCE_PALETTE[c]) for m, c in zip(gt_masks, gt_colors)], [(m, MISSED_MARK) for m in missed]
    )
    pred_panel = draw(
        canvas,
        [(m, INSTANCE_PALETTE[c]) for m, c in zip(pred_masks, pred_colors)],
        [(m, FALSE_POSITIVE_MARK) for m in false_positives] + [(m, MISSED_MARK) for m in missed],
    )
    return gt_panel, pred_panel


def render_pair(
    task: str,
    gt,
    prediction: Prediction,
    *,
    storage_options: dict | None = None,
    score_threshold: float = 0.5,
    ignore_labels=frozenset(),
    matches=None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ground-truth panel, prediction panel, image was readable), at the thumbnail's size.

    matches: the instance evaluator's `match_image` of this pair, for the marks and shared
    colours (module docstring); without it instance thumbnails are drawn unmarked.
    """
    if task == "instance":
        assert isinstance(gt, InstanceImage)
        height, width = gt.height, gt.width
    elif task == "semantic":
        from .semantic import read_label_png

        assert isinstance(gt, SemanticImage)
        label = read_label_png(gt.png, storage_options)
        height, width = label.shape
    else:
        from .panoptic import read_panoptic_png

        assert isinstance(gt, PanopticImage)
        ids = read_panoptic_png(gt.png, storage_options)
        height, width = ids.shape
    size = thumbnail_size(height, width)
    sample = _Sampler(height, width, size)
    image = read_image(prediction.uri, storage_options)
    canvas = _canvas(image, height, width, size)
    readable = image is not None and image.shape[:2] == (height, width)
    same_size = (prediction.height, prediction.width) == (height, width)
    rows = _drawn_rows(prediction, task, score_threshold) if same_size else []
    if task == "instance":
        gt_panel, pred_panel = _instance_panels(gt, prediction if same_size else None, canvas, sample, rows, matches)
        return gt_panel, pred_panel, readable
    if task == "semantic":
        pred_masks = [sample(mask_utils.decode(prediction.rle_dict(i)).astype(bool)) for i in rows]
        values = [v for v in np.unique(label).tolist() if v not in ignore_labels]
        gt_fills = [(sample(label == v), category_color(int(v))) for v in values]
        pred_fills = [(m, category_color(int(prediction.category_id[i]))) for m, i in zip(pred_masks, rows)]
        return draw(canvas, gt_fills), draw(canvas, pred_fills), readable
    partners, full_masks = _panoptic_partners(ids, gt.segments_info, prediction, rows)
    gt_masks = [sample(ids == s["id"]) for s in gt.segments_info]
    pred_masks = [sample(m) for m in full_masks]
    gt_colors, pred_colors = shared_colors(gt_masks, pred_masks, partners)
    return (
        draw(canvas, [(m, INSTANCE_PALETTE[c]) for m, c in zip(gt_masks, gt_colors)]),
        draw(canvas, [(m, INSTANCE_PALETTE[c]) for m, c in zip(pred_masks, pred_colors)]),
        readable,
    )


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
