"""Reports (report.json, report.md, a self-contained index.html) and `rayseg evaluate` end to end."""

from __future__ import annotations

import base64
import json
import os
import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from rayseg.jobs.cli import app as rayseg_app
from rayseg.jobs.evaluate_commands import register
from rayseg.pipeline.evaluation import (
    ReportDirectoryError,
    evaluate_predictions,
    write_report,
)
from rayseg.pipeline.evaluation import synthetic as syn

runner = CliRunner()


def invoke(app, *args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def evaluation_cli(*args):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return invoke(app, *args)


def check_html(html: str) -> list[bytes]:
    """A page that stands alone: every image inline, nothing fetched. Returns the images."""
    assert html.lstrip().startswith("<!doctype html>")
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html), "the page must not fetch anything"
    assert "<script" not in html
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    images = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    return images


@pytest.fixture(scope="module")
def instance_predictions(shapes, tmp_path_factory):
    gt = json.loads(shapes.instances_json.read_text())
    output = tmp_path_factory.mktemp("instance") / "pred"
    rows = syn.perturbed_instances(gt, seed=2, extra=1.0, images_dir=str(shapes.images_dir))
    rows[0]["uri"] = "/no/such/image.png"  # a thumbnail without its image still draws
    syn.write_predictions(
        rows, str(output),
        run_info={"model": "maskrcnn", "weights": "/w/model.pth", "weights_sha256": "f" * 64, "run_id": "run-42"},
    )  # fmt: skip
    return output


def test_instance_report_has_every_number_and_a_self_contained_page(shapes, instance_predictions, tmp_path):
    result = evaluate_predictions(str(instance_predictions), str(shapes.instances_json), use_ray=False, score_threshold=0.0)
    written = write_report(result, str(tmp_path / "report"))
    assert {"report.json", "report.md", "index.html", "figures/pr_curves.png", "figures/score_curve.png", "figures/ap_per_class.png"} <= set(written)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["task"] == "instance"
    assert report["run"]["model"] == "maskrcnn" and report["run"]["weights_sha256"] == "f" * 64 and report["run"]["run_id"] == "run-42"
    assert report["images"]["evaluated"] == 20 and report["images"]["error_rows"] == 0
    for iou_type in ("segm", "bbox"):
        metrics = report["metrics"][iou_type]
        assert len(metrics["stats"]) == 12 and metrics["AP"] == metrics["stats"][0] == result.metrics[iou_type]["AP"]
        assert [c["name"] for c in metrics["per_category"]] == ["circle", "square", "triangle"]
        assert len(metrics["pr_curves"]["recall"]) == 101
    assert len(report["ranking"]["best"]) == len(report["ranking"]["worst"]) == 6
    assert len(report["thumbnails"]) == 12
    html = (tmp_path / "report" / "index.html").read_text()
    images = check_html(html)
    assert len(images) == 3 + 2 * 12, "three plots, and ground truth + prediction for 12 thumbnails"
    assert f"{result.metrics['segm']['AP'] * 100:.1f}" in html and "run-42" in html and "maskrcnn" in html
    if any(t["image_id"] == "000000.png" for t in report["thumbnails"]):
        assert not next(t for t in report["thumbnails"] if t["image_id"] == "000000.png")["image_readable"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| AP |" in markdown and "![Precision–recall curves](figures/pr_curves.png)" in markdown
    # Every row of a Markdown table has its header's cells: a `|` inside a cell is escaped.
    tables = re.findall(r"(?:^\|.*\n)+", markdown, flags=re.MULTILINE)
    assert any("AP @[IoU=0.50:0.95 \\| area=all \\| maxDets=100]" in table for table in tables)
    for table in tables:
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table
    for link in re.findall(r"\]\((figures/[^)]+)\)", markdown):
        assert (tmp_path / "report" / link).is_file()


def test_semantic_and_panoptic_reports(shapes, tmp_path):
    names = sorted(os.listdir(shapes.images_dir))
    syn.write_predictions(syn.semantic_rows(str(shapes.semantic_dir), names, images_dir=str(shapes.images_dir)), str(tmp_path / "sem"))
    result = evaluate_predictions(str(tmp_path / "sem"), str(shapes.semantic_dir), use_ray=False, ranking_k=2)
    write_report(result, str(tmp_path / "sem-report"))
    report = json.loads((tmp_path / "sem-report" / "report.json").read_text())
    assert report["metrics"]["mIoU"] == 1.0 and len(report["metrics"]["confusion_matrix"]["counts"]) == 4
    assert report["run"]["run_id"] == "synthetic"
    assert len(check_html((tmp_path / "sem-report" / "index.html").read_text())) == 2 + 2 * 4
    assert (tmp_path / "sem-report" / "figures" / "confusion_matrix.png").is_file()

    panoptic = json.loads(shapes.panoptic_json.read_text())
    syn.write_predictions(syn.panoptic_rows(panoptic, str(shapes.panoptic_dir), images_dir=str(shapes.images_dir)), str(tmp_path / "pan"))
    result = evaluate_predictions(str(tmp_path / "pan"), str(shapes.panoptic_json), use_ray=False, ranking_k=1)
    write_report(result, str(tmp_path / "pan-report"), draw_thumbnails=False)
    report = json.loads((tmp_path / "pan-report" / "report.json").read_text())
    assert report["metrics"]["PQ"] == 1.0 and report["thumbnails"] == []
    html = (tmp_path / "pan-report" / "index.html").read_text()
    assert len(check_html(html)) == 1 and "PQ per class" in html
    # A thumbnail that fails is logged and left out: panoptic ones are drawn.
    write_report(result, str(tmp_path / "pan-thumbnails"))
    assert len(json.loads((tmp_path / "pan-thumbnails" / "report.json").read_text())["thumbnails"]) == 2


def test_predictions_and_report_on_object_storage(ray_cluster, s3_endpoint, shapes, tmp_path):
    """s3:// predictions (read inside the Ray tasks) and an s3:// report, through the moto server."""
    import fsspec

    gt = json.loads(shapes.instances_json.read_text())
    prefix = "s3://rayseg-test/evaluation"
    syn.write_predictions(syn.perturbed_instances(gt, seed=5), f"{prefix}/pred", rows_per_file=7)
    remote = evaluate_predictions(f"{prefix}/pred", str(shapes.instances_json), use_ray=True, shard_rows=5)
    syn.write_predictions(syn.perturbed_instances(gt, seed=5), str(tmp_path / "pred"), rows_per_file=7)
    local = evaluate_predictions(str(tmp_path / "pred"), str(shapes.instances_json), use_ray=False)
    assert remote.metrics == local.metrics and remote.shards == 4
    written = write_report(remote, f"{prefix}/report")
    assert written["index.html"] == f"{prefix}/report/index.html"
    with fsspec.open(f"{prefix}/report/report.json", "r") as f:
        assert json.load(f)["metrics"]["segm"]["AP"] == local.metrics["segm"]["AP"]
    # A second report into the same prefix: refused, or with overwrite the earlier one's
    # objects are deleted first (object stores have no folders to empty).
    with fsspec.open(f"{prefix}/report/figures/stale.png", "wb") as f:
        f.write(b"an earlier report's figure")
    with pytest.raises(ReportDirectoryError, match="is not empty"):
        write_report(remote, f"{prefix}/report", draw_thumbnails=False)
    write_report(remote, f"{prefix}/report", draw_thumbnails=False, overwrite=True)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    left = {path.rsplit("/report/", 1)[1] for path in fs.find(f"{prefix}/report")}
    assert "figures/stale.png" not in left and {"report.json", "index.html", "figures/score_curve.png"} <= left


@pytest.mark.slow
def test_segment_then_evaluate_end_to_end(ray_cluster, shapes, tmp_path):
    """fixtures → `rayseg segment` (random U-Net) → `rayseg evaluate` → a report people can open."""
    output = tmp_path / "run"
    result = invoke(rayseg_app, "segment", shapes.images_dir, output, "--model", "unet", "--weights", "random")
    assert result.exit_code == 0, result.output
    result = evaluation_cli(
        "evaluate", output, "--annotations", shapes.semantic_dir, "--report", tmp_path / "report",
        "--categories", shapes.panoptic_json,  # class names for ids the random model never predicts
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and "index.html" in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["task"] == "semantic" and report["run"]["model"] == "unet" and report["run"]["weights"] == "random"
    assert report["run"]["run_id"] and report["evaluation"]["distributed"]
    assert report["images"] | {} and report["images"]["evaluated"] == 20 and report["images"]["gt_without_prediction"] == 0
    metrics = report["metrics"]
    assert all(0 <= metrics[k] <= 1 for k in ("mIoU", "fwIoU", "mAcc", "pAcc"))
    assert [(c["id"], c["name"]) for c in metrics["per_class"]] == [(1, "circle"), (2, "square"), (3, "triangle"), (4, "background")]
    assert sum(c["gt_pixels"] for c in metrics["per_class"]) == 20 * 64 * 64
    check_html((tmp_path / "report" / "index.html").read_text())
    assert (tmp_path / "report" / "report.md").read_text().startswith("# rayseg semantic evaluation: unet")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "keypoints"], "--task must be one of"),
        (["--iou-type", "keypoints"], "--iou-type takes"),
        (["--segm-area", "polygon"], "--segm-area takes box / mask"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(shapes, tmp_path, args, message):
    syn.write_predictions([], str(tmp_path / "pred"))
    result = evaluation_cli("evaluate", tmp_path / "pred", "--annotations", shapes.instances_json, "--report", tmp_path / "r", *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def test_missing_inputs_exit_2(shapes, tmp_path):
    result = evaluation_cli("evaluate", tmp_path / "nowhere", "--annotations", shapes.instances_json, "--report", tmp_path / "r")
    assert result.exit_code == 2 and "predictions not found" in result.output
    syn.write_predictions([], str(tmp_path / "pred"))
    result = evaluation_cli("evaluate", tmp_path / "pred", "--annotations", tmp_path / "no.json", "--report", tmp_path / "r")
    assert result.exit_code == 2 and "annotations not found" in result.output
    # A run that has not committed (no _run.json), e.g. still running or killed, is not read.
    syn.write_predictions([], str(tmp_path / "torn"))
    (tmp_path / "torn" / "_run.json").unlink()
    result = evaluation_cli("evaluate", tmp_path / "torn", "--annotations", shapes.instances_json, "--report", tmp_path / "r")
    assert result.exit_code == 2 and "holds no committed run (_run.json missing)" in " ".join(result.output.split())


def test_the_best_and_worst_images_do_not_depend_on_order_or_sharding():
    from rayseg.pipeline.evaluation import ImageRanking, RankedImage

    rng = np.random.default_rng(0)
    images = [RankedImage(float(q), f"{i:04d}", f"{i:04d}.png") for i, q in enumerate(rng.integers(0, 8, 300) / 7)]
    expected_best = sorted(images, key=lambda r: (-r.quality, r.key))[:5]
    expected_worst = sorted(images, key=lambda r: (r.quality, r.key))[:5]
    for order in (images, images[::-1], list(rng.permutation(images))):
        shards = [ImageRanking(5) for _ in range(4)]
        for i, image in enumerate(order):
            shards[i % 4].add(image)
        merged = ImageRanking(5)
        for shard in shards[::-1]:
            merged.merge(shard)
        assert merged.best == expected_best and merged.worst == expected_worst


@pytest.mark.parametrize("task", ["instance", "semantic", "panoptic"])
def test_a_report_when_nothing_joins_still_renders(shapes, tmp_path, task):
    syn.write_predictions([syn.row("unrelated.png", 64, 64, [])], str(tmp_path / "pred"))
    annotations = {"instance": shapes.instances_json, "semantic": shapes.semantic_dir, "panoptic": shapes.panoptic_json}[task]
    result = evaluate_predictions(str(tmp_path / "pred"), str(annotations), use_ray=False)
    assert result.coverage.evaluated == 0 and result.coverage.predictions_without_gt == 1
    assert result.coverage.gt_without_prediction == 20
    write_report(result, str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["images"]["examples_without_gt"] == ["unrelated.png"]
    if task == "instance":  # the default rule, said where the numbers are
        assert any("box area w·h, for 'segm' too" in note for note in report["evaluation"]["conventions"])
    assert "—" in (tmp_path / "report" / "index.html").read_text()


def test_evaluate_instance_predictions_through_the_cli_on_ray(ray_cluster, shapes, instance_predictions, tmp_path):
    result = evaluation_cli(
        "evaluate", instance_predictions, "--annotations", shapes.instances_json, "--report", tmp_path / "report",
        "--iou-type", "segm", "--thumbnails", "2", "--segm-area", "mask",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metrics"]["iou_types"] == ["segm"] and "bbox" not in report["metrics"]
    assert report["metrics"]["segm_area"] == "mask"
    assert any("(--segm-area mask)" in note for note in report["evaluation"]["conventions"])
    local = evaluate_predictions(
        str(instance_predictions), str(shapes.instances_json), use_ray=False, iou_types=("segm",), segm_area="mask"
    )
    assert report["metrics"]["segm"]["stats"] == local.metrics["segm"]["stats"]
    assert len(report["ranking"]["best"]) == 2 and report["evaluation"]["distributed"]


def test_the_task_a_run_produced_is_read_from_its_run_record():
    from rayseg.pipeline.run_reader import run_task

    assert run_task({"model": "unet"}) == "semantic"
    assert run_task({"model": "unet", "spec": {"model": {"options": {"task": "instance"}}}}) == "instance"
    assert run_task({"model": "maskrcnn"}) == "instance"
    assert run_task({"model": "sam"}) == "instance"  # promptable: its masks are instances
    assert run_task({"model": "mask2former", "spec": {"model": {"options": {}}}}) == "panoptic"
    assert run_task({"model": "synthetic"}) is None and run_task({}) is None


def test_evaluating_a_run_against_another_tasks_ground_truth_warns(ray_cluster, shapes, tmp_path, caplog):
    import logging

    names = sorted(os.listdir(shapes.images_dir))
    rows = syn.semantic_rows(str(shapes.semantic_dir), names, images_dir=str(shapes.images_dir))
    syn.write_predictions(rows, str(tmp_path / "sem"), run_info={"model": "unet"})
    logger = logging.getLogger("rayseg")
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops propagation to the root
    try:
        result = evaluation_cli(
            "evaluate", tmp_path / "sem", "--annotations", shapes.instances_json, "--report", tmp_path / "r", "--thumbnails", "0"
        )
    finally:
        logger.removeHandler(caplog.handler)
    assert result.exit_code == 0, result.output
    assert "holds semantic predictions but is evaluated as instance" in caplog.text


# --- the report folder ----------------------------------------------------------------------------


def test_a_report_into_a_non_empty_folder_exits_2_before_any_evaluation(shapes, instance_predictions, tmp_path, monkeypatch):
    from rayseg.jobs import cluster

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(cluster, "connect", no_work)
    report = tmp_path / "report"
    (report / "figures").mkdir(parents=True)
    (report / "report.json").write_text("{}")
    (report / "figures" / "worst-5-gt.png").write_bytes(b"stale")
    result = evaluation_cli("evaluate", instance_predictions, "--annotations", shapes.instances_json, "--report", report)
    assert result.exit_code == 2, result.output
    assert "is not empty" in result.output and "--overwrite" in " ".join(result.output.split())
    assert (report / "figures" / "worst-5-gt.png").read_bytes() == b"stale"
    # --overwrite clears only a folder that holds nothing but a report's entries.
    (report / "notes.txt").write_text("mine")
    result = evaluation_cli("evaluate", instance_predictions, "--annotations", shapes.instances_json, "--report", report, "--overwrite")
    assert result.exit_code == 2 and "holds more than a report (notes.txt)" in " ".join(result.output.split())
    assert (report / "notes.txt").read_text() == "mine" and (report / "figures" / "worst-5-gt.png").exists()


def test_overwrite_replaces_an_earlier_report_and_leaves_no_stale_file(ray_cluster, shapes, instance_predictions, tmp_path):
    report = tmp_path / "report"
    earlier = evaluate_predictions(str(instance_predictions), str(shapes.instances_json), use_ray=False, iou_types=("segm",))
    write_report(earlier, str(report))
    assert (report / "figures" / "worst-5-gt.png").is_file()
    result = evaluation_cli(
        "evaluate", instance_predictions, "--annotations", shapes.instances_json, "--report", report,
        "--iou-type", "segm", "--thumbnails", "1", "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = sorted(path.name for path in (report / "figures").iterdir())
    assert figures == ["ap_per_class.png", "best-0-gt.png", "best-0-pred.png", "pr_curves.png", "score_curve.png", "worst-0-gt.png", "worst-0-pred.png"]
    assert len(json.loads((report / "report.json").read_text())["thumbnails"]) == 2


# --- thumbnails and the score-threshold curve ----------------------------------------------------

SIDE = 32


def square(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def hand_made(tmp_path, objects: dict[str, list[np.ndarray]], detections: dict[str, list[tuple[np.ndarray, float]]], **kwargs):
    """A COCO json of one-class `objects` per image, predictions of `detections` (mask,
    score), evaluated in this process: the result."""
    images, annotations = [], []
    for number, (name, masks) in enumerate(sorted(objects.items()), start=1):
        images.append({"id": number, "file_name": name, "height": SIDE, "width": SIDE})
        for mask in masks:
            counts, area, box = syn.encode_mask(mask)
            segmentation = {"size": [SIDE, SIDE], "counts": counts}
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": 1, "segmentation": segmentation, "area": area, "bbox": box, "iscrowd": 0})
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cell"}]}))
    rows = [syn.row(name, SIDE, SIDE, [syn.segment(1, mask, score=score) for mask, score in detections.get(name, [])]) for name in objects]
    syn.write_predictions(rows, str(tmp_path / "pred"))
    return evaluate_predictions(str(tmp_path / "pred"), str(gt), use_ray=False, iou_types=("segm",), **kwargs)


def thumbnail(result, name: str, score_threshold: float = 0.5):
    """(ground-truth panel, prediction panel, matches) of image `name` as the report draws them."""
    from rayseg.pipeline.evaluation.visualize import render_pair, thumbnail_size

    gt = result.ground_truth.images[result.ground_truth.by_file[name]]
    (prediction,) = read_row(result, name)
    matches = result.evaluator.match_image(gt, prediction, score_threshold)
    gt_panel, pred_panel, _ = render_pair("instance", gt, prediction, score_threshold=score_threshold, matches=matches)
    assert gt_panel.shape[:2] == thumbnail_size(SIDE, SIDE)
    return gt_panel, pred_panel, matches


def read_row(result, name: str):
    import pyarrow.parquet as pq

    from rayseg.pipeline.run_reader import read_predictions
    from rayseg.pipeline.storage import filesystem

    fs, root = filesystem(result.predictions)
    file = f"{root}/part-00000.parquet"
    ids = pq.read_table(file, columns=["image_id"]).column("image_id").to_pylist()
    return read_predictions(fs, [(file, 0, [ids.index(name)])])


def pixel(panel: np.ndarray, y: int, x: int) -> np.ndarray:
    """The thumbnail's pixel at image pixel (y, x)."""
    scale = panel.shape[0] / SIDE
    return panel[int((y + 0.5) * scale), int((x + 0.5) * scale)].astype(int)


def test_two_touching_instances_of_one_class_get_different_colours(tmp_path):
    left, right = square(8, 4, 24, 16), square(8, 16, 24, 28)  # one shared edge, no gap
    result = hand_made(tmp_path, {"a.png": [left, right]}, {"a.png": [(left, 0.9), (right, 0.8)]})
    gt_panel, pred_panel, _ = thumbnail(result, "a.png")
    for panel in (gt_panel, pred_panel):
        # Both fills over the same grey canvas (no image): their colours differ by far more
        # than two shades of one class colour did (instance_shade's 1.0 and 0.75 of circle's
        # blue, blended at 0.55: 11 + 17 + 23 = 51).
        assert np.abs(pixel(panel, 16, 8) - pixel(panel, 16, 22)).sum() > 120
    # A matched prediction takes its ground truth's colour.
    assert (pixel(gt_panel, 16, 8) == pixel(pred_panel, 16, 8)).all() and (pixel(gt_panel, 16, 22) == pixel(pred_panel, 16, 22)).all()


def test_an_unmatched_prediction_and_a_missed_object_are_marked(tmp_path):
    from rayseg.pipeline.evaluation.instance import UNMATCHED
    from rayseg.pipeline.evaluation.visualize import (
        FALSE_POSITIVE_MARK,
        MISSED_MARK,
        _edge,
    )

    found, missed, stray = square(2, 2, 12, 12), square(18, 18, 30, 30), square(2, 18, 12, 30)
    result = hand_made(tmp_path, {"a.png": [found, missed]}, {"a.png": [(found, 0.9), (stray, 0.7)]}, score_threshold=0.5)
    gt_panel, pred_panel, matches = thumbnail(result, "a.png")
    assert list(matches.detections) == [0, UNMATCHED] and list(matches.ground_truths) == [0, UNMATCHED]
    (ranked,) = result.evaluator.ranking.worst
    assert matches.counts == ranked.detail == {"tp": 1, "fp": 1, "fn": 1}, "the marks are what the image's F1 counts"

    def colours_on_edge(panel, mask):
        edge = _edge(np.kron(mask, np.ones((8, 8), dtype=bool)), 2)  # 32 px → 256 px thumbnails
        return {tuple(c) for c in panel[edge].tolist()}

    assert set(FALSE_POSITIVE_MARK) <= colours_on_edge(pred_panel, stray)
    assert set(MISSED_MARK) <= colours_on_edge(gt_panel, missed) and set(MISSED_MARK) <= colours_on_edge(pred_panel, missed)
    marks = set(FALSE_POSITIVE_MARK) | set(MISSED_MARK)
    assert not marks & colours_on_edge(pred_panel, found) and not marks & colours_on_edge(gt_panel, found)


def test_a_prediction_merging_two_touching_objects_shows_one_colour_and_a_miss(tmp_path):
    """The instance U-Net's main failure: one blob over two touching cells (IoU 0.5 with each)."""
    from rayseg.pipeline.evaluation.instance import UNMATCHED

    left, right = square(8, 4, 24, 16), square(8, 16, 24, 28)
    result = hand_made(tmp_path, {"a.png": [left, right]}, {"a.png": [(left | right, 0.9)]})
    gt_panel, pred_panel, matches = thumbnail(result, "a.png")
    assert matches.counts == {"tp": 1, "fp": 0, "fn": 1} and UNMATCHED in matches.ground_truths.tolist()
    assert (pixel(pred_panel, 16, 8) == pixel(pred_panel, 16, 22)).all(), "one prediction, one colour"
    assert not (pixel(gt_panel, 16, 8) == pixel(gt_panel, 16, 22)).all()


def test_precision_recall_and_f1_against_the_score_threshold_equal_a_direct_count(tmp_path):
    a, b, c = square(2, 2, 12, 12), square(18, 18, 30, 30), square(2, 18, 12, 30)
    detections = {
        "a.png": [(a, 0.9), (b, 0.8), (a, 0.55)],  # a hit, a false positive, a duplicate of the hit
        "b.png": [(c, 0.6), (square(20, 2, 30, 12), 0.3)],  # a hit, a false positive below 0.5
    }
    result = hand_made(tmp_path, {"a.png": [a], "b.png": [c, b]}, detections)
    curve = result.metrics["segm"]["score_curve"]
    assert curve["ground_truths"] == 3
    # By hand: ≥ 0.5 keeps 0.9 (hit), 0.8, 0.6 (hit), 0.55: 2 TP, 2 FP, 1 of 3 missed.
    # ≥ 0.7: 0.9 (hit), 0.8: 1 TP, 1 FP, 2 missed. ≥ 0.95: nothing, precision undefined.
    for threshold, tp, fp in ((0.0, 2, 3), (0.5, 2, 2), (0.7, 1, 1)):
        i = curve["thresholds"].index(threshold)
        assert (curve["tp"][i], curve["fp"][i]) == (tp, fp)
        assert curve["precision"][i] == tp / (tp + fp) and curve["recall"][i] == tp / 3
        assert curve["f1"][i] == 2 * tp / (2 * tp + fp + (3 - tp))
    i = curve["thresholds"].index(0.95)
    assert curve["precision"][i] is None and curve["recall"][i] == 0 and curve["f1"][i] == 0
    written = write_report(result, str(tmp_path / "report"), draw_thumbnails=False)
    assert "figures/score_curve.png" in written
    assert "![Precision, recall and F1 against the score threshold](figures/score_curve.png)" in (tmp_path / "report" / "report.md").read_text()
    assert "Precision, recall and F1 against the score threshold" in (tmp_path / "report" / "index.html").read_text()


def test_a_thumbnail_shows_an_exif_rotated_photo_upright_as_the_run_decoded_it(tmp_path):
    from PIL import Image

    from rayseg.pipeline.decode import decode_image
    from rayseg.pipeline.evaluation.visualize import read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": stored 40 wide, shown 40 high
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(path, exif=exif, quality=100)
    shown = read_image(str(path))
    assert shown.shape == (40, 20, 3), "the masks, at the decoded size, fit over it"
    assert np.array_equal(shown, decode_image(path.read_bytes()))
