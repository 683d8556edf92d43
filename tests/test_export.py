"""`rayseg export coco` (COCO results, loadRes-able) and `rayseg export dataset` (COCO dataset)."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from rayseg.jobs.evaluate_commands import register
from rayseg.pipeline.evaluation import evaluate_predictions
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.export import ExportError, export_coco_dataset, export_coco_results

runner = CliRunner()


def cli(*args):
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as the real CLI is
    register(app)
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture()
def predictions(shapes, tmp_path):
    gt = json.loads(shapes.instances_json.read_text())
    rows = syn.perturbed_instances(gt, seed=0, extra=2.0, images_dir=str(shapes.images_dir))
    rows[1] = syn.row(rows[1]["image_id"], 64, 64, [], status="error", error="decode failed")
    for row in rows:
        for segment in row["segments"]:
            segment["label"] = {1: "circle", 2: "square", 3: "triangle"}[segment["category_id"]]
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=8, run_info={"model": "maskrcnn", "run_id": "r1"})
    return gt, tmp_path / "pred"


def silent(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def test_export_coco_is_accepted_by_load_res_and_reproduces_our_evaluation(shapes, predictions, tmp_path):
    gt, pred = predictions
    result = cli("export", "coco", pred, tmp_path / "results.json", "--annotations", shapes.instances_json)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    stored = pq.read_table(pred).to_pylist()
    assert len(results) == sum(len(r["segments"]) for r in stored if r["status"] == "ok")
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "bbox", "score"}
    assert all(isinstance(r["image_id"], int) for r in results), "file names mapped to COCO ids"
    coco = silent(COCO, str(shapes.instances_json))
    detections = silent(coco.loadRes, str(tmp_path / "results.json"))
    assert len(detections.getAnnIds()) == len(results)
    # pycocotools on the export equals `rayseg evaluate` (segm with mask areas: bbox dropped).
    ours = evaluate_predictions(str(pred), str(shapes.instances_json), use_ray=False).metrics
    for iou_type in ("segm", "bbox"):
        stripped = [{k: v for k, v in r.items() if k != ("bbox" if iou_type == "segm" else "segmentation")} for r in results]
        evaluation = COCOeval(coco, silent(coco.loadRes, stripped), iou_type)
        silent(evaluation.evaluate)
        silent(evaluation.accumulate)
        silent(evaluation.summarize)
        assert ours[iou_type]["stats"] == [float(s) for s in evaluation.stats]


def test_export_coco_of_a_semantic_run_warns_that_its_classes_become_instances_and_of_an_instance_run_does_not(
    shapes, predictions, tmp_path, caplog
):
    names = sorted(image["file_name"] for image in predictions[0]["images"])
    rows = syn.semantic_rows(str(shapes.semantic_dir), names, images_dir=str(shapes.images_dir))
    syn.write_predictions(rows, str(tmp_path / "semantic"), run_info={"model": "unet"})
    for run, warned in ((tmp_path / "semantic", True), (predictions[1], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rayseg"):
            result = cli("export", "coco", run, tmp_path / "results.json", "--annotations", shapes.instances_json)
        assert result.exit_code == 0, result.output
        assert ("holds semantic predictions but is exported as instance" in caplog.text) is warned, caplog.text
        assert ("`background` and other stuff classes" in caplog.text) is warned


def test_export_coco_needs_ground_truth_to_map_file_names(predictions, tmp_path):
    gt, pred = predictions
    result = cli("export", "coco", pred, tmp_path / "results.json")
    assert result.exit_code == 2
    assert "--annotations" in " ".join(result.output.split())
    with pytest.raises(ExportError):
        export_coco_results(str(pred), str(tmp_path / "results.json"))
    assert not list(tmp_path.glob("results.json*")), "a failed export leaves no file, whole or partial"


@pytest.mark.parametrize("kind", ["coco", "dataset"])
def test_export_to_a_directory_is_refused_naming_it(shapes, predictions, tmp_path, kind):
    gt, pred = predictions
    result = cli("export", kind, pred, tmp_path, "--annotations", shapes.instances_json)
    assert result.exit_code == 2
    assert f"{tmp_path} is a directory" in " ".join(result.output.split())


def test_export_coco_with_numeric_ids_needs_no_ground_truth(shapes, tmp_path):
    gt = json.loads(shapes.instances_json.read_text())
    syn.write_predictions(syn.perturbed_instances(gt, seed=1, id_style="id"), str(tmp_path / "pred"))
    summary = export_coco_results(str(tmp_path / "pred"), str(tmp_path / "out" / "results.json"))
    assert summary.images == 20 and summary.error_rows == 0
    detections = silent(silent(COCO, str(shapes.instances_json)).loadRes, str(tmp_path / "out" / "results.json"))
    assert len(detections.getAnnIds()) == summary.annotations > 0


def test_export_dataset_loads_with_coco_and_round_trips_masks(predictions, tmp_path):
    gt, pred = predictions
    result = cli("export", "dataset", pred, tmp_path / "dataset.json")
    assert result.exit_code == 0, result.output
    dataset = silent(COCO, str(tmp_path / "dataset.json"))
    stored = [r for r in pq.read_table(pred).to_pylist() if r["status"] == "ok"]
    assert len(dataset.getImgIds()) == len(stored) == 19, "the error row is left out"
    assert {c["name"] for c in dataset.loadCats(dataset.getCatIds())} <= {"circle", "square", "triangle"}
    assert dataset.dataset["info"]["model"] == "maskrcnn" and dataset.dataset["info"]["run_id"] == "r1"
    by_file = {image["file_name"]: image for image in dataset.dataset["images"]}
    for row in stored:
        image = by_file[row["image_id"]]
        assert (image["width"], image["height"]) == (row["width"], row["height"]) and image["uri"] == row["uri"]
        annotations = dataset.loadAnns(dataset.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == len(row["segments"])
        for annotation, segment in zip(annotations, row["segments"]):
            expected = mask_utils.decode({"size": [row["height"], row["width"]], "counts": segment["rle"]})
            np.testing.assert_array_equal(dataset.annToMask(annotation), expected)
            assert annotation["area"] == segment["area"] == expected.sum()
            assert annotation["score"] == segment["score"] and annotation["iscrowd"] == 0
            assert annotation["category_id"] == segment["category_id"] and annotation["bbox"] == segment["bbox"]


def test_export_dataset_takes_ids_and_file_names_from_ground_truth(shapes, predictions, tmp_path):
    gt, pred = predictions
    summary = export_coco_dataset(str(pred), str(tmp_path / "dataset.json"), annotations=str(shapes.instances_json))
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    gt_ids = {image["file_name"]: image["id"] for image in gt["images"]}
    assert all(gt_ids[image["file_name"]] == image["id"] for image in dataset["images"])
    assert summary.images == 19 and summary.error_rows == 1


def test_export_dataset_gives_every_image_its_own_id_and_takes_an_id_s_first_ok_row(tmp_path):
    mask = np.zeros((6, 8), bool)
    mask[1:4, 1:5] = True
    rows = [
        syn.row("a.png", 6, 8, [], status="error", error="read failed: timeout"),  # then its ok row, under one id
        syn.row("a.png", 6, 8, [syn.segment(1, mask, label="cat")]),
        syn.row("1", 6, 8, [syn.segment(2, mask, label="dog")]),  # a COCO id the first assigned id would take
        syn.row("²", 6, 8, [syn.segment(1, mask, label="cat")]),  # isdigit(), but no COCO id
    ]
    syn.write_predictions(rows, str(tmp_path / "pred"))
    summary = export_coco_dataset(str(tmp_path / "pred"), str(tmp_path / "coco.json"))
    dataset = json.loads((tmp_path / "coco.json").read_text())
    ids = {image["rayseg_image_id"]: image["id"] for image in dataset["images"]}
    assert ids == {"a.png": 2, "1": 1, "²": 3} and summary.duplicate_rows == 0 and summary.error_rows == 1
    by_image = {a["image_id"]: a["category_id"] for a in dataset["annotations"]}
    assert by_image == {2: 1, 1: 2, 3: 1}, "a.png keeps its annotation although its error row came first"


def repeated_id_rows() -> list[dict]:
    """Rows in which ids repeat across files: "3" twice, "03" (COCO id 3 again), "b.png" twice
    (once after an error row of it); each row's category tells which row an export took."""
    mask = np.zeros((6, 8), bool)
    mask[1:4, 1:5] = True
    ids = ["3", "7", "b.png", "03", "b.png", "5", "3", "b.png", "7"]
    rows = [syn.row(image_id, 6, 8, [syn.segment(10 + k, mask)]) for k, image_id in enumerate(ids)]
    rows[2] = syn.row("b.png", 6, 8, [], status="error", error="read failed")
    return rows


def test_export_coco_counts_ids_repeated_across_files_and_keeps_each_image_s_first_row(tmp_path):
    rows = [r for r in repeated_id_rows() if r["image_id"] != "b.png"]
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=2)
    summary = export_coco_results(str(tmp_path / "pred"), str(tmp_path / "results.json"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["image_id"]: r["category_id"] for r in results} == {3: 10, 7: 11, 5: 15}
    assert (summary.rows, summary.images, summary.duplicate_rows) == (6, 3, 3), '"03" is COCO id 3 too'


def test_export_dataset_with_repeated_ids_gives_images_and_annotations_the_same_ids(tmp_path):
    syn.write_predictions(repeated_id_rows(), str(tmp_path / "pred"), rows_per_file=2)
    summary = export_coco_dataset(str(tmp_path / "pred"), str(tmp_path / "coco.json"))
    dataset = json.loads((tmp_path / "coco.json").read_text())
    ids = {image["rayseg_image_id"]: image["id"] for image in dataset["images"]}
    assert ids == {"3": 3, "7": 7, "b.png": 8, "5": 5}, '"03" is COCO id 3, taken already'
    assert {a["image_id"]: a["category_id"] for a in dataset["annotations"]} == {3: 10, 7: 11, 8: 14, 5: 15}
    assert (summary.images, summary.error_rows, summary.duplicate_rows) == (4, 1, 4)


@pytest.mark.parametrize("kind", ["coco", "dataset"])
def test_exports_are_the_same_with_colliding_hashes_and_one_row_batches(tmp_path, monkeypatch, kind):
    import rayseg.pipeline.export as export

    rows = repeated_id_rows() if kind == "dataset" else [r for r in repeated_id_rows() if r["image_id"] != "b.png"]
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=4, row_group_size=3)
    function = export_coco_dataset if kind == "dataset" else export_coco_results
    expected = function(str(tmp_path / "pred"), str(tmp_path / "expected.json"))
    # Every id hashing alike makes every row a suspect: remembered ids decide, not hashes.
    monkeypatch.setattr(export, "id_hashes", lambda ids: np.zeros(len(ids), np.uint64))
    monkeypatch.setattr(export, "BATCH_ROWS", 1)
    got = function(str(tmp_path / "pred"), str(tmp_path / "got.json"))

    def without_date(path):
        data = json.loads(path.read_text())
        if kind == "dataset":
            data["info"].pop("date_created")
        return data

    assert without_date(tmp_path / "got.json") == without_date(tmp_path / "expected.json")
    assert {**got.__dict__, "output": ""} == {**expected.__dict__, "output": ""}
