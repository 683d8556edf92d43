"""`export panoptic`: COCO panoptic PNGs + json that decode back to the predicted segments,
with PNG names that never leave DIR."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.pipeline.evaluation import evaluate_predictions
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.panoptic_export import (
    decode_ids,
    encode_ids,
    export_panoptic,
    png_name,
)
from rayseg.pipeline.schema import OUTPUT_SCHEMA

from .test_evaluation_panoptic import edited, panopticapi_reference, perturbed_panoptic  # noqa: F401 (edited: a fixture)

H, W = 20, 30


def segment(mask, category_id, score, segment_id=None, label=None):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    return {
        "category_id": category_id, "label": label or f"cat{category_id}", "score": score,
        "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
        "area": int(mask.sum()), "rle": rle["counts"].decode(), "segment_id": segment_id, "iscrowd": False,
        "annotation_id": None,
    }  # fmt: skip


def row(image_id, segments, status="ok"):
    return {
        "image_id": image_id, "uri": f"file:///{image_id}", "width": W, "height": H, "status": status,
        "error": None if status == "ok" else "decode failed", "model": "mask2former", "segments": segments,
    }  # fmt: skip


def panoptic_masks():
    sky = np.zeros((H, W), bool)
    sky[:8] = True
    person = np.zeros((H, W), bool)
    person[10:18, 3:9] = True
    car = np.zeros((H, W), bool)
    car[12:19, 15:28] = True
    return [(sky, 7, 0.9, 1), (person, 1, 0.8, 2), (car, 3, 0.7, 5)]


def write_predictions(directory, rows, **run):
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), directory / "part-0.parquet")
    (directory / "_run.json").write_text(json.dumps({"status": "complete", "files": ["part-0.parquet"], **run}))


def exported_isthing(tmp_path, **run) -> dict[int, int]:
    """category id → isthing in the panoptic.json of a run of `panoptic_masks` (its `_run.json` holding `run`)."""
    write_predictions(tmp_path / "run", [row("1", [segment(m, c, s, i) for m, c, s, i in panoptic_masks()])], **run)
    export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"))
    return {c["id"]: c["isthing"] for c in json.loads((tmp_path / "pan" / "panoptic.json").read_text())["categories"]}


def test_a_semantic_run_s_classes_are_exported_as_stuff(tmp_path):
    assert exported_isthing(tmp_path, model="unet", spec={"model": {"options": {}}}) == {1: 0, 3: 0, 7: 0}


def test_an_instance_or_panoptic_run_s_classes_are_exported_as_things(tmp_path):
    assert exported_isthing(tmp_path, model="unet", spec={"model": {"options": {"task": "instance"}}}) == {1: 1, 3: 1, 7: 1}


def test_isthing_comes_from_the_category_file_the_run_s_model_was_given(tmp_path):
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "sky", "isthing": False}]))
    run = {"model": "mask2former", "spec": {"model": {"options": {"category_file": str(categories)}}}}
    assert exported_isthing(tmp_path, **run) == {1: 1, 3: 1, 7: 0}


def test_round_trip_png_ids_and_json_match_the_segments(tmp_path):
    masks = panoptic_masks()
    # An instance-style row too: overlapping masks, no segment ids.
    a = np.zeros((H, W), bool)
    a[2:12, 2:12] = True
    b = np.zeros((H, W), bool)
    b[6:16, 6:16] = True
    hidden = np.zeros((H, W), bool)
    hidden[7:9, 7:9] = True  # inside the better-scored b: no pixels left, dropped
    rows = [
        row("42", [segment(m, c, s, i) for m, c, s, i in masks]),
        row("scene.jpg", [segment(a, 1, 0.6), segment(b, 1, 0.9), segment(hidden, 3, 0.1)]),
        row("broken.png", [], status="error"),
    ]
    predictions = tmp_path / "out"
    write_predictions(predictions, rows)
    (predictions / "_staging").mkdir()
    pq.write_table(pa.Table.from_pylist([row("uncommitted", [])], schema=OUTPUT_SCHEMA), predictions / "_staging" / "x.parquet")
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "sky", "isthing": False}]))

    summary = export_panoptic(str(predictions), str(tmp_path / "pan"), category_file=str(categories))
    assert (summary.images, summary.error_rows, summary.dropped_segments) == (2, 1, 1)

    document = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    # A numeric id is kept; a file-name id is numbered above it and kept as rayseg_image_id.
    assert [(image["id"], image["file_name"], image["rayseg_image_id"]) for image in document["images"]] == [
        (42, "42", "42"), (43, "scene.jpg", "scene.jpg"),
    ]  # fmt: skip
    assert document["categories"] == [
        {"id": 1, "name": "cat1", "isthing": 1}, {"id": 3, "name": "cat3", "isthing": 1}, {"id": 7, "name": "cat7", "isthing": 0},
    ]  # fmt: skip
    first, second = document["annotations"]
    assert first["file_name"] == "42.png" and second["file_name"] == "scene.png"

    ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / "42.png").convert("RGB")))
    assert set(np.unique(ids)) == {0, 1, 2, 5}
    by_id = {info["id"]: info for info in first["segments_info"]}
    for mask, category_id, _, segment_id in masks:
        assert (ids == segment_id).sum() == mask.sum() and ((ids == segment_id) == mask).all()
        info = by_id[segment_id]
        ys, xs = np.nonzero(mask)
        assert info == {
            "id": segment_id, "category_id": category_id, "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)], "iscrowd": 0,
        }  # fmt: skip

    ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / "scene.png")))
    infos = {info["id"]: info for info in second["segments_info"]}
    assert sorted(infos) == [1, 2]  # ids 1..N in row order; segment 3 had no pixels left
    assert ((ids == 2) == b).all(), "the better-scored segment keeps the overlap"
    assert ((ids == 1) == (a & ~b)).all()
    assert infos[1]["area"] == int((a & ~b).sum()) and infos[2]["area"] == int(b.sum())
    assert len(os.listdir(tmp_path / "pan" / "panoptic")) == 2


def test_ids_above_255_use_all_three_channels():
    ids = np.array([[0, 1, 256, 65536 + 256 * 3 + 7]], dtype=np.uint32)
    rgb = encode_ids(ids)
    assert rgb[0, 3].tolist() == [7, 3, 1]
    assert (decode_ids(rgb) == ids).all()


def test_hostile_image_ids_stay_inside_dir(tmp_path):
    hostile = ["../../etc/x", "/abs/path.png", "..", "a/../../b.png", "sub\\dir.png", "x.png", "x.jpg", " spaced id "]
    mask = np.zeros((H, W), bool)
    mask[:5, :5] = True
    predictions = tmp_path / "out"
    write_predictions(predictions, [row(i, [segment(mask, 1, 0.5, 1)]) for i in hostile])
    out = tmp_path / "nested" / "pan"
    summary = export_panoptic(str(predictions), str(out))
    assert summary.images == len(hostile)
    written = sorted(os.listdir(out / "panoptic"))
    assert len(written) == len(hostile), "every image its own file"
    document = json.loads((out / "panoptic.json").read_text())
    assert sorted(a["file_name"] for a in document["annotations"]) == written
    for name in written:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".png")
    # Nothing was written anywhere but DIR.
    everything = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files}
    assert {p for p in everything if not p.startswith(("out", os.path.join("nested", "pan")))} == set()
    assert png_name("../../etc/x") == png_name("../../etc/x") and ".." not in png_name("../../etc/x")


def test_rayseg_export_panoptic_writes_the_export_and_refuses_missing_predictions(tmp_path):
    mask = np.ones((H, W), bool)
    predictions = tmp_path / "out"
    write_predictions(predictions, [row("1", [segment(mask, 2, 0.5, 1)])])
    result = CliRunner().invoke(app, ["export", "panoptic", str(predictions), str(tmp_path / "pan")])
    assert result.exit_code == 0, result.output
    assert "1 PNGs" in result.output
    result = CliRunner().invoke(app, ["export", "panoptic", str(tmp_path / "missing"), str(tmp_path / "pan2")])
    assert result.exit_code == 2
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(app, ["export", "panoptic", str(predictions), str(tmp_path / "a-file")])
    assert result.exit_code == 2 and "a-file is a file: name the directory" in " ".join(result.output.split())


def test_an_image_id_in_two_rows_is_exported_once_from_its_first_ok_row(tmp_path):
    (sky, sky_id, score, segment_id), (person, person_id, *_) = panoptic_masks()[:2]
    rows = [row("a", [], status="error"), row("a", [segment(sky, sky_id, score, 1)]), row("a", [segment(person, person_id, score, 1)])]
    write_predictions(tmp_path / "run", rows)
    summary = export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"))
    assert (summary.images, summary.error_rows, summary.duplicate_rows) == (1, 1, 1)
    (annotation,) = json.loads((tmp_path / "pan" / "panoptic.json").read_text())["annotations"]
    assert [info["category_id"] for info in annotation["segments_info"]] == [sky_id]
    ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / annotation["file_name"]).convert("RGB")))
    assert (ids != 0).sum() == sky.sum(), "the PNG is the first row's, not overwritten by the second"


# --- ids and file names that panopticapi and pycocotools users find ------------------------------


def exported(directory) -> dict:
    return json.loads((directory / "panoptic.json").read_text())


def images_and_annotations(document: dict) -> tuple[list, list]:
    """What pq_compute pairs and reads: each image's (id, file_name, width, height) and each
    annotation's (image_id, file_name)."""
    images = [(i["id"], i["file_name"], i["width"], i["height"]) for i in document["images"]]
    return images, [(a["image_id"], a["file_name"]) for a in document["annotations"]]


def test_pq_computed_as_panopticapi_does_on_the_export_equals_rayseg_evaluate(edited, tmp_path):
    fixtures, gt, _, gt_dir = edited
    # COCO's layout: images are .jpg, their panoptic PNGs the same names with .png.
    gt = {**gt, "images": [{**image, "file_name": image["file_name"].replace(".png", ".jpg")} for image in gt["images"]]}
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(gt))
    rows, _ = perturbed_panoptic(gt, gt_dir, seed=3, pred_dir=tmp_path / "unused")
    syn.write_predictions(rows, str(tmp_path / "run"), rows_per_file=5, run_info={"model": "mask2former"})

    result = CliRunner().invoke(app, ["export", "panoptic", str(tmp_path / "run"), str(tmp_path / "pan"), "--annotations", str(gt_json)])
    assert result.exit_code == 0, result.output
    document = exported(tmp_path / "pan")
    assert images_and_annotations(document) == images_and_annotations(gt), "the ground truth's ids and file names"
    assert document["annotations"][0]["file_name"] == "000000.png" and document["images"][0]["file_name"] == "000000.jpg"
    assert {c["id"]: c["isthing"] for c in document["categories"]} == {c["id"]: c["isthing"] for c in gt["categories"]}

    reference = panopticapi_reference(gt, gt_dir, document["annotations"], tmp_path / "pan" / "panoptic")
    ours = evaluate_predictions(str(tmp_path / "run"), str(gt_json), use_ray=False, panoptic_root=str(gt_dir)).metrics
    assert 0 < ours["PQ"] < 1
    for group in ("All", "Things", "Stuff"):
        assert reference[group] == ours[group], group


def test_a_run_made_from_a_coco_json_keeps_its_numeric_ids_and_the_images_file_names(shapes, tmp_path):
    gt = json.loads(shapes.panoptic_json.read_text())
    rows = syn.panoptic_rows(gt, str(shapes.panoptic_dir), id_style="id", images_dir=str(shapes.images_dir))
    syn.write_predictions(rows, str(tmp_path / "run"), run_info={"model": "mask2former"})
    export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"))  # no ground truth: ids "1".."20" are the COCO ids
    assert images_and_annotations(exported(tmp_path / "pan")) == images_and_annotations(gt)


def test_a_directory_run_s_ids_are_numbered_and_kept_as_rayseg_image_id(tmp_path):
    (sky, category, score, segment_id), *_ = panoptic_masks()
    write_predictions(tmp_path / "run", [row(i, [segment(sky, category, score, segment_id)]) for i in ("b.png", "sub/a.jpg")])
    export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"))
    document = exported(tmp_path / "pan")
    assert [(i["id"], i["file_name"], i["rayseg_image_id"]) for i in document["images"]] == [
        (1, "b.png", "b.png"), (2, "sub/a.jpg", "sub/a.jpg"),
    ]  # fmt: skip
    (first, second) = document["annotations"]
    assert (first["image_id"], first["file_name"], second["image_id"]) == (1, "b.png", 2)
    assert (tmp_path / "pan" / "panoptic" / second["file_name"]).is_file() and "/" not in second["file_name"]


def test_export_panoptic_refuses_annotations_missing_or_not_covering_the_run_with_exit_2(shapes, tmp_path):
    mask = np.ones((H, W), bool)
    write_predictions(tmp_path / "run", [row("000000.png", [segment(mask, 2, 0.5, 1)]), row("elsewhere.png", [])])

    def export(annotations):
        result = CliRunner().invoke(app, ["export", "panoptic", str(tmp_path / "run"), str(tmp_path / "pan"), "--annotations", str(annotations)])
        return result.exit_code, " ".join(result.output.split())

    code, output = export(tmp_path / "missing.json")
    assert code == 2 and f"error: annotations not found: {tmp_path / 'missing.json'}" in output
    code, output = export(shapes.semantic_dir)
    assert code == 2 and "error:" in output and "is a directory" in output
    code, output = export(shapes.panoptic_json)
    assert code == 2 and "error: 1 ok rows of" in output and "'elsewhere.png'" in output
    assert not (tmp_path / "pan").exists(), "refused before anything is written"


def test_ground_truth_images_left_without_an_annotation_are_warned_of(shapes, tmp_path, caplog):
    import logging

    mask = np.ones((H, W), bool)
    write_predictions(tmp_path / "run", [row("000000.png", [segment(mask, 2, 0.5, 1)]), row("000001.png", [], status="error")])
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        summary = export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"), annotations=str(shapes.panoptic_json))
    assert (summary.images, summary.ground_truth_without_row) == (1, 19)
    assert "19 images of" in caplog.text and "pq_compute needs one for each" in caplog.text
