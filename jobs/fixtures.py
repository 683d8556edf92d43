"""Deterministic synthetic "shapes" dataset: images plus exact COCO ground truth.

Each image shows 1-5 circles, squares and triangles (categories from `SHAPES`) on a
noisy gradient background. Masks are drawn on the pixel grid without anti-aliasing, so
every pixel belongs to exactly one segment, and the image is painted from those masks:
the image, the COCO instances json, the semantic label PNGs and the COCO panoptic
annotations all describe the same partition of the image.

Layout written under `root`::

    images/{i:06d}.png                 RGB uint8
    annotations/instances.json         COCO instances, compressed RLE, thing categories only
    annotations/semantic/{i:06d}.png   "L" uint8, pixel = category id (0 = unlabelled, unused)
    annotations/panoptic.json          COCO panoptic, all categories with `isthing`
    annotations/panoptic/{i:06d}.png   RGB, segment id = R + 256 * G + 256**2 * B
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from rayseg.models.categories import SHAPES, Category

# Visible parts smaller than this are not drawn at all, so no annotation is a sliver.
MIN_VISIBLE_AREA = 20
MIN_SIDE = 16
MAX_SHAPES = 5
# Shape extent (circle diameter, square side, triangle circumdiameter) as a fraction of
# the image's shorter side.
SIZE_RANGE = (0.08, 0.40)
# Fill colours are at least this far (L1 over RGB) from the background base colour; the
# background gradient and noise stay well below it, so shapes are clearly visible.
MIN_COLOUR_DISTANCE = 100
GRADIENT_AMPLITUDE = 12.0
NOISE_SIGMA = 3.0
# Re-sampling a whole image when every shape fell below MIN_VISIBLE_AREA (only plausible
# on tiny images); bounded so generation always terminates.
MAX_ATTEMPTS = 50

_THINGS: list[Category] = [c for c in SHAPES if c.isthing]
_BACKGROUND: Category = next(c for c in SHAPES if not c.isthing)
_CATEGORY_ID = {c.name: c.id for c in SHAPES}
_FIXTURE_PNG = re.compile(r"^(\d{6})\.png$")


@dataclass(frozen=True)
class FixtureSet:
    """Paths of a generated fixture set (see the module docstring for the formats)."""

    root: Path
    images_dir: Path
    instances_json: Path
    semantic_dir: Path
    panoptic_json: Path
    panoptic_dir: Path


@dataclass(frozen=True)
class _Shape:
    """One shape to draw: `kind` is a thing category name; geometry is in pixel units.

    `center` is (x, y); `size` is the extent; `vertices` (3x2, x/y) only for triangles.
    """

    kind: str
    center: tuple[float, float]
    size: float
    colour: tuple[int, int, int]
    vertices: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class _Rendered:
    """One generated image and its ground truth.

    image: (H, W, 3) uint8. semantic: (H, W) uint8 category ids.
    instances: (category_id, visible mask (H, W) bool) in drawing order.
    """

    image: np.ndarray
    semantic: np.ndarray
    instances: list[tuple[int, np.ndarray]]


def make_fixtures(
    root: str | Path,
    *,
    images: int = 20,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> FixtureSet:
    """Write `images` synthetic images of `size` (height, width) and their annotations.

    Image i depends only on (seed, i): a smaller set is a prefix of a larger one.
    Stale fixture PNGs with index >= `images` from an earlier, larger run are removed.
    """
    height, width = _validate(images, size, seed)
    root = Path(root)
    fixtures = FixtureSet(
        root=root,
        images_dir=root / "images",
        instances_json=root / "annotations" / "instances.json",
        semantic_dir=root / "annotations" / "semantic",
        panoptic_json=root / "annotations" / "panoptic.json",
        panoptic_dir=root / "annotations" / "panoptic",
    )
    for directory in (fixtures.images_dir, fixtures.semantic_dir, fixtures.panoptic_dir):
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_pngs(directory, images)

    image_entries, instance_annotations, panoptic_annotations = [], [], []
    for index in range(images):
        rendered = _render(seed, index, height, width)
        file_name = f"{index:06d}.png"
        image_id = index + 1
        _write_png(fixtures.images_dir / file_name, rendered.image)
        _write_png(fixtures.semantic_dir / file_name, rendered.semantic)
        image_entries.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        first_id = len(instance_annotations) + 1
        instance_annotations.extend(_instance_annotations(rendered, image_id, first_id))
        panoptic_png, segments_info = _panoptic(rendered)
        _write_png(fixtures.panoptic_dir / file_name, panoptic_png)
        panoptic_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments_info})

    info = {
        "description": "rayseg synthetic shapes fixtures",
        "version": "1.0",
        "seed": seed,
        "size": [height, width],
    }
    _write_json(
        fixtures.instances_json,
        {
            "info": info,
            "licenses": [],
            "images": image_entries,
            "annotations": instance_annotations,
            "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in _THINGS],
        },
    )
    _write_json(
        fixtures.panoptic_json,
        {
            "info": info,
            "licenses": [],
            "images": image_entries,
            "annotations": panoptic_annotations,
            "categories": [
                {
                    "id": c.id,
                    "name": c.name,
                    "supercategory": "shape" if c.isthing else "stuff",
                    "isthing": int(c.isthing),
                }
                for c in SHAPES
            ],
        },
    )
    return fixtures


def _validate(images: int, size: tuple[int, int], seed: int) -> tuple[int, int]:
    """Check arguments; returns (height, width)."""
    if isinstance(images, bool) or not isinstance(images, (int, np.integer)) or images < 1:
        raise ValueError(f"images must be an integer >= 1, got {images!r}")
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be a (height, width) pair, got {size!r}")
    height, width = size
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < MIN_SIDE:
            raise ValueError(f"size {name} must be an integer >= {MIN_SIDE}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(height), int(width)


def _render(seed: int, index: int, height: int, width: int) -> _Rendered:
    """Generate image `index` of the set with `seed`; depends only on (seed, index)."""
    rng = np.random.default_rng([seed, index])
    base = rng.integers(40, 216, size=3)
    gradient = _background_gradient(rng, height, width)

    for _ in range(MAX_ATTEMPTS):
        shapes = _sample_shapes(rng, height, width, base)
        kept, visible = _drop_small(shapes, height, width)
        if kept:
            break

    semantic = np.full((height, width), _BACKGROUND.id, dtype=np.uint8)
    canvas = base[None, None, :] + gradient[:, :, None]
    for shape, mask in zip(kept, visible):
        semantic[mask] = _CATEGORY_ID[shape.kind]
        canvas[mask] = shape.colour
    canvas = canvas + rng.normal(0.0, NOISE_SIGMA, size=(height, width, 3))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    instances = [(_CATEGORY_ID[shape.kind], mask) for shape, mask in zip(kept, visible)]
    return _Rendered(image=image, semantic=semantic, instances=instances)


def _background_gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear brightness ramp in [-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE], (H, W) float64."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = np.cos(angle) * (xs / max(width - 1, 1)) + np.sin(angle) * (ys / max(height - 1, 1))
    ramp = ramp - ramp.min()
    if ramp.max() > 0:
        ramp = ramp / ramp.max()
    return (2.0 * ramp - 1.0) * GRADIENT_AMPLITUDE


def _sample_shapes(rng: np.random.Generator, height: int, width: int, base: np.ndarray) -> list[_Shape]:
    """1..MAX_SHAPES random shapes in drawing order (later ones occlude earlier ones).

    Centres lie inside the image, so a shape is at most about half outside it.
    """
    shorter = min(height, width)
    shapes = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        kind = _THINGS[int(rng.integers(len(_THINGS)))].name
        extent = float(rng.uniform(*SIZE_RANGE)) * shorter
        center = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
        colour = _sample_colour(rng, base)
        vertices: tuple[tuple[float, float], ...] = ()
        if kind == "triangle":
            # Roughly equilateral with a random rotation: jittered angles avoid slivers.
            start = rng.uniform(0.0, 2.0 * np.pi)
            angles = start + np.arange(3) * (2.0 * np.pi / 3.0) + rng.uniform(-0.3, 0.3, size=3)
            radii = extent / 2.0 * rng.uniform(0.85, 1.0, size=3)
            vertices = tuple(
                (center[0] + r * np.cos(a), center[1] + r * np.sin(a)) for r, a in zip(radii.tolist(), angles.tolist())
            )
        shapes.append(_Shape(kind=kind, center=center, size=extent, colour=colour, vertices=vertices))
    return shapes


def _sample_colour(rng: np.random.Generator, base: np.ndarray) -> tuple[int, int, int]:
    """An RGB fill colour at least MIN_COLOUR_DISTANCE (L1) from the background base."""
    while True:
        colour = rng.integers(0, 256, size=3)
        if int(np.abs(colour - base).sum()) >= MIN_COLOUR_DISTANCE:
            return tuple(int(c) for c in colour)


def _draw_shape_mask(shape: _Shape, height: int, width: int) -> np.ndarray:
    """The full (unoccluded) shape clipped to the image, (H, W) bool.

    A pixel is inside when its centre (x + 0.5, y + 0.5) is inside the shape.
    """
    mask = np.zeros((height, width), dtype=bool)
    cx, cy = shape.center
    if shape.kind == "square":
        x0 = int(round(cx - shape.size / 2.0))
        y0 = int(round(cy - shape.size / 2.0))
        side = max(int(round(shape.size)), 1)
        mask[max(y0, 0) : max(y0 + side, 0), max(x0, 0) : max(x0 + side, 0)] = True
        return mask
    ys, xs = np.mgrid[0:height, 0:width]
    px, py = xs + 0.5, ys + 0.5
    if shape.kind == "circle":
        radius = shape.size / 2.0
        return (px - cx) ** 2 + (py - cy) ** 2 <= radius**2
    if shape.kind == "triangle":
        (x1, y1), (x2, y2), (x3, y3) = shape.vertices
        edges = [
            (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1),
            (x3 - x2) * (py - y2) - (y3 - y2) * (px - x2),
            (x1 - x3) * (py - y3) - (y1 - y3) * (px - x3),
        ]
        # Inside means on the same side of all three edges, whatever the vertex order.
        return (np.all([e >= 0 for e in edges], axis=0)) | (np.all([e <= 0 for e in edges], axis=0))
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def _visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are painted over earlier ones."""
    visible = []
    covered = np.zeros_like(full_masks[0]) if full_masks else None
    for mask in reversed(full_masks):
        visible.append(mask & ~covered)
        covered = covered | mask
    return visible[::-1]


def _drop_small(shapes: list[_Shape], height: int, width: int) -> tuple[list[_Shape], list[np.ndarray]]:
    """Remove shapes whose visible area < MIN_VISIBLE_AREA; returns kept shapes and visible masks.

    Removing a shape only uncovers shapes drawn before it, so this converges quickly.
    """
    kept = list(shapes)
    full = [_draw_shape_mask(s, height, width) for s in kept]
    while True:
        visible = _visible_masks(full)
        keep = [int(v.sum()) >= MIN_VISIBLE_AREA for v in visible]
        if all(keep):
            return kept, visible
        kept = [s for s, k in zip(kept, keep) if k]
        full = [m for m, k in zip(full, keep) if k]


def _encode(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of an (H, W) bool mask, counts as str (json-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _instance_annotations(rendered: _Rendered, image_id: int, first_id: int) -> list[dict]:
    """COCO instance annotations for one image, ids first_id, first_id + 1, ..."""
    annotations = []
    for offset, (category_id, mask) in enumerate(rendered.instances):
        rle = _encode(mask)
        annotations.append(
            {
                "id": first_id + offset,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": rle,
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return annotations


def _panoptic(rendered: _Rendered) -> tuple[np.ndarray, list[dict]]:
    """Panoptic PNG (H, W, 3) uint8 and its segments_info.

    Thing segments get ids 1..K in instance order; the background segment gets K + 1.
    """
    height, width = rendered.semantic.shape
    ids = np.zeros((height, width), dtype=np.uint32)
    segments = [(category_id, mask) for category_id, mask in rendered.instances]
    background = rendered.semantic == _BACKGROUND.id
    if background.any():
        segments.append((_BACKGROUND.id, background))
    segments_info = []
    for segment_id, (category_id, mask) in enumerate(segments, start=1):
        ids[mask] = segment_id
        rle = _encode(mask)
        segments_info.append(
            {
                "id": segment_id,
                "category_id": category_id,
                "area": int(mask_utils.area(rle)),
                "bbox": [int(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    png = np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)
    return png, segments_info


def _remove_stale_pngs(directory: Path, images: int) -> None:
    """Delete fixture-named PNGs ({i:06d}.png) with i >= images left by an earlier run."""
    for path in directory.iterdir():
        match = _FIXTURE_PNG.match(path.name)
        if match and int(match.group(1)) >= images and path.is_file():
            path.unlink()


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write (H, W) uint8 as "L" or (H, W, 3) uint8 as "RGB" PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) + "\n")
