"""MaskFormer and Mask2Former: tiny random checkpoints saved as HF directories, loaded
offline; our device-side post-processing equals the image processors' own on the same
outputs, for every task; one run through the Ray pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayseg.models.maskformer import build_mask2former, build_maskformer, random_config
from rayseg.models.registry import REGISTRY
from rayseg.models.weights import WeightsError

# Labels 0, 1 are things; 2, 3 stuff (fused in panoptic output).
CATEGORIES = [
    {"id": 0, "name": "class_0", "isthing": True},
    {"id": 1, "name": "class_1", "isthing": True},
    {"id": 2, "name": "class_2", "isthing": False},
    {"id": 3, "name": "class_3", "isthing": False},
]
STUFF = {2, 3}
MASK_THRESHOLD = 0.5
OVERLAP = 0.8


def sharpen(network, num_labels: int) -> None:
    """Random heads predict near-uniform classes and blurry masks; scale them so that
    thresholds are crossed and there are segments to compare."""
    torch.manual_seed(1)
    mask_linears = []
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == num_labels + 1:
                module.weight.normal_(0, 1.0)
                module.bias.zero_()
                module.bias[-1] = -4.0  # "no object" rarely wins
            if isinstance(module, torch.nn.Linear) and "mask_embed" in name:
                mask_linears.append(module)
        mask_linears[-1].weight.mul_(20)


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        image = np.zeros((h, w, 3), np.uint8)
        image[: h // 2] = rng.integers(0, 255, 3)
        image[h // 2 :, : w // 2] = rng.integers(0, 255, 3)
        image[h // 2 :, w // 2 :] = rng.integers(0, 255, (h - h // 2, w - w // 2, 3))
        out.append(image)
    return out


def save_checkpoint(directory, name: str, processor) -> None:
    import transformers

    cls = {"maskformer": transformers.MaskFormerForInstanceSegmentation, "mask2former": transformers.Mask2FormerForUniversalSegmentation}[name]
    torch.manual_seed(0)
    network = cls(random_config(name)).eval()
    sharpen(network, network.config.num_labels)
    network.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import Mask2FormerImageProcessor, MaskFormerImageProcessor

    root = tmp_path_factory.mktemp("maskformers")
    category_file = root / "categories.json"
    category_file.write_text(json.dumps({"categories": CATEGORIES}))
    maskformer = root / "maskformer"
    save_checkpoint(maskformer, "maskformer", MaskFormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}))
    mask2former = root / "mask2former"
    # The processor's post-processing resizes masks to 384×384 (its checkpoints' input) first.
    save_checkpoint(mask2former, "mask2former", Mask2FormerImageProcessor(size={"height": 384, "width": 384}))
    return {"maskformer": str(maskformer), "mask2former": str(mask2former), "category_file": str(category_file)}


BUILDERS = {"maskformer": build_maskformer, "mask2former": build_mask2former}
# Mixed sizes in one batch: MaskFormer resizes the short side to 64 (each of these to a
# multiple of 32, so the image alone has no padding the processor's post-processing would
# skew); Mask2Former resizes every image to 384×384.
SIZES = {
    "maskformer": [(48, 72), (72, 48), (32, 64), (40, 40)],
    "mask2former": [(40, 56), (48, 48), (64, 40)],
}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def reference_outputs(model, image):
    """The network run directly on the processor's input for `image` alone."""
    with torch.no_grad():
        return model.network(**model._inputs(model.processor(images=[image], return_tensors="pt")))


def check_semantic(model, processor, outputs, sizes, mine):
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    total = 0
    for segments, semantic in zip(mine, maps):
        semantic = semantic.numpy()
        present = sorted(int(c) for c in np.unique(semantic))
        assert sorted(s.category_id for s in segments) == present
        for s in segments:
            assert iou(s.mask, semantic == s.category_id) >= 0.99
            assert 0 <= s.score <= 1
        union = np.sum([s.mask for s in segments], axis=0)
        assert (union == 1).all()
        total += len(segments)
    return total


def check_instance_binary(processor, outputs, sizes, mine, threshold):
    reference = processor.post_process_instance_segmentation(
        outputs, threshold=threshold, target_sizes=sizes, return_binary_maps=True
    )
    total = 0
    for segments, ref in zip(mine, reference):
        infos = ref["segments_info"]
        assert len(segments) == len(infos)
        unused = list(range(len(segments)))
        for position, info in enumerate(infos):
            mask = ref["segmentation"][position].numpy() > 0.5
            match = [i for i in unused if segments[i].category_id == info["label_id"] and abs(segments[i].score - info["score"]) < 1e-4 and iou(segments[i].mask, mask) >= 0.99]
            assert match, f"no segment matches {info}"
            unused.remove(match[0])
        total += len(infos)
    return total


def check_map(reference, mine, *, panoptic: bool):
    """Segments against a processor's (segmentation map, segments_info) results."""
    total = 0
    for segments, ref in zip(mine, reference):
        seg_map = ref["segmentation"].numpy()
        infos = {}
        for info in ref["segments_info"]:
            infos.setdefault(info["id"], info)  # fused stuff repeats its id: the first one
        assert len(segments) == len(infos)
        if panoptic:
            assert sorted(s.segment_id for s in segments) == list(range(1, len(infos) + 1))
            ordered = {s.segment_id: s for s in segments}
            pairs = [(ordered[i], info) for i, info in infos.items()]
            union = np.sum([s.mask for s in segments], axis=0) if segments else np.zeros(1)
            assert union.max() <= 1, "panoptic segments do not overlap"
        else:
            assert all(s.segment_id is None for s in segments)
            pairs = list(zip(segments, infos.values()))
        for s, info in pairs:
            assert s.category_id == info["label_id"]
            assert abs(s.score - info["score"]) < 1e-4
            assert iou(s.mask, seg_map == info["id"]) >= 0.99
        total += len(infos)
    return total


def same_segments(a, b) -> bool:
    """Same classes, ids, scores within 1e-5 and masks of IoU ≥ 0.99: a batch of two images of
    one shape sums in another order than one image alone (measured: scores 2e-7 apart, one
    pixel of 2,304 on a boundary), while padding changes outputs wholesale."""
    return len(a) == len(b) and all(
        x.category_id == y.category_id and abs(x.score - y.score) <= 1e-5 and x.segment_id == y.segment_id
        and iou(x.mask, y.mask) >= 0.99
        for x, y in zip(a, b)
    )  # fmt: skip


@pytest.mark.parametrize("name", ["maskformer", "mask2former"])
def test_all_tasks_equal_the_image_processor_post_processing(checkpoints, name):
    """One network load per task; all three tasks compared on the same mixed-size batch,
    each image against the processor and network run on it alone."""
    sizes = SIZES[name]
    batch_images = images(sizes)
    counts = {}
    for task in ("semantic", "instance", "panoptic"):
        threshold = 0.0 if task == "instance" else 0.3
        model = BUILDERS[name](
            checkpoints[name], task=task, score_threshold=None if task == "semantic" else threshold,
            category_file=checkpoints["category_file"],
        )  # fmt: skip
        assert model.task == task and [c.isthing for c in model.categories] == [True, True, False, False]
        mine = model.postprocess(model.forward(model.preprocess(batch_images)), sizes)
        assert all(s.mask.shape == size and s.mask.dtype == bool for segs, size in zip(mine, sizes) for s in segs)
        processor = model.processor
        counts[task] = 0
        for image, size, segments in zip(batch_images, sizes, mine):
            outputs = reference_outputs(model, image)
            if task == "semantic":
                counts[task] += check_semantic(model, processor, outputs, [size], [segments])
            elif task == "instance":
                counts[task] += check_instance_binary(processor, outputs, [size], [segments], threshold)
            else:
                reference = processor.post_process_panoptic_segmentation(
                    outputs, threshold=threshold, mask_threshold=MASK_THRESHOLD, overlap_mask_area_threshold=OVERLAP,
                    label_ids_to_fuse=STUFF, target_sizes=[size],
                )  # fmt: skip
                counts[task] += check_map(reference, [segments], panoptic=True)
    assert all(counts.values()), f"random weights must give segments to compare: {counts}"


@pytest.mark.parametrize("name", ["maskformer", "mask2former"])
@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_a_prediction_never_depends_on_its_batch_neighbours(checkpoints, name, task):
    model = BUILDERS[name](checkpoints[name], task=task, score_threshold=0.1, category_file=checkpoints["category_file"])
    assert_independent_of_batch_neighbours(model)


# Portrait, landscape and square, two of one size: processed inputs of three shapes.
NEIGHBOUR_SIZES = [(48, 48), (48, 96), (80, 40), (40, 56), (48, 48)]


def assert_independent_of_batch_neighbours(model) -> None:
    """Each image of a mixed-size batch gets the segments it gets alone (`same_segments`)."""
    batch_images = images(NEIGHBOUR_SIZES, seed=3)
    together = model.postprocess(model.forward(model.preprocess(batch_images)), NEIGHBOUR_SIZES)
    assert sum(map(len, together)), "random weights must give segments to compare"
    for image, size, segments in zip(batch_images, NEIGHBOUR_SIZES, together):
        alone = model.postprocess(model.forward(model.preprocess([image])), [size])[0]
        assert same_segments(segments, alone), f"{model.name} {model.task}: the {size} image differs in a mixed batch"


def test_images_of_one_processed_shape_share_a_network_call(checkpoints):
    model = build_maskformer(checkpoints["maskformer"], task="semantic")
    groups = model.preprocess(images([(48, 48), (48, 96), (40, 40), (48, 96)]))  # 64×64, 64×128, 64×64, 64×128
    assert [indices for indices, _ in groups] == [[0, 2], [1, 3]]
    assert [tuple(batch["pixel_values"].shape) for _, batch in groups] == [(2, 3, 64, 64), (2, 3, 64, 128)]


def test_a_semantic_score_threshold_drops_the_segments_below_it_and_none_drops_none(checkpoints):
    sizes = SIZES["maskformer"]
    batch_images = images(sizes, seed=5)

    def scores(model) -> list[float]:
        return sorted(s.score for segments in model.postprocess(model.forward(model.preprocess(batch_images)), sizes) for s in segments)

    every = build_maskformer(checkpoints["maskformer"], task="semantic")
    all_scores = scores(every)
    assert len(set(all_scores)) >= 3, "the comparison needs several segments"
    cut = all_scores[len(all_scores) // 2]  # inclusive: the segment scoring it stays
    assert scores(build_maskformer(checkpoints["maskformer"], task="semantic", score_threshold=cut)) == [
        s for s in all_scores if s >= cut
    ]
    assert every.given_threshold is None and every.score_threshold == 0.5  # the default cuts only the other tasks


@pytest.mark.parametrize("name", ["maskformer", "mask2former"])
def test_an_image_whose_queries_are_all_below_the_threshold_has_no_panoptic_segments(checkpoints, name):
    """Mask2Former resized an empty stack of kept masks, which torch refuses: the whole batch failed."""
    model = BUILDERS[name](checkpoints[name], task="panoptic", score_threshold=1.0)
    batch = images(SIZES[name])
    assert [len(s) for s in model.postprocess(model.forward(model.preprocess(batch)), [i.shape[:2] for i in batch])] == [0] * len(batch)


def test_checkpoint_errors_name_the_missing_file(checkpoints, tmp_path):
    import shutil

    broken = tmp_path / "no_processor"
    shutil.copytree(checkpoints["mask2former"], broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match="preprocessor_config.json"):
        build_mask2former(str(broken))
    with pytest.raises(WeightsError, match="not 'maskformer'"):
        build_maskformer(checkpoints["mask2former"])
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        build_mask2former(checkpoints["mask2former"], weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="task must be one of"):
        build_mask2former(checkpoints["mask2former"], task="depth")


def test_registry_entries():
    for name in ("maskformer", "mask2former", "oneformer"):
        entry = REGISTRY[name]
        assert entry.weights_file("/ckpt/dir") == "/ckpt/dir/model.safetensors"
        assert {"task", "category_file", "mask_threshold", "overlap_mask_area_threshold"} <= set(entry.options.model_fields)


def test_through_the_ray_pipeline(checkpoints, ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    import ray
    from pycocotools import mask as mask_utils

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run

    sizes = [(40, 56), (48, 48), (40, 56)]
    items = [{"image_id": f"img{i}", "image": image} for i, image in enumerate(images(sizes, seed=5))]
    spec = ModelSpec(
        "mask2former", checkpoints["mask2former"], score_threshold=0.3,
        options={"task": "panoptic", "category_file": checkpoints["category_file"]},
    )  # fmt: skip
    rows = segment(ray.data.from_items(items), spec, plan_resources(ray.cluster_resources()))
    write_run(rows, str(tmp_path / "out"), run_id="m2f", run_info={"model": "mask2former"})
    table = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["image_id"] for r in table) == ["img0", "img1", "img2"]
    local = build_mask2former(checkpoints["mask2former"], task="panoptic", score_threshold=0.3, category_file=checkpoints["category_file"])
    by_id = {item["image_id"]: item["image"] for item in items}
    found = 0
    for row in table:
        assert row["status"] == "ok" and row["model"] == "mask2former"
        expected = local.postprocess(local.forward(local.preprocess([by_id[row["image_id"]]])), [(row["height"], row["width"])])[0]
        assert len(row["segments"]) == len(expected)
        for seg, exp in zip(sorted(row["segments"], key=lambda s: s["segment_id"]), sorted(expected, key=lambda s: s.segment_id)):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": seg["rle"]}).astype(bool)
            assert seg["segment_id"] == exp.segment_id and seg["category_id"] == exp.category_id
            assert seg["label"] == f"class_{exp.category_id}"
            assert iou(mask, exp.mask) >= 0.99
        found += len(expected)
    assert found, "the pipeline run must produce panoptic segments"

    # And the run exports to COCO panoptic: the PNG ids decode to the rows' segments.
    from PIL import Image

    from rayseg.pipeline.panoptic_export import decode_ids, export_panoptic

    summary = export_panoptic(str(tmp_path / "out"), str(tmp_path / "pan"), category_file=checkpoints["category_file"])
    assert summary.images == 3 and summary.segments == found and summary.dropped_segments == 0
    document = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    assert {c["id"]: c["isthing"] for c in document["categories"]}.items() <= {0: 1, 1: 1, 2: 0, 3: 0}.items()
    rows = {r["image_id"]: r for r in table}
    # String ids are numbered; each image keeps its row's id as rayseg_image_id.
    row_ids = {image["id"]: image["rayseg_image_id"] for image in document["images"]}
    for annotation in document["annotations"]:
        ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / annotation["file_name"])))
        row = rows[row_ids[annotation["image_id"]]]
        for seg in row["segments"]:
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": seg["rle"]}).astype(bool)
            assert ((ids == seg["segment_id"]) == mask).all()


def test_loads_from_a_uri_directory(checkpoints):
    """An fsspec URI (memory://): the directory's files are copied locally, then loaded offline."""
    import os

    import fsspec

    fs = fsspec.filesystem("memory")
    for name in os.listdir(checkpoints["maskformer"]):
        with open(os.path.join(checkpoints["maskformer"], name), "rb") as f:
            fs.pipe(f"/ckpts/maskformer/{name}", f.read())
    try:
        remote = build_maskformer("memory://ckpts/maskformer", task="semantic")
        local = build_maskformer(checkpoints["maskformer"], task="semantic")
        assert remote.weights_sha256 == local.weights_sha256
        assert REGISTRY["maskformer"].weights_file("memory://ckpts/maskformer") == "memory://ckpts/maskformer/model.safetensors"
        image = images([(48, 72)])
        a = remote.postprocess(remote.forward(remote.preprocess(image)), [(48, 72)])[0]
        b = local.postprocess(local.forward(local.preprocess(image)), [(48, 72)])[0]
        assert [s.category_id for s in a] == [s.category_id for s in b]
        assert all((x.mask == y.mask).all() for x, y in zip(a, b))
    finally:
        fs.rm("/ckpts", recursive=True)


def test_semantic_candidates_grow_until_no_other_class_can_win(checkpoints, monkeypatch):
    """Scoring one class first: the bound forces more classes in, and the result is still
    the processor's."""
    from rayseg.models import maskformer

    calls = []
    original = maskformer.upsampled_argmax

    def counting(scores, size):
        calls.append(scores.shape[0])
        return original(scores, size)

    monkeypatch.setattr(maskformer, "SEMANTIC_CANDIDATES", 1)
    monkeypatch.setattr(maskformer, "upsampled_argmax", counting)
    sizes = SIZES["mask2former"]
    model = build_mask2former(checkpoints["mask2former"], task="semantic")
    batch_images = images(sizes)
    mine = model.postprocess(model.forward(model.preprocess(batch_images)), sizes)
    assert 1 in calls and max(calls) > 1, calls
    compared = sum(
        check_semantic(model, model.processor, reference_outputs(model, image), [size], [segments])
        for image, size, segments in zip(batch_images, sizes, mine)
    )
    assert compared > 1
