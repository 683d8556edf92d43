"""SAM 2: a tiny random checkpoint directory saved here loads offline through the registry;
automatic masks equal transformers' own pieces run directly (Sam2Processor, Sam2Model, the
image processor's crop, filter and NMS helpers) on a mixed-size batch, and transformers'
mask-generation pipeline itself on square images; box prompts equal Sam2Model + Sam2Processor
per image; a prediction does not depend on its batch neighbours; the model runs through the
Ray pipeline; another family's checkpoint (or SAM 2's own .pt) is refused with a clear message.

The one difference from transformers, on purpose (models/sam2.py): the automatic point grid
is scaled per axis to SAM 2's square input, as Sam2Processor scales prompts, where
generate_crop_boxes keeps SAM's longest-side rule. The mixed-size reference therefore makes
each crop's grid in its pixels and hands it to Sam2Processor; for square crops the two rules
agree, and there the pipeline is the reference.

The model is a tiny random SAM 2 (a 5-block Hiera of widths 8-64 on 64×64 inputs). Random
weights give masks that do not depend on the image; the test network's decoder is widened,
its prompt and image positional encodings are made one (SAM 2 encodes both with one layer;
transformers initialises its two copies apart) and its high-resolution features amplified, so that masks follow the image
and several distinct ones survive the filters (mask_threshold 0.3, stability offset 0.1).
"""

from __future__ import annotations

import json
import logging

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from transformers import (
    Sam2Config,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    SamConfig,
    SamModel,
    pipeline,
)
from transformers.models.sam2.image_processing_sam2 import (
    _batched_mask_to_box,
    _build_point_grid,
)

from rayseg.models.base import Prompts
from rayseg.models.registry import check_options, check_score_threshold, get_entry
from rayseg.models.sam import OBJECT
from rayseg.models.sam2 import RANDOM_CONFIG, build_sam2
from rayseg.models.weights import WeightsError
from rayseg.pipeline.resources import plan_resources
from rayseg.pipeline.segment import ModelSpec, pin_weights, segment
from rayseg.pipeline.sink import write_run
from rayseg.pipeline.sources import read_source

from .test_maskformer import assert_independent_of_batch_neighbours
from .test_sam import TINY as SAM_TINY
from .test_sam import coco_prompts, images, run  # noqa: F401 (images: a fixture; mixed sizes, see CROPS there)

SIZE = 64  # the tiny model's square input
TINY = {
    "vision_config": {
        "backbone_config": {
            "model_type": "sam2_hiera_det_model", "hidden_size": 8, "image_size": [SIZE, SIZE],
            "embed_dim_per_stage": [8, 16, 32, 64], "num_attention_heads_per_stage": [1, 1, 2, 2],
            "blocks_per_stage": [1, 1, 2, 1], "global_attention_blocks": [3], "window_size_per_stage": [4, 4, 4, 2],
            "window_positional_embedding_background_size": [4, 4],
        },
        "backbone_channel_list": [64, 32, 16, 8], "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
        "fpn_hidden_size": 32,
    },
    "prompt_encoder_config": {"hidden_size": 32, "image_size": SIZE, "patch_size": 16, "mask_input_channels": 8},
    "mask_decoder_config": {
        "hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "iou_head_hidden_dim": 32,
    },
}  # fmt: skip

# Automatic-mode settings under which the random model keeps several masks per image.
AUTOMATIC = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.02, "stability_score_offset": 0.1, "mask_threshold": 0.3}
POINTS = 10  # points per side: 300 candidate masks per image
BATCH = 64  # points per mask-decoder call, ours and the references'


def tiny_network() -> Sam2Model:
    torch.manual_seed(1)
    network = Sam2Model(Sam2Config(**TINY)).eval()
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if parameter.dim() > 1 and not name.startswith("vision_encoder"):
                parameter.normal_(0, 0.3)
        network.prompt_encoder.shared_embedding.positional_embedding.copy_(network.shared_image_embedding.positional_embedding)
        network.mask_decoder.conv_s0.weight.mul_(20)
        network.mask_decoder.conv_s1.weight.mul_(20)
    return network


def image_processor() -> Sam2ImageProcessor:
    return Sam2ImageProcessor(size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def network():
    return tiny_network()


@pytest.fixture(scope="module")
def checkpoint(network, tmp_path_factory):
    """The tiny model as a transformers directory, with its image processor's settings."""
    directory = tmp_path_factory.mktemp("sam2")
    network.save_pretrained(directory)
    image_processor().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def automatic(checkpoint):
    return get_entry("sam2").build(str(checkpoint), device="cpu", points_per_side=POINTS, points_per_batch=BATCH, **AUTOMATIC)


def assert_equal_masks(segments, masks, scores, boxes=None) -> None:
    """Masks exactly, scores within 1e-5, and the masks' boxes the reference's."""
    assert len(segments) == len(masks)
    for segment_, mask, score in zip(segments, masks, scores):
        mask = np.asarray(mask, dtype=bool)
        assert segment_.mask.dtype == bool and np.array_equal(segment_.mask, mask)
        assert segment_.score == pytest.approx(float(score), abs=1e-5)
    if boxes is not None and len(segments):
        ours = _batched_mask_to_box(torch.from_numpy(np.stack([s.mask for s in segments])))
        assert torch.equal(ours, torch.as_tensor(boxes).to(ours.dtype))


def transformers_automatic(network, image, points_per_side, crops_n_layers=0, **filters):
    """Automatic masks from transformers' own pieces, run directly on one image: the image
    processor's generate_crop_boxes (crops), each crop's grid in its pixels scaled by
    Sam2Processor with the crop's pixels, Sam2Model on the points BATCH at a time,
    post_process_masks, filter_masks and post_process_for_mask_generation (one NMS)."""
    processor = Sam2Processor(image_processor())
    crop_boxes, _, crops, _ = processor.image_processor.generate_crop_boxes(
        torch.from_numpy(image).permute(2, 0, 1), SIZE, crops_n_layers, 512 / 1500, points_per_side, 1
    )
    rles, scores, boxes = [], [], []
    for crop_box, crop in zip(crop_boxes, crops):
        height, width = crop.shape[-2:]
        points = _build_point_grid(points_per_side) * torch.tensor([width, height])
        inputs = processor(
            images=crop.permute(1, 2, 0).numpy(), input_points=[[[p] for p in points.tolist()]],
            input_labels=[[[1]] * len(points)], return_tensors="pt",
        )  # fmt: skip
        with torch.inference_mode():
            embeddings = network.get_image_embeddings(inputs["pixel_values"])
            for start in range(0, len(points), BATCH):
                output = network(
                    image_embeddings=embeddings,
                    input_points=inputs["input_points"][:, start : start + BATCH],
                    input_labels=inputs["input_labels"][:, start : start + BATCH],
                )
                masks = processor.post_process_masks(
                    output.pred_masks, inputs["original_sizes"], mask_threshold=filters["mask_threshold"], binarize=False
                )
                kept = processor.image_processor.filter_masks(
                    masks[0], output.iou_scores[0], image.shape[:2], crop_box, filters["pred_iou_thresh"],
                    filters["stability_score_thresh"], filters["mask_threshold"], filters["stability_score_offset"],
                )  # fmt: skip
                rles.extend(kept[0])
                scores.append(kept[1])
                boxes.append(kept[2])
    masks, scores, _, boxes = processor.image_processor.post_process_for_mask_generation(
        rles, torch.cat(scores), torch.cat(boxes), 0.7
    )
    return [m.numpy() for m in masks], scores, boxes


# --- loading ---------------------------------------------------------------------------------


def test_a_checkpoint_directory_saved_here_loads_offline_through_the_registry(network, checkpoint, automatic):
    from rayseg.models.weights import file_sha256

    assert automatic.name == "sam2" and automatic.task == "promptable" and automatic.target_size == SIZE
    assert automatic.weights_sha256 == file_sha256(str(checkpoint / "model.safetensors"))
    for name, value in network.state_dict().items():
        assert torch.equal(value, automatic.network.state_dict()[name]), name
    assert get_entry("sam2").weights_file(str(checkpoint), None) == f"{checkpoint}/model.safetensors"


def test_a_directory_from_an_fsspec_uri_or_with_only_a_processor_config_loads_the_same(checkpoint, tmp_path, images):
    """Sam2Processor.save_pretrained writes processor_config.json (the image processor nested), not preprocessor_config.json."""
    fs = fsspec.filesystem("memory")
    for path in checkpoint.iterdir():
        fs.pipe(f"/sam2-remote/{path.name}", path.read_bytes())
    nested = tmp_path / "nested"
    Sam2Model.from_pretrained(checkpoint).save_pretrained(nested)
    Sam2Processor(image_processor()).save_pretrained(nested)
    assert not (nested / "preprocessor_config.json").exists() and (nested / "processor_config.json").exists()
    expected = run(build_sam2(str(checkpoint), points_per_side=4, **AUTOMATIC), images[:1])
    for weights in ("memory://sam2-remote", str(nested)):
        model = build_sam2(weights, points_per_side=4, **AUTOMATIC)
        assert model.processor.size["height"] == SIZE
        got = run(model, images[:1])
        assert [s.score for s in got[0]] == [s.score for s in expected[0]]


def test_random_weights_are_a_small_seeded_config_and_logged(caplog, images):
    with caplog.at_level(logging.WARNING, logger="rayseg.models"):
        first, second = build_sam2("random", points_per_side=4), build_sam2("random", points_per_side=4)
    assert "RANDOM WEIGHTS: model 'sam2'" in caplog.text
    assert first.target_size == RANDOM_CONFIG["prompt_encoder_config"]["image_size"] == 128
    for a, b in zip(first.network.parameters(), second.network.parameters()):
        assert torch.equal(a, b)
    (segments,) = run(first, images[1:2])
    assert all(s.mask.shape == (64, 48) for s in segments)


# --- automatic mode --------------------------------------------------------------------------


def test_automatic_masks_equal_transformers_run_directly_on_a_mixed_size_batch(network, automatic, images):
    batched = run(automatic, images)  # one call for all four images
    compared = 0
    for image, ours in zip(images, batched):
        masks, scores, boxes = transformers_automatic(network, image, POINTS, **AUTOMATIC)
        assert_equal_masks(ours, masks, scores, boxes)
        assert all(s.category_id == OBJECT.id and s.annotation_id is None for s in ours)
        compared += len(ours)
    assert compared >= 10, "the comparison must cover several masks"
    assert max(len(s) for s in batched) < POINTS * POINTS * 3 / 10, "NMS and the filters did remove masks"


def test_with_a_crop_layer_automatic_masks_equal_transformers_run_directly(network, checkpoint, tmp_path):
    """A 96×128 image, 1 crop layer (the image and 4 crops, none square). transformers runs one
    NMS over every crop's masks; box_nms_thresh=1 turns our per-crop NMS off to compare that."""
    from rayseg.jobs.fixtures import make_fixtures

    fixtures = make_fixtures(tmp_path, images=1, size=(96, 128), seed=0)
    image = np.array(Image.open(sorted(fixtures.images_dir.glob("*.png"))[0]).convert("RGB"))
    model = build_sam2(str(checkpoint), points_per_side=6, crops_n_layers=1, box_nms_thresh=1.0, **AUTOMATIC)
    (ours,) = run(model, [image])
    assert_equal_masks(ours, *transformers_automatic(network, image, 6, crops_n_layers=1, **AUTOMATIC))
    assert len(ours) >= 3


def test_on_square_images_automatic_masks_equal_transformers_mask_generation_pipeline(network, automatic, images):
    generator = pipeline("mask-generation", model=network, image_processor=image_processor(), device="cpu")
    square = [images[0], np.ascontiguousarray(images[3][:56, :56])]
    for image, ours in zip(square, run(automatic, square)):
        reference = generator(
            Image.fromarray(image), points_per_crop=POINTS, points_per_batch=BATCH, crops_nms_thresh=0.7,
            output_bboxes_mask=True, **AUTOMATIC,
        )  # fmt: skip
        assert_equal_masks(ours, reference["masks"], reference["scores"], reference["bounding_boxes"])
        assert len(ours) >= 2


def test_the_point_grid_covers_a_non_square_crop_where_generate_crop_boxes_leaves_a_band(automatic, images):
    """The difference from transformers, on purpose: a 64×48 image is resized to 64×64, so its
    grid must span the whole square; generate_crop_boxes' longest-side rule spans 48 of 64."""
    tall = torch.from_numpy(images[1]).permute(2, 0, 1)
    crops, _ = automatic._crops(tall)
    ours = crops[0].points
    _, theirs, _, _ = automatic.processor.generate_crop_boxes(tall, SIZE, 0, 512 / 1500, POINTS, 1)
    assert ours[:, 0].max() == pytest.approx(SIZE * (1 - 1 / (2 * POINTS)), abs=1e-4)
    assert ours[:, 1].max() == pytest.approx(SIZE * (1 - 1 / (2 * POINTS)), abs=1e-4)
    assert theirs[0, :, 0, 0].max() == pytest.approx(48 * (1 - 1 / (2 * POINTS)), abs=1e-4)


def test_crop_point_downscaling_and_small_region_removal_run(checkpoint, images):
    model = build_sam2(
        str(checkpoint), points_per_side=8, crops_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=12, **AUTOMATIC
    )
    crops, _ = model._crops(torch.from_numpy(images[0]).permute(2, 0, 1))
    assert [len(c.points) for c in crops] == [64] + [16] * 4
    segments = [(image, s) for image, found in zip(images, run(model, images[:2])) for s in found]
    assert segments
    assert all(s.mask.shape == image.shape[:2] for image, s in segments)
    from scipy import ndimage

    # Islands (8-connected) below the area are gone, unless one alone is the whole mask.
    islands = [np.bincount(ndimage.label(s.mask, np.ones((3, 3)))[0].ravel())[1:] for _, s in segments]
    assert all(len(sizes) == 1 or sizes.min() >= 12 for sizes in islands)


@pytest.mark.parametrize("encoder_batch_size", [None, 4])
def test_a_prediction_does_not_depend_on_its_batch_neighbours(checkpoint, encoder_batch_size):
    """On the CPU one image per encoder call by default; stacked four at a time too."""
    model = build_sam2(str(checkpoint), points_per_side=6, encoder_batch_size=encoder_batch_size, **AUTOMATIC)
    assert_independent_of_batch_neighbours(model)


# --- prompted mode ---------------------------------------------------------------------------


def test_box_prompts_equal_sam2_model_and_processor_run_directly_per_image(network, checkpoint, shapes, images):
    prompts = coco_prompts(shapes)
    wanted = [prompts[name] for name in sorted(p.name for p in shapes.images_dir.glob("*.png"))[:4]]
    processor = Sam2Processor(image_processor())
    results = run(build_sam2(str(checkpoint)), images, wanted)
    for image, prompt, ours in zip(images, wanted, results):
        inputs = processor(images=image, input_boxes=[prompt.boxes.tolist()], return_tensors="pt")
        with torch.inference_mode():
            output = network(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
        (masks,) = processor.post_process_masks(output.pred_masks, inputs["original_sizes"])
        assert_equal_masks(ours, masks[:, 0].numpy(), output.iou_scores[0, :, 0].tolist())
        assert [s.category_id for s in ours] == prompt.category_ids.tolist()
        assert [s.annotation_id for s in ours] == prompt.annotation_ids.tolist()
    assert sum(len(r) for r in results) >= 4
    chunked = run(build_sam2(str(checkpoint), points_per_batch=2), images, wanted)  # boxes decoded two at a time
    assert [[s.annotation_id for s in r] for r in chunked] == [[s.annotation_id for s in r] for r in results]
    assert [s.score for r in chunked for s in r] == pytest.approx([s.score for r in results for s in r], abs=1e-5)


def test_images_without_prompts_get_no_segments_and_bad_boxes_are_refused(checkpoint, images):
    model = build_sam2(str(checkpoint), categories=[{"id": 2, "name": "thing"}])
    box = Prompts(np.array([[4, 4, 30, 30]], np.float32), np.array([2], np.int32), np.array([-1], np.int64))
    empty = Prompts(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64))
    results = run(model, images[:3], [None, box, empty])
    assert results[0] == [] and results[2] == []
    assert len(results[1]) == 1 and results[1][0].annotation_id is None and results[1][0].category_id == 2
    assert 0 < results[1][0].score < 1, "SAM 2's predicted IoU is a sigmoid"
    for bad in ([4, 4, 4, 30], [4, 4, np.nan, 30], [30, 4, 4, 30]):
        prompt = Prompts(np.array([bad], np.float32), np.array([1], np.int32), np.array([17], np.int64))
        with pytest.raises(ValueError, match="invalid box prompt for annotation 17"):
            model.preprocess(images[:1], prompts=[prompt])
    with pytest.raises(ValueError, match="categories for box prompts"):
        model.preprocess(images[:1])


# --- the registry and the driver's checks -----------------------------------------------------


def test_the_registry_lists_sam2_with_sams_options_less_the_pth_and_padding_ones():
    entry, sam = get_entry("sam2"), get_entry("sam")
    assert entry.task == "promptable" and entry.cpu_parallelism == sam.cpu_parallelism
    assert set(sam.options.model_fields) - set(entry.options.model_fields) == {"model_type", "vit_num_heads", "target_size"}
    assert set(entry.options.model_fields) < set(sam.options.model_fields)
    with pytest.raises(ValueError, match="model 'sam2'.*option points_per_side must be at least 1, got 0"):
        check_options("sam2", {"points_per_side": 0})
    with pytest.raises(ValueError, match="model 'sam2' does not take option.s. target_size"):
        check_options("sam2", {"target_size": 32})
    check_score_threshold("sam2", 0.5)
    with pytest.raises(ValueError, match="score_threshold must be 0 to 1"):
        check_score_threshold("sam2", -1.0)


def test_another_familys_checkpoint_or_a_sam2_pt_is_refused_with_a_clear_message(checkpoint, tmp_path):
    sam = tmp_path / "sam1"
    SamModel(SamConfig(**SAM_TINY)).save_pretrained(sam)
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "sam2"
    with pytest.raises(WeightsError, match=r"model 'sam2' cannot run weights .*sam1: it holds a 'sam' checkpoint, not 'sam2'"):
        pin_weights(ModelSpec("sam2", str(sam)))
    with pytest.raises(WeightsError, match=r"model 'sam' cannot run weights .*: it holds a 'sam2' checkpoint, not 'sam'"):
        pin_weights(ModelSpec("sam", str(checkpoint)))
    with pytest.raises(WeightsError, match="holds a 'sam' checkpoint, not 'sam2'"):
        build_sam2(str(sam))
    assert pin_weights(ModelSpec("sam2", str(checkpoint))).weights_sha256
    with pytest.raises(ValueError, match="model 'sam2': SAM 2's own .pt checkpoints are not read"):
        check_options("sam2", {}, "s3://bucket/sam2.1_hiera_tiny.pt")
    with pytest.raises(WeightsError, match="SAM 2's own .pt checkpoints are not read"):
        build_sam2(str(tmp_path / "sam2.1_hiera_tiny.pt"))


# --- through the Ray pipeline ------------------------------------------------------------------


def test_automatic_mode_through_the_ray_pipeline(ray_cluster, checkpoint, shapes, tmp_path, automatic):
    from pycocotools import mask as mask_utils

    source = read_source(str(shapes.images_dir), limit=4)
    spec = ModelSpec("sam2", str(checkpoint), options={"points_per_side": POINTS, "points_per_batch": BATCH, **AUTOMATIC})
    rows = segment(source, spec, plan_resources(ray.cluster_resources(), batch_size=3))
    summary = write_run(rows, str(tmp_path / "out"), run_id="sam2", run_info={"model": "sam2"})
    assert (summary.images, summary.ok, summary.error) == (4, 4, 0)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert {row["model"] for row in rows} == {"sam2"}
    pictures = [np.asarray(Image.open(shapes.images_dir / row["image_id"]).convert("RGB")) for row in rows]
    expected = run(automatic, pictures)  # the model run here, on each row's image
    assert sum(map(len, expected)), "the pipeline run must produce masks"
    for row, want in zip(rows, expected):
        size = [row["height"], row["width"]]
        assert [(s["label"], s["category_id"], s["annotation_id"]) for s in row["segments"]] == [("object", 1, None)] * len(want)
        assert [s["score"] for s in row["segments"]] == pytest.approx([w.score for w in want], abs=1e-6)
        for got, mask in zip(row["segments"], (w.mask for w in want)):
            assert np.array_equal(mask_utils.decode({"size": size, "counts": got["rle"]}).astype(bool), mask)
