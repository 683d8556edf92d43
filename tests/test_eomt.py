"""EoMT: a tiny random checkpoint directory loaded offline; every task equals transformers'
image processor and network run directly on the same mixed-size batch; a prediction never
depends on its batch neighbours; a checkpoint whose processor splits images into patches
(semantic) is merged as transformers merges it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayseg.models.eomt import build_eomt, random_config
from rayseg.models.registry import REGISTRY

from .test_maskformer import assert_independent_of_batch_neighbours, images

SIZES = [(40, 56), (64, 48), (30, 30), (64, 64)]
STUFF = [2, 3]
# The random queries overlap a lot: a low overlap ratio keeps segments to compare.
OVERLAP = 0.1


def save_checkpoint(directory, processor) -> None:
    from transformers import EomtForUniversalSegmentation

    config = random_config()
    config.thing_ids = [0, 1]
    torch.manual_seed(0)
    network = EomtForUniversalSegmentation(config).eval()
    with torch.no_grad():  # sharper masks and classes than a random init's, so thresholds are crossed
        network.class_predictor.weight.mul_(8)
        for module in network.mask_head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(4)
    network.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import EomtImageProcessor

    padded = tmp_path_factory.mktemp("eomt")
    save_checkpoint(padded, EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True))
    split = tmp_path_factory.mktemp("eomt-split")
    save_checkpoint(split, EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": None}, do_split_image=True))
    return {"padded": str(padded), "split": str(split)}


def reference(directory: str, batch: list[np.ndarray], task: str, sizes):
    """transformers run directly: the processor on the whole mixed-size batch, the network,
    the processor's post-processing."""
    from transformers import EomtForUniversalSegmentation, EomtImageProcessor

    processor = EomtImageProcessor.from_pretrained(directory)
    network = EomtForUniversalSegmentation.from_pretrained(directory).eval()
    encoded = processor(images=batch, return_tensors="pt")
    with torch.no_grad():
        outputs = network(pixel_values=encoded["pixel_values"], patch_offsets=encoded.get("patch_offsets"))
    if task == "semantic":
        return processor.post_process_semantic_segmentation(outputs, sizes, return_segmentation_scores=True)
    if task == "instance":
        return processor.post_process_instance_segmentation(outputs, sizes, threshold=0.0)
    return processor.post_process_panoptic_segmentation(
        outputs, sizes, threshold=0.0, overlap_mask_area_threshold=OVERLAP, stuff_classes=STUFF
    )


def check_semantic(segments, expected) -> None:
    labels, scores = expected.segmentation.numpy(), expected.segmentation_scores.numpy()
    # Where every class scores ~0 (sharp random masks), the sum is held at 1e-12, as ours is.
    confidence = np.take_along_axis(scores, labels[None], 0)[0] / np.maximum(scores.sum(0), 1e-12)
    present = np.unique(labels)
    assert [s.category_id for s in segments] == present.tolist()
    for segment, label in zip(segments, present):
        np.testing.assert_array_equal(segment.mask, labels == label)
        assert segment.score == pytest.approx(confidence[labels == label].mean(), rel=1e-6)


def check_map(segments, expected, panoptic: bool) -> None:
    infos, segmentation = expected["segments_info"], expected["segmentation"].numpy()
    assert len(segments) == len(infos)
    for segment, info in zip(segments, infos):
        assert (segment.category_id, segment.score) == (info["label_id"], info["score"])
        assert segment.segment_id == (info["id"] + 1 if panoptic else None)
        np.testing.assert_array_equal(segment.mask, segmentation == info["id"])


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_every_task_equals_transformers_on_a_mixed_size_batch(checkpoints, task):
    batch = images(SIZES)
    threshold = None if task == "semantic" else 0.0
    model = build_eomt(checkpoints["padded"], task=task, score_threshold=threshold, overlap_mask_area_threshold=OVERLAP)
    mine = model.postprocess(model.forward(model.preprocess(batch)), SIZES)
    expected = reference(checkpoints["padded"], batch, task, SIZES)
    assert sum(len(segments) for segments in mine), "random weights must give segments to compare"
    for segments, want in zip(mine, expected):
        check_semantic(list(segments), want) if task == "semantic" else check_map(list(segments), want, task == "panoptic")


def test_split_patches_are_merged_as_transformers_merges_them(checkpoints):
    sizes = [(40, 80), (96, 48), (64, 64)]  # resized to 64×128, 128×64 and 64×64: 2, 2 and 1 patches
    batch = images(sizes)
    model = build_eomt(checkpoints["split"], task="semantic")
    groups = model.preprocess(batch)
    assert [len(group.patch_offsets) for group in groups] == [5], "one network call over every image's patches"
    mine = model.postprocess(model.forward(groups), sizes)
    for segments, want in zip(mine, reference(checkpoints["split"], batch, "semantic", sizes)):
        check_semantic(list(segments), want)


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_a_prediction_never_depends_on_its_batch_neighbours(checkpoints, task):
    threshold = None if task == "semantic" else 0.0
    assert_independent_of_batch_neighbours(
        build_eomt(checkpoints["padded"], task=task, score_threshold=threshold, overlap_mask_area_threshold=OVERLAP)
    )


def test_thing_ids_make_the_stuff_classes_and_the_registry_lists_eomt(checkpoints):
    model = build_eomt(checkpoints["padded"])
    assert [c.isthing for c in model.categories] == [True, True, False, False]
    assert model.stuff == STUFF and model.score_threshold == 0.8
    entry = REGISTRY["eomt"]
    assert entry.task == "panoptic" and entry.options is REGISTRY["mask2former"].options
    assert json.loads((open(f"{checkpoints['padded']}/config.json").read()))["model_type"] == "eomt"


def test_through_the_ray_pipeline_each_row_is_the_model_run_on_its_image(checkpoints, ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    import ray
    from pycocotools import mask as mask_utils

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run

    items = [{"image_id": f"img{i}", "image": image} for i, image in enumerate(images(SIZES[:3], seed=5))]
    options = {"task": "panoptic", "overlap_mask_area_threshold": OVERLAP}
    spec = ModelSpec("eomt", checkpoints["padded"], score_threshold=0.0, options=options)
    write_run(segment(ray.data.from_items(items), spec, plan_resources(ray.cluster_resources())), str(tmp_path / "out"), run_id="eomt", run_info={})
    local = build_eomt(checkpoints["padded"], score_threshold=0.0, **options)
    by_id = {item["image_id"]: item["image"] for item in items}
    found = 0
    for row in pq.read_table(tmp_path / "out").to_pylist():
        assert row["status"] == "ok" and row["model"] == "eomt"
        (expected,) = local.postprocess(local.forward(local.preprocess([by_id[row["image_id"]]])), [(row["height"], row["width"])])
        assert [(s["segment_id"], s["category_id"], s["label"]) for s in row["segments"]] == [
            (e.segment_id, e.category_id, f"class_{e.category_id}") for e in expected
        ]
        for segment_row, want in zip(row["segments"], expected):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": segment_row["rle"]}).astype(bool)
            np.testing.assert_array_equal(mask, want.mask)
        found += len(expected)
    assert found, "the pipeline run must produce panoptic segments"
