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
from rayseg.pipeline.evaluation import evaluate_predictions, write_report
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
    assert {"report.json", "report.md", "index.html", "figures/pr_curves.png", "figures/ap_per_class.png"} <= set(written)
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
    assert len(images) == 2 + 2 * 12, "two plots, and ground truth + prediction for 12 thumbnails"
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
