"""Box prompts: read from a COCO json or a committed run, attached to images by image_id, and
through the real Ray pipeline to SAM — every image keeps exactly one row."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from pycocotools import mask as mask_utils
from transformers import SamImageProcessor
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.models.base import Prompts
from rayseg.models.sam import build_sam
from rayseg.pipeline.prompts import (
    PROMPT_ERROR,
    PromptError,
    attach_prompts,
    group_prompts,
    load_prompts,
)
from rayseg.pipeline.resources import plan_resources
from rayseg.pipeline.schema import OUTPUT_SCHEMA
from rayseg.pipeline.segment import ModelSpec, segment
from rayseg.pipeline.sink import RUN_FILE, write_run
from rayseg.pipeline.sources import read_source

from .test_sam import tiny_network  # the same tiny SAM


@pytest.fixture(scope="module")
def sam_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sam-prompts")
    tiny_network().save_pretrained(directory)
    SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def prompts_json(shapes, tmp_path_factory):
    """The shapes fixture's annotations for its first 6 images, plus: a malformed box on image
    3, an annotation of an image that is not in the input (id 999), and images 5 and 6 left
    without any annotation."""
    data = json.loads(shapes.instances_json.read_text())
    data["images"] = data["images"][:6]
    keep = {image["id"] for image in data["images"][:4]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    bad = dict(data["annotations"][0], id=9001, image_id=3, bbox=[10.0, 10.0, 0.0, 5.0])
    stray = dict(data["annotations"][0], id=9002, image_id=999)
    data["annotations"] += [bad, stray]
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_prompts_are_boxes_in_xyxy_keyed_by_image_id(prompts_json):
    table, categories = load_prompts(str(prompts_json))
    data = json.loads(prompts_json.read_text())
    rows = {row["image_id"]: row for row in table.to_pylist()}
    assert set(rows) == {"1", "2", "3", "4", "999"}
    for annotation in data["annotations"]:
        row = rows[str(annotation["image_id"])]
        index = row["prompt_annotation_ids"].index(annotation["id"])
        x, y, w, h = annotation["bbox"]
        assert row["prompt_boxes"][index] == pytest.approx([x, y, x + w, y + h])
        assert row["prompt_category_ids"][index] == annotation["category_id"]
    assert rows["3"][PROMPT_ERROR].startswith("invalid prompt: annotation 9001: bbox [10.0, 10.0, 0.0, 5.0] has width or height ≤ 0")
    assert rows["1"][PROMPT_ERROR] is None
    assert [c.name for c in categories] == ["circle", "square", "triangle"]


def test_malformed_boxes_are_reported_per_image():
    boxes = pa.table(
        {
            "image_id": ["a", "a", "b", "c", "d", "e"],
            "bbox": [[0, 0, 4, 4], [1, 2, 3], [0, 0, math.inf, 2], [0, 0, 2, 2], None, [0, 0, 1, 1]],
            "category_id": [1, 1, 1, None, 2, 3],
            "annotation_id": [1, 2, 3, 4, 5, None],
        }
    )
    rows = {row["image_id"]: row for row in group_prompts(boxes).to_pylist()}
    assert rows["a"][PROMPT_ERROR] == "invalid prompt: annotation 2: bbox [1.0, 2.0, 3.0] is not 4 numbers [x, y, w, h]"
    assert all(math.isnan(v) for v in rows["a"]["prompt_boxes"][1])
    assert "annotation 3: bbox [0.0, 0.0, inf, 2.0] is not finite" in rows["b"][PROMPT_ERROR]
    assert rows["c"][PROMPT_ERROR] == "invalid prompt: annotation 4 has no integer category_id"
    assert "annotation 5: bbox None is not 4 numbers" in rows["d"][PROMPT_ERROR]
    assert rows["e"][PROMPT_ERROR] is None and rows["e"]["prompt_annotation_ids"] == [-1]
    # Whatever reaches SAM from an invalid image is refused by SAM too.
    model = build_sam("random")
    for image_id in "abcd":
        row = rows[image_id]
        prompt = Prompts(np.array(row["prompt_boxes"], np.float32), np.array(row["prompt_category_ids"]), np.array(row["prompt_annotation_ids"]))
        with pytest.raises(ValueError, match="invalid box prompt"):
            model.preprocess([np.zeros((8, 8, 3), np.uint8)], prompts=[prompt])


def test_prompt_columns_are_the_ones_the_inference_actor_reads():
    import subprocess
    import sys

    from rayseg.pipeline import inference, prompts

    assert inference.PROMPT_COLUMNS is prompts.PROMPT_COLUMNS
    # The lookup tasks import this module: it must not pull in torch and every model.
    code = "import sys, rayseg.pipeline.prompts; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_sources_that_are_not_prompts_are_clear_errors(tmp_path):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PromptError, match="not a COCO json"):
        load_prompts(str(tmp_path / "list.json"))
    with pytest.raises(PromptError, match="neither a COCO json nor a committed rayseg run"):
        load_prompts(str(tmp_path))


def test_prompts_from_a_committed_run(tmp_path):
    """A run's ok rows' segments prompt with their bbox, category and annotation id (-1: none)."""
    def segment_(category_id, label, bbox, annotation_id):
        return {"category_id": category_id, "label": label, "score": 0.9, "bbox": bbox, "area": 4, "rle": "x",
                "segment_id": None, "iscrowd": False, "annotation_id": annotation_id}  # fmt: skip

    rows = [
        {"image_id": "a", "uri": None, "width": 8, "height": 8, "status": "ok", "error": None, "model": "sam",
         "segments": [segment_(1, "cat", [1, 2, 3, 4], 7), segment_(2, "dog", [0, 0, 2, 2], None)]},
        {"image_id": "b", "uri": None, "width": 8, "height": 8, "status": "error", "error": "x", "model": "sam", "segments": []},
        {"image_id": "c", "uri": None, "width": 8, "height": 8, "status": "ok", "error": None, "model": "sam", "segments": []},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), tmp_path / "part-00000.parquet")
    (tmp_path / RUN_FILE).write_text(json.dumps({"status": "complete", "files": ["part-00000.parquet"]}))
    table, categories = load_prompts(str(tmp_path))
    assert table.to_pylist() == [
        {"image_id": "a", "prompt_boxes": [[1, 2, 4, 6], [0, 0, 2, 2]], "prompt_category_ids": [1, 2],
         "prompt_annotation_ids": [7, -1], PROMPT_ERROR: None}
    ]  # fmt: skip
    assert [(c.id, c.name) for c in categories] == [(1, "cat"), (2, "dog")]


def test_attach_prompts_keeps_every_image_and_counts_strays(ray_cluster, shapes, prompts_json):
    images = read_source(str(prompts_json), image_root=str(shapes.images_dir))
    attached, report = attach_prompts(images, str(prompts_json))
    assert (report.images, report.invalid_images, report.matched_images, report.unmatched_images) == (5, 1, 4, 1)
    assert report.unmatched_boxes == 1 and report.unmatched_examples == ("999",)
    rows = sorted(attached.take_all(), key=lambda row: int(row["image_id"]))
    assert [row["image_id"] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[4]["prompt_boxes"] == [] and rows[5]["prompt_boxes"] == [] and rows[5]["prompt_error"] is None
    assert rows[0]["prompt_error"] is None and "annotation 9001" in rows[2]["prompt_error"]
    assert report.boxes == sum(len(row["prompt_boxes"]) for row in rows) + report.unmatched_boxes


def test_prompts_read_beforehand_are_named_by_their_source_in_warnings(ray_cluster, shapes, prompts_json, caplog):
    images = read_source(str(prompts_json), image_root=str(shapes.images_dir))
    table, _ = load_prompts(str(prompts_json))
    logger = logging.getLogger("rayseg.pipeline.prompts")
    logger.addHandler(caplog.handler)  # the CLI's logging setup may stop propagation to the root
    try:
        _, report = attach_prompts(images, table, name=str(prompts_json))
    finally:
        logger.removeHandler(caplog.handler)
    assert report.source == str(prompts_json)
    assert f"(1 boxes) of {prompts_json} are not in the input" in caplog.text


def _check_prompted_output(rows, prompts_json, images_by_id, model):
    data = json.loads(prompts_json.read_text())
    by_image: dict[str, list] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(str(annotation["image_id"]), []).append(annotation)
    assert sorted(rows) == ["1", "2", "3", "4", "5", "6"]
    assert rows["3"]["status"] == "error" and "annotation 9001" in rows["3"]["error"] and rows["3"]["segments"] == []
    for image_id in ("5", "6"):
        assert rows[image_id]["status"] == "ok" and rows[image_id]["segments"] == []
    for image_id in ("1", "2", "4"):
        row, annotations = rows[image_id], by_image[image_id]
        assert row["status"] == "ok"
        assert [s["annotation_id"] for s in row["segments"]] == [a["id"] for a in annotations]
        assert [s["category_id"] for s in row["segments"]] == [a["category_id"] for a in annotations]
        assert all(s["label"] in ("circle", "square", "triangle") for s in row["segments"])
        prompt = Prompts(
            np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)], np.float32),
            np.array([a["category_id"] for a in annotations]), np.array([a["id"] for a in annotations]),
        )  # fmt: skip
        image = images_by_id[image_id]
        (expected,) = model.postprocess(model.forward(model.preprocess([image], prompts=[prompt])), [image.shape[:2]])
        for got, want in zip(row["segments"], expected):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": got["rle"]}).astype(bool)
            assert np.array_equal(mask, want.mask) and got["score"] == pytest.approx(want.score, abs=1e-4)


def test_prompted_sam_through_the_ray_pipeline_on_decoded_images(ray_cluster, shapes, prompts_json, sam_directory, tmp_path):
    data = json.loads(prompts_json.read_text())
    images_by_id = {str(i["id"]): np.array(Image.open(shapes.images_dir / i["file_name"]).convert("RGB")) for i in data["images"]}
    items = [{"image_id": image_id, "image": image} for image_id, image in images_by_id.items()]
    attached, report = attach_prompts(ray.data.from_items(items), str(prompts_json))
    spec = ModelSpec("sam", str(sam_directory), options={"categories": report.category_dicts(), "points_per_batch": 2})
    rows = segment(attached, spec, plan_resources(ray.cluster_resources(), batch_size=4), decoded=True)
    output = tmp_path / "out"
    summary = write_run(rows, str(output), run_id="prompted", run_info={"model": "sam"})
    assert (summary.images, summary.ok, summary.error) == (6, 5, 1)
    table = pq.read_table(output)
    assert table.schema.equals(OUTPUT_SCHEMA)
    model = build_sam(str(sam_directory), categories=report.category_dicts(), points_per_batch=2)
    _check_prompted_output({row["image_id"]: row for row in table.to_pylist()}, prompts_json, images_by_id, model)
    # This run, read back as prompts, prompts with its masks' boxes and annotation ids.
    again, categories = load_prompts(str(output))
    by_id = {row["image_id"]: row for row in again.to_pylist()}
    assert set(by_id) == {"1", "2", "4"}
    assert {c.name for c in categories} <= {"circle", "square", "triangle"}
    for row in table.to_pylist():
        if row["segments"] and row["image_id"] in by_id:
            assert by_id[row["image_id"]]["prompt_annotation_ids"] == [s["annotation_id"] for s in row["segments"]]
            for box, segment_ in zip(by_id[row["image_id"]]["prompt_boxes"], row["segments"]):
                x, y, w, h = segment_["bbox"]
                assert box == pytest.approx([x, y, x + w, y + h])


def test_segment_command_with_prompts_relabels_a_coco_json(ray_cluster, shapes, prompts_json, sam_directory, tmp_path):
    data = json.loads(prompts_json.read_text())
    images_by_id = {str(i["id"]): np.array(Image.open(shapes.images_dir / i["file_name"]).convert("RGB")) for i in data["images"]}
    output = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "segment", str(prompts_json), str(output), "--model", "sam", "--weights", str(sam_directory),
        "--image-root", str(shapes.images_dir), "--prompts", str(prompts_json), "--batch-size", "4",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((output / RUN_FILE).read_text())
    assert (run["counts"]["images"], run["counts"]["ok"], run["counts"]["error"]) == (6, 5, 1)
    assert run["prompts"]["source"] == str(prompts_json)
    assert (run["prompts"]["matched_images"], run["prompts"]["unmatched_images"], run["prompts"]["invalid_images"]) == (4, 1, 1)
    rows = {row["image_id"]: row for row in pq.read_table(output).to_pylist()}
    assert rows["3"]["error"].startswith("bad prompts:")
    # The prompt source's categories name the masks, as the command passes them to the model.
    categories = [{"id": c["id"], "name": c["name"], "isthing": bool(c.get("isthing", 1))} for c in data["categories"]]
    model = build_sam(str(sam_directory), categories=categories)
    _check_prompted_output(rows, prompts_json, images_by_id, model)


def test_prompts_are_refused_before_any_work_when_unusable(shapes, prompts_json, tmp_path):
    arguments = ["segment", str(shapes.images_dir), str(tmp_path / "out"), "--weights", "random"]
    result = CliRunner().invoke(app, [*arguments, "--model", "unet", "--prompts", str(prompts_json)])
    assert result.exit_code == 2 and "takes no prompts" in result.output and "sam" in result.output
    result = CliRunner().invoke(app, [*arguments, "--model", "sam", "--prompts", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "not found" in result.output
    assert not (tmp_path / "out").exists()
