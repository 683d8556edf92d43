"""SAM: automatic masks equal transformers' mask-generation pipeline, box prompts equal
SamModel + SamProcessor, segment-anything .pth files load (safely) to the same model, and the
model runs through the real Ray pipeline.

The model is a tiny random SAM (ViT of width 32 on 64×64 inputs) saved as a transformers
checkpoint directory and, converted back to segment-anything's layout, as a .pth. Random
weights give masks that are noise blobs; the filters are set (mask_threshold 0.3, stability
offset 0.1) so that several distinct masks survive them and the NMS for the comparisons.
"""

from __future__ import annotations

import json
import logging
import re

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor, pipeline

from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.base import Prompts
from rayseg.models.bits import pack_bits, unpack_bits
from rayseg.models.checkpoint_files import sam_weights_file
from rayseg.models.registry import get_entry
from rayseg.models.sam import OBJECT, RANDOM_CONFIG, build_sam, remove_small_regions
from rayseg.models.sam_convert import convert_state_dict, infer_config
from rayseg.models.weights import WeightsError
from rayseg.pipeline.resources import plan_resources
from rayseg.pipeline.segment import ModelSpec, segment
from rayseg.pipeline.sink import write_run
from rayseg.pipeline.sources import read_source

TINY = {
    "vision_config": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8,
        "output_channels": 32, "window_size": 4, "global_attn_indexes": [1], "num_pos_feats": 16, "mlp_dim": 64,
    },
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 8},
    "mask_decoder_config": {
        "hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "iou_head_hidden_dim": 32,
    },
}  # fmt: skip

# Automatic-mode settings under which the random model keeps several masks per image.
AUTOMATIC = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.02, "stability_score_offset": 0.1, "mask_threshold": 0.3}
POINTS = 10  # points per side: 300 candidate masks per image


def tiny_network() -> SamModel:
    torch.manual_seed(1)
    network = SamModel(SamConfig(**TINY)).eval()
    with torch.no_grad():  # transformers' init is near zero (std 1e-10 in the encoder): widen it
        for name, parameter in network.named_parameters():
            if parameter.dim() > 1 and "positional" not in name:
                parameter.normal_(0, 0.3)
    return network


# --- the inverse of sam_convert (transformers → segment-anything keys), written independently ---

_HF_TO_SA = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"\.neck\.conv1\.", ".neck.0."),
    (r"\.neck\.layer_norm1\.", ".neck.1."),
    (r"\.neck\.conv2\.", ".neck.2."),
    (r"\.neck\.layer_norm2\.", ".neck.3."),
    (r"\.shared_embedding\.positional_embedding$", ".pe_layer.positional_encoding_gaussian_matrix"),
    (r"\.mask_embed\.conv1\.", ".mask_downscaling.0."),
    (r"\.mask_embed\.layer_norm1\.", ".mask_downscaling.1."),
    (r"\.mask_embed\.conv2\.", ".mask_downscaling.3."),
    (r"\.mask_embed\.layer_norm2\.", ".mask_downscaling.4."),
    (r"\.mask_embed\.conv3\.", ".mask_downscaling.6."),
    (r"\.point_embed\.", ".point_embeddings."),
    (r"\.upscale_conv1\.", ".output_upscaling.0."),
    (r"\.upscale_layer_norm\.", ".output_upscaling.1."),
    (r"\.upscale_conv2\.", ".output_upscaling.3."),
    (r"\.layer_norm(\d|_final_attn)", r".norm\1"),
]


def hf_to_segment_anything(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers SamModel state dict in segment-anything's layout (what its .pth holds)."""
    depth = 3  # SamFeedForward: proj_in, layers.0, proj_out
    out = {"pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1), "pixel_std": torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)}
    for key, value in state.items():
        if key == "shared_image_embedding.positional_embedding":
            continue
        mlp = re.match(r"^(mask_decoder\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\.(proj_in|proj_out|layers\.(\d+))\.(.+)$", key)
        if mlp:
            index = 0 if mlp[2] == "proj_in" else depth - 1 if mlp[2] == "proj_out" else int(mlp[3]) + 1
            key = f"{mlp[1]}.layers.{index}.{mlp[4]}"
        else:
            for pattern, replacement in _HF_TO_SA:
                key = re.sub(pattern, replacement, key)
        out[key] = value.clone()
    return out


@pytest.fixture(scope="module")
def network():
    return tiny_network()


@pytest.fixture(scope="module")
def checkpoints(network, tmp_path_factory):
    """The tiny model as a transformers directory (with its processor) and as a .pth."""
    root = tmp_path_factory.mktemp("sam")
    directory = root / "hf"
    network.save_pretrained(directory)
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(directory)
    pth = root / "sam_tiny.pth"
    torch.save(hf_to_segment_anything(network.state_dict()), pth)
    return directory, pth


# Mixed sizes in one batch (landscape, portrait, square): every comparison with the
# reference runs it per image, so a prediction must not depend on its batch neighbours.
CROPS = [(64, 64), (64, 48), (40, 64), (56, 60)]


@pytest.fixture(scope="module")
def images(shapes):
    """Four shapes images cut to CROPS (from the top-left corner, so COCO boxes keep their place)."""
    pictures = [np.array(Image.open(p).convert("RGB")) for p in sorted(shapes.images_dir.glob("*.png"))[:4]]
    return [np.ascontiguousarray(picture[:h, :w]) for picture, (h, w) in zip(pictures, CROPS)]


@pytest.fixture(scope="module")
def automatic(checkpoints):
    return build_sam(str(checkpoints[0]), points_per_side=POINTS, points_per_batch=64, **AUTOMATIC)


def run(model, images, prompts=None):
    batch = model.preprocess(images) if prompts is None else model.preprocess(images, prompts=prompts)
    return [list(segments) for segments in model.postprocess(model.forward(batch), [image.shape[:2] for image in images])]


def assert_same_masks(segments, masks, scores) -> None:
    assert len(segments) == len(masks)
    for segment_, mask, score in zip(segments, masks, scores):
        mask = np.asarray(mask, dtype=bool)
        assert segment_.mask.shape == mask.shape and segment_.mask.dtype == bool
        union = (segment_.mask | mask).sum()
        assert union == 0 or (segment_.mask & mask).sum() / union >= 0.99
        assert segment_.score == pytest.approx(float(score), abs=1e-4)


def mask_generation(network, processor, image, **parameters):
    generator = pipeline("mask-generation", model=network, image_processor=processor, device="cpu")
    return generator(Image.fromarray(image), **parameters)


# --- automatic mode --------------------------------------------------------------------------


def test_automatic_masks_equal_transformers_mask_generation_pipeline(network, automatic, images):
    processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    batched = run(automatic, images)  # one call for all four images
    compared = 0
    for image, ours in zip(images, batched):
        reference = mask_generation(
            network, processor, image, points_per_crop=POINTS, points_per_batch=64, crops_nms_thresh=0.7, **AUTOMATIC
        )
        assert_same_masks(ours, reference["masks"], reference["scores"])
        assert all(s.category_id == OBJECT.id and s.annotation_id is None for s in ours)
        (alone,) = run(automatic, [image])
        assert [s.score for s in alone] == [s.score for s in ours], "an image's masks do not depend on its batch"
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(alone, ours))
        compared += len(ours)
    assert compared >= 10, "the comparison must cover several masks"
    assert max(len(s) for s in batched) < POINTS * POINTS * 3 / 10, "NMS and the filters did remove masks"


def test_automatic_masks_with_a_crop_layer_equal_the_pipeline(network, checkpoints, tmp_path):
    """A 128×128 image, 1 crop layer (4 crops + the image). transformers runs one NMS over all
    crops' masks; box_nms_thresh=1 turns our per-crop NMS off to compare just that."""
    fixtures = make_fixtures(tmp_path, images=2, size=(128, 128), seed=5)
    pictures = [np.array(Image.open(p).convert("RGB")) for p in sorted(fixtures.images_dir.glob("*.png"))[1:]]
    processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    model = build_sam(str(checkpoints[0]), points_per_side=8, crops_n_layers=1, box_nms_thresh=1.0, **AUTOMATIC)
    compared = 0
    for image, ours in zip(pictures, run(model, pictures)):
        reference = mask_generation(network, processor, image, points_per_crop=8, crops_n_layers=1, **AUTOMATIC)
        assert_same_masks(ours, reference["masks"], reference["scores"])
        compared += len(ours)
    assert compared >= 5


def test_crop_point_downscaling_and_small_region_removal_run(checkpoints, images):
    """crop_n_points_downscale_factor (which transformers' pipeline cannot stack) and
    min_mask_region_area: masks come out at image size without holes/islands below the area."""
    model = build_sam(
        str(checkpoints[0]), points_per_side=8, crops_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=12, **AUTOMATIC
    )
    results = run(model, images[:2])
    assert sum(len(r) for r in results) > 0
    from scipy import ndimage

    for image, segments in zip(images, results):
        for s in segments:
            assert s.mask.shape == image.shape[:2]
            labels, count = ndimage.label(s.mask, structure=np.ones((3, 3)))
            sizes = np.bincount(labels.ravel())[1:]
            assert count == 1 or sizes.min() >= 12


def test_remove_small_regions_fills_holes_and_drops_islands():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:9, 1:9] = True
    mask[4, 4] = False  # a 1-pixel hole
    mask[11, 11] = True  # a 1-pixel island
    filled, changed = remove_small_regions(mask, 3, "holes")
    assert changed and filled[4, 4] and filled[11, 11]
    cleaned, changed = remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[11, 11] and cleaned[1:9, 1:9].all()
    assert not remove_small_regions(cleaned, 3, "islands")[1], "nothing left to remove"


def test_bit_packing_round_trips_in_numpys_bit_order():
    masks = torch.rand(5, 7, 9) > 0.5
    packed = pack_bits(masks.flatten(1))
    assert torch.equal(packed, torch.from_numpy(np.packbits(masks.flatten(1).numpy(), axis=1)))
    assert torch.equal(unpack_bits(packed, 63).unflatten(1, (7, 9)), masks)
    assert unpack_bits(pack_bits(masks[:0].flatten(1)), 63).shape == (0, 63)


# --- prompted mode ---------------------------------------------------------------------------


def coco_prompts(shapes) -> dict[str, Prompts]:
    data = json.loads(shapes.instances_json.read_text())
    names = {image["id"]: image["file_name"] for image in data["images"]}
    grouped: dict[str, list] = {}
    for a in data["annotations"]:
        grouped.setdefault(names[a["image_id"]], []).append(a)
    return {
        name: Prompts(
            boxes=np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float32),
            category_ids=np.array([a["category_id"] for a in anns], dtype=np.int32),
            annotation_ids=np.array([a["id"] for a in anns], dtype=np.int64),
        )
        for name, anns in grouped.items()
    }


def test_box_prompts_equal_sam_model_and_processor(network, checkpoints, shapes, images):
    prompts = coco_prompts(shapes)
    names = sorted(p.name for p in shapes.images_dir.glob("*.png"))[:4]
    wanted = [prompts[name] for name in names]
    model = build_sam(str(checkpoints[0]), points_per_batch=2)  # boxes decoded two at a time
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    results = run(model, images, wanted)
    for image, prompt, ours in zip(images, wanted, results):
        inputs = processor(images=image, input_boxes=[prompt.boxes.tolist()], return_tensors="pt")
        with torch.inference_mode():
            output = network(**inputs, multimask_output=False)
        (masks,) = processor.post_process_masks(output.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
        assert_same_masks(ours, masks[:, 0].numpy(), output.iou_scores[0, :, 0].tolist())
        assert [s.category_id for s in ours] == prompt.category_ids.tolist()
        assert [s.annotation_id for s in ours] == prompt.annotation_ids.tolist()
    assert sum(len(r) for r in results) >= 4


def test_score_threshold_cuts_predicted_ious_which_are_not_probabilities(checkpoints, shapes, images):
    from rayseg.models.registry import check_score_threshold

    prompts = coco_prompts(shapes)
    wanted = [prompts[name] for name in sorted(p.name for p in shapes.images_dir.glob("*.png"))[:4]]
    scores = sorted(s.score for segments in run(build_sam(str(checkpoints[0])), images, wanted) for s in segments)
    assert len(set(scores)) >= 4, "the comparison needs spread-out scores"
    for cut in (scores[len(scores) // 2], scores[0] - 1.0):  # a cut below 0 is a real choice for IoU predictions
        kept = run(build_sam(str(checkpoints[0]), score_threshold=cut), images, wanted)
        assert sorted(s.score for segments in kept for s in segments) == [s for s in scores if s >= cut]  # inclusive
    check_score_threshold("sam", -3.0)  # any number: the driver takes it
    with pytest.raises(ValueError, match="score_threshold must be 0 to 1"):
        check_score_threshold("maskrcnn", -3.0)


def test_images_without_prompts_get_no_segments_and_bad_boxes_are_refused(checkpoints, images):
    model = build_sam(str(checkpoints[0]))
    box = Prompts(np.array([[4, 4, 30, 30]], np.float32), np.array([2], np.int32), np.array([-1], np.int64))
    empty = Prompts(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64))
    results = run(model, images[:3], [None, box, empty])
    assert results[0] == [] and results[2] == []
    assert len(results[1]) == 1 and results[1][0].annotation_id is None and results[1][0].category_id == 2
    for bad in ([4, 4, 4, 30], [4, 4, np.nan, 30], [30, 4, 4, 30]):
        prompt = Prompts(np.array([bad], np.float32), np.array([1], np.int32), np.array([17], np.int64))
        with pytest.raises(ValueError, match="invalid box prompt for annotation 17"):
            model.preprocess(images[:1], prompts=[prompt])


def test_categories_label_prompted_output_and_automatic_mode_refuses_them(checkpoints, shapes, images):
    model = build_sam(str(checkpoints[0]), category_file=str(shapes.instances_json))
    assert [c.name for c in model.categories] == ["circle", "square", "triangle"]
    with pytest.raises(ValueError, match="categories for box prompts"):
        model.preprocess(images[:1])
    with pytest.raises(ValueError, match="not both"):
        build_sam(str(checkpoints[0]), categories=["a"], category_file=str(shapes.instances_json))


# --- checkpoints -----------------------------------------------------------------------------


def test_segment_anything_pth_loads_to_the_same_model_as_the_hf_directory(network, checkpoints, images, shapes):
    directory, pth = checkpoints
    sa_state = torch.load(pth, weights_only=True)
    assert set(convert_state_dict(sa_state)) == set(network.state_dict()), "the two mappings are inverses"
    config = infer_config(sa_state).vision_config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size) == (32, 2, 4, 64)
    assert (config.patch_size, config.window_size, list(config.global_attn_indexes), config.mlp_dim) == (8, 4, [1], 64)
    from_pth = build_sam(str(pth), target_size=64, points_per_side=POINTS, **AUTOMATIC)
    from_hf = build_sam(str(directory), points_per_side=POINTS, **AUTOMATIC)
    for name, value in from_hf.network.state_dict().items():
        assert torch.equal(value, from_pth.network.state_dict()[name]), name
    for a, b in zip(run(from_pth, images[:2]), run(from_hf, images[:2])):
        assert [s.score for s in a] == [s.score for s in b] and all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    prompt = coco_prompts(shapes)["000000.png"]
    a, b = run(from_pth, images[:1], [prompt]), run(from_hf, images[:1], [prompt])
    assert [s.score for s in a[0]] == [s.score for s in b[0]]
    assert from_pth.weights_sha256 and from_pth.weights_sha256 != from_hf.weights_sha256


def test_pth_model_type_must_match_the_file(checkpoints):
    with pytest.raises(WeightsError, match="does not"):
        build_sam(str(checkpoints[1]), model_type="vit_b")
    with pytest.raises(ValueError, match="model_type must be one of"):
        build_sam(str(checkpoints[1]), model_type="vit_x")


class _Payload:
    """Creates `marker` when unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_a_pickle_payload_pth_is_refused_without_running_it(tmp_path):
    live = tmp_path / "live.pth"
    torch.save({"weight": _Payload(tmp_path / "proof")}, live)
    torch.load(live, weights_only=False)  # the payload is real: unpickling runs it
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": _Payload(marker)}, checkpoint)
    with pytest.raises(WeightsError, match="weights_only"):
        build_sam(str(checkpoint))
    assert not marker.exists()


def test_sha256_is_checked_and_bad_directories_are_clear_errors(checkpoints, tmp_path):
    directory, pth = checkpoints
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        build_sam(str(directory), weights_sha256="0" * 64)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        build_sam(str(pth), weights_sha256="0" * 64)
    with pytest.raises(WeightsError, match="config.json not found"):
        build_sam(str(tmp_path))
    with pytest.raises(WeightsError, match="weights not found"):
        build_sam(str(tmp_path / "missing.pth"))
    assert sam_weights_file(str(directory)) == f"{directory}/model.safetensors"
    assert sam_weights_file(str(pth)) == str(pth)


def test_hf_directory_loads_from_an_fsspec_uri(checkpoints, images):
    directory, _ = checkpoints
    fs = fsspec.filesystem("memory")
    for path in directory.iterdir():
        fs.pipe(f"/sam-remote/{path.name}", path.read_bytes())
    remote = build_sam("memory://sam-remote", points_per_side=POINTS, **AUTOMATIC)
    local = build_sam(str(directory), points_per_side=POINTS, **AUTOMATIC)
    assert remote.weights_sha256 == local.weights_sha256
    assert remote.target_size == 64, "the checkpoint's own preprocessor config came along"
    a, b = run(remote, images[:1]), run(local, images[:1])
    assert [s.score for s in a[0]] == [s.score for s in b[0]]


def test_random_weights_are_a_small_seeded_config_and_logged(caplog, images):
    with caplog.at_level(logging.WARNING, logger="rayseg.models"):
        first, second = build_sam("random", points_per_side=4), build_sam("random", points_per_side=4)
    assert "RANDOM WEIGHTS" in caplog.text
    assert first.network.config.vision_config.hidden_size == RANDOM_CONFIG["vision_config"]["hidden_size"]
    assert first.target_size == 256
    for a, b in zip(first.network.parameters(), second.network.parameters()):
        assert torch.equal(a, b)
    (segments,) = run(first, images[:1])
    assert all(s.mask.shape == (64, 64) for s in segments)


def test_registry_lists_sam_with_its_options():
    entry = get_entry("sam")
    assert entry.task == "promptable" and entry.weights_file("x/sam_vit_h.pth") == "x/sam_vit_h.pth"
    options = entry.options.model_fields
    for name in ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                 "crops_n_layers", "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area",
                 "model_type", "target_size", "categories"):  # fmt: skip
        assert name in options
    with pytest.raises(ValueError, match="option points_per_side must be at least 1, got 0"):
        build_sam("random", points_per_side=0)


# --- through the Ray pipeline ------------------------------------------------------------------


def test_automatic_mode_through_the_ray_pipeline(ray_cluster, checkpoints, shapes, tmp_path, automatic):
    source = read_source(str(shapes.images_dir), limit=4)
    spec = ModelSpec("sam", str(checkpoints[0]), options={"points_per_side": POINTS, **AUTOMATIC})
    rows = segment(source, spec, plan_resources(ray.cluster_resources(), batch_size=3))
    summary = write_run(rows, str(tmp_path / "out"), run_id="sam", run_info={"model": "sam"})
    assert (summary.images, summary.ok, summary.error) == (4, 4, 0)
    from pycocotools import mask as mask_utils

    for row in pq.read_table(tmp_path / "out").to_pylist():
        image = np.asarray(Image.open(shapes.images_dir / row["image_id"]).convert("RGB"))
        (expected,) = run(automatic, [image])
        assert len(row["segments"]) == len(expected)
        for got, want in zip(row["segments"], expected):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": got["rle"]}).astype(bool)
            assert np.array_equal(mask, want.mask) and got["score"] == pytest.approx(want.score, abs=1e-6)
            assert got["label"] == "object" and got["category_id"] == 1 and got["annotation_id"] is None
