"""SAM 3: a tiny random checkpoint directory (with its processor and tokenizer) loaded
offline; text prompts and box exemplars equal transformers' processor and network run
directly, one image and one phrase at a time, on a mixed-size batch; a prediction never
depends on its batch neighbours; the text encoder runs once per model; through the Ray
pipeline each phrase is a category of the output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayseg.models.base import Prompts
from rayseg.models.sam3 import RANDOM_CONFIG, build_sam3, random_parts

from .test_maskformer import assert_independent_of_batch_neighbours, images

SIZES = [(40, 56), (64, 48), (30, 30), (64, 64)]
PHRASES = ["circle", "square", "red triangle"]
# The random queries score about 0.25 (sigmoid of ~0 logits × presence): sharper class
# scores (below) and a low threshold keep instances to compare.
THRESHOLD = 0.2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("sam3")
    network, processor = random_parts()
    with torch.no_grad():  # spread the scores, so the threshold is crossed both ways
        for parameter in network.dot_product_scoring.parameters():
            parameter.mul_(6)
    network.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def reference(directory: str, image: np.ndarray, phrase: str, boxes: list | None = None) -> dict:
    """transformers run directly, as a user's loop does: one image, one phrase."""
    from transformers import Sam3Model, Sam3Processor

    processor = Sam3Processor.from_pretrained(directory)
    network = Sam3Model.from_pretrained(directory).eval()
    extra = {} if boxes is None else {"input_boxes": [boxes], "input_boxes_labels": [[1] * len(boxes)]}
    encoded = processor(images=image, text=phrase, return_tensors="pt", **extra)
    with torch.no_grad():
        outputs = network(**encoded)
    (result,) = processor.post_process_instance_segmentation(
        outputs, threshold=THRESHOLD, mask_threshold=0.5, target_sizes=[image.shape[:2]]
    )
    return result


def check_equal(segments, expected: list[tuple[int, dict]]) -> None:
    """Our segments of one image against the reference's results, phrase after phrase."""
    want = [(category_id, i) for category_id, result in expected for i in range(len(result["scores"]))]
    got = list(segments)
    assert [s.category_id for s in got] == [category_id for category_id, _ in want]
    for segment, (category_id, i) in zip(got, want):
        result = dict(expected)[category_id]
        np.testing.assert_array_equal(segment.mask, result["masks"][i].numpy().astype(bool))
        assert segment.score == pytest.approx(float(result["scores"][i]), abs=1e-5)
        np.testing.assert_allclose(segment.box, result["boxes"][i].numpy(), atol=1e-3)


def test_text_prompts_equal_transformers_per_image_and_phrase_on_a_mixed_size_batch(checkpoint):
    batch = images(SIZES)
    model = build_sam3(checkpoint, text=PHRASES, score_threshold=THRESHOLD)
    mine = model.postprocess(model.forward(model.preprocess(batch)), SIZES)
    assert sum(len(segments) for segments in mine), "the random weights must give instances to compare"
    for image, segments in zip(batch, mine):
        check_equal(segments, [(index + 1, reference(checkpoint, image, phrase)) for index, phrase in enumerate(PHRASES)])


def test_box_exemplars_join_their_categorys_phrase_as_transformers_takes_boxes_with_text(checkpoint):
    batch = images(SIZES[:2])
    prompts = [
        Prompts(np.array([[4, 4, 30, 20], [10, 12, 40, 36]], np.float32), np.array([2, 2], np.int32), np.array([7, 8])),
        None,
    ]
    model = build_sam3(checkpoint, text=PHRASES[:2], score_threshold=THRESHOLD)
    mine = model.postprocess(model.forward(model.preprocess(batch, prompts=prompts)), SIZES[:2])
    boxes = prompts[0].boxes.tolist()
    check_equal(mine[0], [(1, reference(checkpoint, batch[0], "circle")), (2, reference(checkpoint, batch[0], "square", boxes))])
    check_equal(mine[1], [(index + 1, reference(checkpoint, batch[1], phrase)) for index, phrase in enumerate(PHRASES[:2])])


def test_boxes_of_a_category_without_a_phrase_are_prompted_as_visual_exemplars(checkpoint):
    (image,) = images(SIZES[:1])
    prompts = [Prompts(np.array([[4, 4, 30, 20]], np.float32), np.array([9], np.int32), np.array([-1]))]
    model = build_sam3(checkpoint, text=["circle"], score_threshold=THRESHOLD)
    (segments,) = model.postprocess(model.forward(model.preprocess([image], prompts=prompts)), SIZES[:1])
    check_equal(segments, [(1, reference(checkpoint, image, "circle")), (9, reference(checkpoint, image, "visual", [[4, 4, 30, 20]]))])


def test_an_invalid_exemplar_box_fails_its_image_naming_the_annotation(checkpoint):
    model = build_sam3(checkpoint, text=["circle"])
    bad = Prompts(np.array([[10, 10, 5, 20]], np.float32), np.array([1], np.int32), np.array([42]))
    with pytest.raises(ValueError, match="invalid box prompt for annotation 42"):
        model.preprocess(images(SIZES[:1]), prompts=[bad])


def test_a_prediction_never_depends_on_its_batch_neighbours(checkpoint):
    assert_independent_of_batch_neighbours(build_sam3(checkpoint, text=PHRASES, score_threshold=THRESHOLD))


def test_the_text_encoder_runs_once_per_model_not_per_image(checkpoint):
    model = build_sam3(checkpoint, text=PHRASES, score_threshold=THRESHOLD)
    calls = []
    model.network.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    model.postprocess(model.forward(model.preprocess(images(SIZES))), SIZES)
    assert calls == [], "the phrases were encoded when the model was built"
    assert model.text_features.shape[:2] == (len(PHRASES) + 1, 32)  # the phrases and "visual"


def test_phrases_take_the_ids_of_a_category_file_and_phrases_it_lacks_are_refused(checkpoint, tmp_path):
    import json

    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps({"categories": [{"id": 5, "name": "square"}, {"id": 9, "name": "Circle"}]}))
    model = build_sam3(checkpoint, text=["circle", "square"], category_file=str(categories))
    assert [(c.id, c.name) for c in model.categories] == [(9, "circle"), (5, "square")]
    assert [(c.id, c.name) for c in build_sam3(checkpoint, category_file=str(categories)).categories] == [(5, "square"), (9, "Circle")]
    with pytest.raises(ValueError, match="the category file names no category 'bicycle'"):
        build_sam3(checkpoint, text=["circle", "bicycle"], category_file=str(categories))


def test_random_weights_are_the_tiny_config_and_a_checkpoint_of_another_family_is_refused(checkpoint, tmp_path):
    from rayseg.models.weights import WeightsError

    model = build_sam3("random", text=["circle"])
    assert model.network.config.detr_decoder_config.num_queries == RANDOM_CONFIG["detr_decoder_config"]["num_queries"]
    (tmp_path / "config.json").write_text('{"model_type": "sam"}')
    with pytest.raises(WeightsError, match="sam"):
        build_sam3(str(tmp_path), text=["circle"])


def test_through_the_ray_pipeline_each_phrase_is_a_category_of_the_output(checkpoint, ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    import ray
    from pycocotools import mask as mask_utils

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run

    items = [{"image_id": f"img{i}", "image": image} for i, image in enumerate(images(SIZES[:3], seed=5))]
    spec = ModelSpec("sam3", checkpoint, score_threshold=THRESHOLD, options={"text": PHRASES})
    write_run(segment(ray.data.from_items(items), spec, plan_resources(ray.cluster_resources())), str(tmp_path / "out"), run_id="sam3", run_info={})
    local = build_sam3(checkpoint, text=PHRASES, score_threshold=THRESHOLD)
    by_id = {item["image_id"]: item["image"] for item in items}
    found = 0
    for row in pq.read_table(tmp_path / "out").to_pylist():
        assert row["status"] == "ok" and row["model"] == "sam3"
        (expected,) = local.postprocess(local.forward(local.preprocess([by_id[row["image_id"]]])), [(row["height"], row["width"])])
        assert [(s["category_id"], s["label"]) for s in row["segments"]] == [(e.category_id, PHRASES[e.category_id - 1]) for e in expected]
        for segment_row, want in zip(row["segments"], expected):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": segment_row["rle"]}).astype(bool)
            np.testing.assert_array_equal(mask, want.mask)
            x0, y0, x1, y1 = want.box
            np.testing.assert_allclose(segment_row["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
        found += len(expected)
    assert found, "the pipeline run must find instances"
