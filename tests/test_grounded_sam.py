"""Grounded SAM: a tiny random Grounding DINO checkpoint directory (with its processor and
tokenizer) and tiny SAM and SAM 2 directories, saved here and loaded offline. Specified:

- boxes and scores equal transformers' GroundingDinoForObjectDetection +
  GroundingDinoProcessor.post_process_grounded_object_detection run directly, one image at
  a time, on a batch of mixed sizes, field by field; each box's category is the one phrase
  whose tokens carry its highest logit, and text_threshold drops a box whose phrase is not
  above it;
- where the category differs from transformers' decoded text labels on purpose (a label
  that joins phrases, or holds a separator; models/grounded_sam.py), and where it is the same
  (a label that is one whole phrase), on outputs made to show each case;
- masks equal SamModel + SamProcessor (SAM 2: Sam2Model + Sam2Processor) run directly on
  the detector's boxes; a segment's box and score are the detector's;
- a prediction does not depend on its batch neighbours;
- categories are the phrases, ids in order or a category file's;
- `--weights random` (with the byte tokenizer on BERT's ids, which counts a prompt's tokens
  as the driver does) runs through the Ray pipeline;
- the driver refuses, before any work, a joined prompt longer than the checkpoint's
  max_text_len, a real detector with a random segmenter, and another family's checkpoint.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import (
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    SamImageProcessor,
    SamModel,
    SamProcessor,
)
from transformers.models.grounding_dino.modeling_grounding_dino import (
    GroundingDinoObjectDetectionOutput,
)

from rayseg.models.grounded_sam import (
    RANDOM_CONFIG,
    build_grounded_sam,
    detect,
    random_parts,
)
from rayseg.models.registry import check_options
from rayseg.models.text_prompts import (
    BERT_SPECIAL_IDS,
    bert_byte_tokenizer,
    byte_tokenizer,
    joined_prompt,
)
from rayseg.models.weights import RANDOM, WeightsError
from rayseg.pipeline.segment import ModelSpec, pin_weights

from .test_maskformer import assert_independent_of_batch_neighbours, images
from .test_sam import tiny_network as tiny_sam
from .test_sam2 import SIZE as SAM2_SIZE
from .test_sam2 import tiny_network as tiny_sam2

# Mixed sizes: the first and last share a processed shape (one detector call of two images).
SIZES = [(40, 56), (64, 48), (30, 30), (40, 56)]
PHRASES = ["circle", "square", "red triangle"]
PROMPT = joined_prompt(PHRASES)  # "circle. square. red triangle."
# The test detector's scores lie about 0.6-0.85 (see `checkpoints`): this keeps some boxes
# and drops others.
THRESHOLD = 0.7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """The random detector (its decoder's last norm scaled down, so that scores spread
    across THRESHOLD instead of all being ~1) with its processor and tokenizer.json; a tiny
    SAM and a tiny SAM 2 with their image processors."""
    root = tmp_path_factory.mktemp("grounded-sam")
    network, processor = random_parts()
    with torch.no_grad():
        network.model.decoder.layer_norm.weight.mul_(0.1)
        network.model.decoder.layer_norm.bias.mul_(0.1)
    network.save_pretrained(root / "detector")
    processor.save_pretrained(root / "detector")
    tiny_sam().save_pretrained(root / "sam")
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(root / "sam")
    tiny_sam2().save_pretrained(root / "sam2")
    Sam2ImageProcessor(size={"height": SAM2_SIZE, "width": SAM2_SIZE}).save_pretrained(root / "sam2")
    return {name: str(root / name) for name in ("detector", "sam", "sam2")}


def build(checkpoints, segmenter: str = "sam", **options):
    return build_grounded_sam(
        checkpoints["detector"], segmenter=segmenter, segmenter_weights=checkpoints[segmenter],
        **{"text": PHRASES, "score_threshold": THRESHOLD, **options},
    )  # fmt: skip


def run(model, batch):
    return model.postprocess(model.forward(model.preprocess(batch)), [image.shape[:2] for image in batch])


def reference_detections(directory: str, batch: list[np.ndarray]) -> list[tuple[dict, torch.Tensor, object]]:
    """transformers run directly, as a user's loop does: one image at a time, the joined
    prompt. Per image: (post-processed result, probabilities (Q, T) over the prompt's
    tokens, the prompt's token encoding)."""
    processor = GroundingDinoProcessor.from_pretrained(directory)
    network = GroundingDinoForObjectDetection.from_pretrained(directory).eval()
    references = []
    for image in batch:
        inputs = processor(images=image, text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            outputs = network(**inputs)
        (result,) = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=THRESHOLD, target_sizes=[image.shape[:2]]
        )
        tokens = inputs["input_ids"].shape[1]
        references.append((result, outputs.logits[0, :, :tokens].sigmoid(), processor.tokenizer(PROMPT)))
    return references


def phrase_tokens(encoding, phrase_index: int) -> list[int]:
    """The token positions of a phrase's characters (char_to_token), written independently
    of the model's offsets."""
    start = sum(len(p) + 2 for p in PHRASES[:phrase_index])
    positions = {encoding.char_to_token(c) for c in range(start, start + len(PHRASES[phrase_index]))}
    return sorted(p for p in positions if p is not None)


def test_boxes_and_scores_equal_transformers_run_directly_per_image_on_a_mixed_size_batch(checkpoints):
    batch = images(SIZES)
    counted = {"kept": 0, "dropped": 0, "top token a separator": 0, "cut by text_threshold": 0}
    references = reference_detections(checkpoints["detector"], batch)  # its boxes do not depend on text_threshold
    for text_threshold in (0.0, 0.62):
        mine = run(build(checkpoints, text_threshold=text_threshold), batch)
        for segments, (result, probs, encoding) in zip(mine, references):
            kept = torch.nonzero(probs.max(-1).values > THRESHOLD).flatten().tolist()
            phrase_probs = torch.stack([probs[:, phrase_tokens(encoding, i)].max(-1).values for i in range(len(PHRASES))], -1)
            # transformers' boxes, less those whose best phrase is not above text_threshold.
            ours = [i for i, query in enumerate(kept) if phrase_probs[query].max() > text_threshold]
            got = list(segments)
            assert len(got) == len(ours)
            for segment, i in zip(got, ours):
                query = kept[i]
                np.testing.assert_allclose(segment.box, result["boxes"][i].numpy(), atol=1e-4)
                assert segment.score == pytest.approx(float(result["scores"][i]), abs=1e-5)
                assert segment.category_id == int(phrase_probs[query].argmax()) + 1
                counted["top token a separator"] += int(probs[query].max() > phrase_probs[query].max())
            counted["kept"] += len(got)
            counted["dropped"] += probs.shape[0] - len(kept)
            counted["cut by text_threshold"] += len(kept) - len(ours)
    assert all(counted.values()), f"each case must occur: {counted}"


def synthetic_outputs(tokenizer, rows: list[dict]) -> tuple[GroundingDinoObjectDetectionOutput, torch.Tensor]:
    """Detector outputs for one image, one query per row: row {token text or phrase index:
    probability}, every other prompt token at 0.05; -inf past the prompt as the model pads."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    encoding = tokenizer(PROMPT)
    probs = torch.full((1, len(rows), RANDOM_CONFIG["max_text_len"]), 0.0)
    probs[..., : ids.shape[1]] = 0.05
    for query, row in enumerate(rows):
        for key, value in row.items():
            positions = phrase_tokens(encoding, key) if isinstance(key, int) else [encoding.tokens().index(key)]
            probs[0, query, positions] = value
    logits = torch.logit(probs).masked_fill(probs == 0, float("-inf"))
    boxes = torch.tensor([[[0.5, 0.5, 0.2 + 0.1 * q, 0.3] for q in range(len(rows))]])
    return GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes), ids


def test_a_box_names_one_phrase_where_transformers_text_label_joins_phrases_or_holds_a_separator(checkpoints):
    """transformers decodes every token above text_threshold; here the best phrase is the category."""
    model = build(checkpoints)
    processor = model.processor
    rows = [
        {1: 0.9},  # one whole phrase: transformers' label is it, and so is ours
        {0: 0.6, 2: 0.8},  # two phrases: transformers joins them; ours is the better one
        {"[SEP]": 0.95, 0: 0.5},  # a separator on top: the same score, ours names the phrase
        {".": 0.9},  # only a separator: transformers keeps a box naming no phrase; ours drops it
    ]
    outputs, ids = synthetic_outputs(processor.tokenizer, rows)
    (theirs,) = processor.post_process_grounded_object_detection(outputs, ids, threshold=0.25, text_threshold=0.25, target_sizes=[(40, 60)])
    assert theirs["text_labels"][0] == "square"
    assert theirs["text_labels"][1] == "circlered triangle"  # the byte tokenizer's decoding; BERT's spaces them
    assert "[SEP]" in theirs["text_labels"][2] and "circle" in theirs["text_labels"][2]
    assert theirs["text_labels"][3] == "."
    (ours,) = detect(
        outputs.logits, outputs.pred_boxes, [(40, 60)], model.owner, model.category_ids,
        score_threshold=0.25, text_threshold=0.25, max_detections=100,
    )  # fmt: skip
    assert ours.category_ids.tolist() == [2, 3, 1]
    torch.testing.assert_close(ours.scores, theirs["scores"][:3])
    torch.testing.assert_close(ours.boxes, theirs["boxes"][:3])


def test_max_detections_keeps_the_best_scoring_boxes_in_query_order(checkpoints):
    model = build(checkpoints)
    outputs, _ = synthetic_outputs(model.processor.tokenizer, [{0: 0.5}, {1: 0.9}, {2: 0.7}, {0: 0.8}])
    (found,) = detect(
        outputs.logits, outputs.pred_boxes, [(40, 60)], model.owner, model.category_ids,
        score_threshold=0.25, text_threshold=0.25, max_detections=2,
    )  # fmt: skip
    assert found.category_ids.tolist() == [2, 1] and found.scores.tolist() == pytest.approx([0.9, 0.8])


def sam_reference(segmenter: str, directory: str, image: np.ndarray, boxes: list) -> np.ndarray:
    """The segmenter run directly on `boxes`: bool masks (K, H, W)."""
    if segmenter == "sam":
        processor = SamProcessor(SamImageProcessor.from_pretrained(directory))
        network = SamModel.from_pretrained(directory).eval()
    else:
        processor = Sam2Processor(Sam2ImageProcessor.from_pretrained(directory))
        network = Sam2Model.from_pretrained(directory).eval()
    inputs = processor(images=image, input_boxes=[boxes], return_tensors="pt")
    with torch.inference_mode():
        output = network(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False)
    extra = [inputs["reshaped_input_sizes"]] if segmenter == "sam" else []
    (masks,) = processor.post_process_masks(output.pred_masks, inputs["original_sizes"], *extra)
    return masks[:, 0].numpy()


@pytest.mark.parametrize("segmenter", ["sam", "sam2"])
def test_masks_equal_the_segmenter_run_directly_on_the_detectors_boxes(checkpoints, segmenter):
    batch = images(SIZES, seed=2)
    mine = run(build(checkpoints, segmenter=segmenter), batch)
    assert sum(map(len, mine)) >= 4
    for image, segments in zip(batch, mine):
        if not len(segments):
            continue
        boxes = segments.boxes.tolist()
        masks = sam_reference(segmenter, checkpoints[segmenter], image, boxes)
        host = segments.on_host()
        assert host.masks.dtype == bool and host.masks.shape == (len(boxes), *image.shape[:2])
        np.testing.assert_array_equal(host.masks, masks)
        assert segments.annotation_ids is None, "no box came from an annotation"
    distinct = {mask.tobytes() for segments in mine for mask in segments.on_host().masks}
    assert len(distinct) >= 3, "masks must differ to compare"


def test_a_prediction_never_depends_on_its_batch_neighbours(checkpoints):
    assert_independent_of_batch_neighbours(build(checkpoints))


def test_categories_are_the_phrases_in_order_or_a_category_files_and_phrases_it_lacks_are_refused(checkpoints, tmp_path):
    assert [(c.id, c.name, c.isthing) for c in build(checkpoints).categories] == [
        (1, "circle", True), (2, "square", True), (3, "red triangle", True)
    ]  # fmt: skip
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps({"categories": [{"id": 5, "name": "square"}, {"id": 9, "name": "Circle"}]}))
    model = build(checkpoints, text=["circle", "square"], category_file=str(categories))
    assert [(c.id, c.name) for c in model.categories] == [(9, "circle"), (5, "square")]
    assert model.prompt == "circle. square."
    segments = run(model, images(SIZES[:2]))
    assert {int(c) for s in segments for c in s.category_ids} <= {5, 9} and sum(map(len, segments))
    from_file = build_grounded_sam(checkpoints["detector"], segmenter_weights=checkpoints["sam"], category_file=str(categories))
    assert [(c.id, c.name) for c in from_file.categories] == [(5, "square"), (9, "Circle")]
    with pytest.raises(ValueError, match="the category file names no category 'bicycle'"):
        build(checkpoints, text=["circle", "bicycle"], category_file=str(categories))


def test_each_phrase_owns_the_tokens_of_its_characters_and_a_phrase_of_separators_is_refused(checkpoints):
    model = build(checkpoints)
    tokens = model.processor.tokenizer(PROMPT).tokens()
    owned = [[t for t, owner in zip(tokens, model.owner.tolist()) if owner == i] for i in range(len(PHRASES))]
    assert ["".join(t).replace("Ġ", " ") for t in owned] == PHRASES
    assert {t for t, owner in zip(tokens, model.owner.tolist()) if owner == len(PHRASES)} == {"[CLS]", ".", "Ġ", "[SEP]"}
    with pytest.raises(ValueError, match=r"phrase '\?' has no token of its own"):
        build(checkpoints, text=["circle", "?"])


def test_the_random_tokenizer_has_berts_special_ids_and_counts_tokens_as_the_driver_does():
    tokenizer, counted = bert_byte_tokenizer(), byte_tokenizer()
    for prompt in (PROMPT, "Straße? İstanbul. ünï", "a" * 300):
        assert len(tokenizer.encode(prompt).ids) == len(counted.encode(prompt).ids) == len(prompt.lower().encode()) + 2
    assert tokenizer.encode("a. b?").ids[0] == 101 and tokenizer.encode("a. b?").ids[-1] == 102
    assert {tokenizer.token_to_id(t) for t in BERT_SPECIAL_IDS} == set(BERT_SPECIAL_IDS.values())


def test_random_weights_build_the_tiny_config_and_other_checkpoints_are_refused(checkpoints, tmp_path):
    model = build_grounded_sam(RANDOM, text=["circle"])
    assert model.network.config.num_queries == RANDOM_CONFIG["num_queries"] and model.segmenter.name == "sam"
    assert build_grounded_sam(RANDOM, text=["circle"], segmenter="sam2").segmenter.name == "sam2"
    with pytest.raises(ValueError, match="give the segmenter's checkpoint"):
        check_options("grounded-sam", {"text": ["circle"]}, checkpoints["detector"])
    with pytest.raises(WeightsError, match="give the segmenter's checkpoint"):
        build_grounded_sam(checkpoints["detector"], text=["circle"])
    with pytest.raises(ValueError, match="SAM 2's own .pt checkpoints are not read"):
        check_options("grounded-sam", {"text": ["circle"], "segmenter": "sam2", "segmenter_weights": "s3://b/sam2.pt"}, RANDOM)
    (tmp_path / "config.json").write_text('{"model_type": "sam"}')
    with pytest.raises(WeightsError, match="'sam' checkpoint, not 'grounding-dino'"):
        build_grounded_sam(str(tmp_path), text=["circle"], segmenter_weights=checkpoints["sam"])


def test_the_driver_refuses_a_joined_prompt_longer_than_the_checkpoints_max_text_len_before_any_work(checkpoints, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(checkpoints["detector"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_text_len": 20}))
    options = {"segmenter_weights": checkpoints["sam"]}
    pinned = pin_weights(ModelSpec("grounded-sam", str(short), options={**options, "text": ["circle", "square"]}))
    assert pinned.weights_sha256  # "circle. square." is 17 tokens
    with pytest.raises(WeightsError, match=r"'circle\. square\. red triangle\.' is 31 tokens long; the model's text encoder takes 20"):
        pin_weights(ModelSpec("grounded-sam", str(short), options={**options, "text": PHRASES}))
    with pytest.raises(ValueError, match="is 31 tokens long; the model's text encoder takes 20"):
        build_grounded_sam(str(short), text=PHRASES, **options)  # the builder too, not a silent truncation
    long = [f"phrase number {i}" for i in range(20)]  # 349 bytes joined
    with pytest.raises(WeightsError, match="is 351 tokens long; the model's text encoder takes 256"):
        pin_weights(ModelSpec("grounded-sam", RANDOM, options={"text": long}))
    assert pin_weights(ModelSpec("grounded-sam", RANDOM, options={"text": long[:5]})).weights == RANDOM


def test_through_the_ray_pipeline_random_weights_find_each_phrase_as_a_category(ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    import ray
    from pycocotools import mask as mask_utils

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import segment
    from rayseg.pipeline.sink import write_run

    items = [{"image_id": f"img{i}", "image": image} for i, image in enumerate(images(SIZES[:3], seed=5))]
    spec = ModelSpec("grounded-sam", RANDOM, options={"text": PHRASES})
    write_run(segment(ray.data.from_items(items), spec, plan_resources(ray.cluster_resources())), str(tmp_path / "out"), run_id="gs", run_info={})
    local = build_grounded_sam(RANDOM, text=PHRASES)
    by_id = {item["image_id"]: item["image"] for item in items}
    found = 0
    for row in pq.read_table(tmp_path / "out").to_pylist():
        assert row["status"] == "ok" and row["model"] == "grounded-sam"
        (expected,) = run(local, [by_id[row["image_id"]]])
        assert [(s["category_id"], s["label"]) for s in row["segments"]] == [(e.category_id, PHRASES[e.category_id - 1]) for e in expected]
        for segment_row, want in zip(row["segments"], expected):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": segment_row["rle"]}).astype(bool)
            np.testing.assert_array_equal(mask, want.mask)
            x0, y0, x1, y1 = want.box  # the detector's box, xywh in the output
            np.testing.assert_allclose(segment_row["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
            assert segment_row["score"] == pytest.approx(want.score, abs=1e-5)
        found += len(expected)
    assert found, "the pipeline run must find instances"
