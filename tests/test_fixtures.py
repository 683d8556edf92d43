"""The synthetic shapes fixtures are the project's ground truth: annotations must be exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from rayseg.jobs.fixtures import FixtureSet, make_fixtures
from rayseg.models.categories import SHAPES

BACKGROUND_ID = 4
THING_IDS = {1, 2, 3}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> FixtureSet:
    return make_fixtures(tmp_path_factory.mktemp("shapes"), images=20, size=(96, 128), seed=0)


@pytest.fixture(scope="module")
def coco(fixtures) -> COCO:
    return COCO(str(fixtures.instances_json))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _file_bytes(fixtures: FixtureSet) -> dict[str, bytes]:
    return {str(p.relative_to(fixtures.root)): p.read_bytes() for p in sorted(fixtures.root.rglob("*")) if p.is_file()}


def _instance_masks(coco: COCO, image_id: int) -> list[tuple[dict, np.ndarray]]:
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    return [(ann, coco.annToMask(ann).astype(bool)) for ann in anns]


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = _png(path).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def _keyed(masks: list[tuple[int, np.ndarray]]) -> list[tuple[int, bytes]]:
    """(category, mask) pairs as hashable, comparable keys."""
    return [(category_id, np.packbits(mask).tobytes()) for category_id, mask in masks]


# --- layout and determinism -------------------------------------------------------------


def test_layout_and_returned_paths(fixtures):
    root = fixtures.root
    assert fixtures.images_dir == root / "images"
    assert fixtures.instances_json == root / "annotations" / "instances.json"
    assert fixtures.semantic_dir == root / "annotations" / "semantic"
    assert fixtures.panoptic_json == root / "annotations" / "panoptic.json"
    assert fixtures.panoptic_dir == root / "annotations" / "panoptic"
    names = [f"{i:06d}.png" for i in range(20)]
    for directory in (fixtures.images_dir, fixtures.semantic_dir, fixtures.panoptic_dir):
        assert sorted(p.name for p in directory.iterdir()) == names

    image = Image.open(fixtures.images_dir / "000000.png")
    assert (image.mode, image.size) == ("RGB", (128, 96))  # PIL size is (width, height)
    assert Image.open(fixtures.semantic_dir / "000000.png").mode == "L"
    assert Image.open(fixtures.panoptic_dir / "000000.png").mode == "RGB"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    first = make_fixtures(tmp_path / "a", images=4, size=(64, 64), seed=7)
    second = make_fixtures(tmp_path / "b", images=4, size=(64, 64), seed=7)
    other = make_fixtures(tmp_path / "c", images=4, size=(64, 64), seed=8)

    assert _file_bytes(first) == _file_bytes(second)
    for i in range(4):
        name = f"{i:06d}.png"
        assert not np.array_equal(_png(first.images_dir / name), _png(other.images_dir / name))


def test_smaller_set_is_a_prefix_of_a_larger_one(tmp_path):
    small = make_fixtures(tmp_path / "small", images=3, size=(64, 80), seed=3)
    large = make_fixtures(tmp_path / "large", images=6, size=(64, 80), seed=3)

    for directory in ("images", "annotations/semantic", "annotations/panoptic"):
        for i in range(3):
            name = f"{i:06d}.png"
            assert (small.root / directory / name).read_bytes() == (large.root / directory / name).read_bytes()
    small_instances = json.loads(small.instances_json.read_text())
    large_instances = json.loads(large.instances_json.read_text())
    assert small_instances["images"] == large_instances["images"][:3]
    assert small_instances["annotations"] == [a for a in large_instances["annotations"] if a["image_id"] <= 3]
    small_panoptic = json.loads(small.panoptic_json.read_text())
    large_panoptic = json.loads(large.panoptic_json.read_text())
    assert small_panoptic["annotations"] == large_panoptic["annotations"][:3]


def test_regenerating_fewer_images_removes_stale_files(tmp_path):
    make_fixtures(tmp_path, images=5, size=(32, 32))
    fixtures = make_fixtures(tmp_path, images=2, size=(32, 32))

    for directory in (fixtures.images_dir, fixtures.semantic_dir, fixtures.panoptic_dir):
        assert sorted(p.name for p in directory.iterdir()) == ["000000.png", "000001.png"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"images": 0}, "images"),
        ({"images": -3}, "images"),
        ({"size": (15, 64)}, "height"),
        ({"size": (64, 8)}, "width"),
        ({"size": (64,)}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_fixtures(tmp_path, **kwargs)
    assert not (tmp_path / "annotations").exists()


def test_smallest_allowed_size_works(tmp_path):
    fixtures = make_fixtures(tmp_path, images=3, size=(16, 16))
    assert _png(fixtures.images_dir / "000002.png").shape == (16, 16, 3)


# --- COCO instances ---------------------------------------------------------------------


def test_instances_json_header(fixtures, coco):
    data = json.loads(fixtures.instances_json.read_text())
    assert data["licenses"] == []
    assert "info" in data
    assert data["categories"] == [
        {"id": c.id, "name": c.name, "supercategory": "shape"} for c in SHAPES if c.isthing
    ]
    assert data["images"] == [
        {"id": i + 1, "file_name": f"{i:06d}.png", "width": 128, "height": 96} for i in range(20)
    ]
    ids = [a["id"] for a in data["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    for ann in data["annotations"]:
        assert ann["iscrowd"] == 0
        assert ann["category_id"] in THING_IDS
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["segmentation"]["size"] == [96, 128]


def test_instance_masks_partition_the_foreground(fixtures, coco):
    for image_id in coco.getImgIds():
        semantic = _png(fixtures.semantic_dir / coco.imgs[image_id]["file_name"])
        masks = _instance_masks(coco, image_id)
        coverage = np.zeros(semantic.shape, dtype=np.int64)
        for ann, mask in masks:
            coverage += mask
            assert np.all(semantic[mask] == ann["category_id"])
        assert coverage.max() <= 1, f"image {image_id}: instance masks overlap"
        np.testing.assert_array_equal(coverage == 1, semantic != BACKGROUND_ID)


def test_instance_area_and_bbox_match_their_mask(fixtures, coco):
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann).astype(bool)
        assert ann["area"] == int(mask.sum())
        assert ann["area"] >= 20, "slivers below 20 px should not be drawn"
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == [float(v) for v in expected]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ann["bbox"] == mask_utils.toBbox(rle).tolist()


def test_semantic_labels_are_category_ids(fixtures):
    for path in sorted(fixtures.semantic_dir.iterdir()):
        labels = _png(path)
        assert labels.dtype == np.uint8
        assert set(np.unique(labels)) <= THING_IDS | {BACKGROUND_ID}, "0 (unlabelled) must not occur"


# --- COCO panoptic ----------------------------------------------------------------------


def test_panoptic_json_header(fixtures):
    panoptic = json.loads(fixtures.panoptic_json.read_text())
    instances = json.loads(fixtures.instances_json.read_text())
    assert panoptic["images"] == instances["images"]
    assert panoptic["categories"] == [
        {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1},
        {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1},
        {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1},
        {"id": 4, "name": "background", "supercategory": "stuff", "isthing": 0},
    ]
    assert [(a["image_id"], a["file_name"]) for a in panoptic["annotations"]] == [
        (i + 1, f"{i:06d}.png") for i in range(20)
    ]


def test_panoptic_png_matches_segments_info_and_instances(fixtures, coco):
    panoptic = json.loads(fixtures.panoptic_json.read_text())
    for entry in panoptic["annotations"]:
        ids = _panoptic_ids(fixtures.panoptic_dir / entry["file_name"])
        semantic = _png(fixtures.semantic_dir / entry["file_name"])
        segments = entry["segments_info"]
        segment_ids = [s["id"] for s in segments]

        assert 0 not in segment_ids and len(set(segment_ids)) == len(segment_ids)
        assert set(np.unique(ids)) == set(segment_ids), "every pixel belongs to a listed segment"
        stuff = [s for s in segments if s["category_id"] == BACKGROUND_ID]
        assert len(stuff) == (1 if (semantic == BACKGROUND_ID).any() else 0)

        thing_masks = []
        for segment in segments:
            mask = ids == segment["id"]
            assert segment["iscrowd"] == 0
            assert segment["area"] == int(mask.sum())
            assert np.all(semantic[mask] == segment["category_id"])
            ys, xs = np.nonzero(mask)
            bbox = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert segment["bbox"] == [int(v) for v in bbox]
            if segment["category_id"] != BACKGROUND_ID:
                thing_masks.append((segment["category_id"], mask))

        # Thing segments are exactly the instances (same masks and categories), in any order.
        instances = [(ann["category_id"], mask) for ann, mask in _instance_masks(coco, entry["image_id"])]
        assert sorted(_keyed(thing_masks)) == sorted(_keyed(instances))


# --- image content ----------------------------------------------------------------------


def test_shapes_stand_out_from_a_textured_background(fixtures, coco):
    for image_id in coco.getImgIds():
        name = coco.imgs[image_id]["file_name"]
        image = _png(fixtures.images_dir / name).astype(np.float64)
        background = _png(fixtures.semantic_dir / name) == BACKGROUND_ID
        if not background.any():
            continue
        background_pixels = image[background]
        assert background_pixels.std(axis=0).max() > 1.0, "background should not be flat"
        background_mean = background_pixels.mean(axis=0)
        for _, mask in _instance_masks(coco, image_id):
            distance = np.abs(image[mask].mean(axis=0) - background_mean).sum()
            assert distance > 50, f"image {image_id}: a shape is barely distinguishable from the background"


def test_set_has_crowded_images_occlusion_all_classes_and_mixed_sizes(fixtures, coco):
    anns = coco.loadAnns(coco.getAnnIds())
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert min(per_image) >= 1
    assert max(per_image) >= 3
    assert {a["category_id"] for a in anns} == THING_IDS
    areas = [a["area"] for a in anns]
    assert max(areas) >= 8 * min(areas)

    # An occluded shape's visible part touches its occluder, so occlusion shows up as two
    # different instances sharing an edge; separate, non-overlapping shapes rarely touch.
    def touching_pairs(image_id: int) -> int:
        ids = _panoptic_ids(fixtures.panoptic_dir / coco.imgs[image_id]["file_name"])
        thing = _png(fixtures.semantic_dir / coco.imgs[image_id]["file_name"]) != BACKGROUND_ID
        pairs = set()
        for a, b, ta, tb in (
            (ids[:, :-1], ids[:, 1:], thing[:, :-1], thing[:, 1:]),
            (ids[:-1, :], ids[1:, :], thing[:-1, :], thing[1:, :]),
        ):
            edge = (a != b) & ta & tb
            pairs |= {tuple(sorted(p)) for p in zip(a[edge].tolist(), b[edge].tolist())}
        return len(pairs)

    assert sum(touching_pairs(i) for i in coco.getImgIds()) >= 2
