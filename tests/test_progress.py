"""A run shows how far it is while it runs, records it in `_run.json`, and sizes its files."""

from __future__ import annotations

import json
import logging
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.pipeline import progress
from rayseg.pipeline.progress import RunProgress, short_name
from rayseg.pipeline.sink import RUN_FILE
from rayseg.pipeline.sources import open_source


def rayseg(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def images_with_one_corrupt(shapes, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes.images_dir, images)
    (images / "truncated.png").write_bytes((images / "000000.png").read_bytes()[:50])
    return images


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_logs_images_done_of_all_with_its_errors_and_records_its_progress_in_run_json(images_with_one_corrupt, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rayseg.progress")
    output = tmp_path / "out"
    result = rayseg("segment", images_with_one_corrupt, output, "--model", "threshold", "--weights", "random")
    assert result.exit_code == 0, result.output
    lines = [r.getMessage() for r in caplog.records if r.name == "rayseg.progress"]
    assert lines[-1].startswith("21 of 21 images (100.0%)"), lines
    assert "· 1 errors" in lines[-1] and "SegmentImagesAndEncode 21" in lines[-1] and "Write 21" in lines[-1]
    record = json.loads((output / RUN_FILE).read_text())["progress"]
    assert record["samples"][-1][1:] == [21, 1]
    assert [s[0] for s in record["samples"]] == sorted(s[0] for s in record["samples"])
    stages = {stage["name"]: stage["rows"] for stage in record["stages"]}
    assert stages["SegmentImagesAndEncode"] == 21 and stages["Write"] == 21
    assert record["spilled_bytes"] == 0


def test_the_images_a_run_expects_are_a_listing_s_or_a_parquet_footer_s_up_to_the_limit(shapes, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": [str(p) for p in sorted(shapes.images_dir.glob("*.png"))]}), manifest)
    csv = tmp_path / "manifest.csv"
    csv.write_text("uri\n" + "\n".join(str(p) for p in shapes.images_dir.glob("*.png")) + "\n")
    assert open_source(str(shapes.images_dir)).expected_rows == 20
    assert open_source(str(manifest)).expected_rows == 20
    assert open_source(str(manifest), limit=7).expected_rows == 7
    assert open_source(str(manifest), limit=70).expected_rows == 20
    assert open_source(str(csv)).expected_rows is None  # counting a CSV's rows means reading it


def test_past_max_samples_the_record_keeps_every_other_sample_and_doubles_their_spacing(monkeypatch):
    monkeypatch.setattr(progress, "MAX_SAMPLES", 4)
    run = RunProgress(expected=100, interval_s=5.0)
    for step in range(10):
        run._record([step * 5.0, step * 10, 0])
    assert run.samples == [[0.0, 0, 0], [20.0, 40, 0], [40.0, 80, 0]]
    assert run.record()["interval_s"] == 20.0


def test_a_progress_line_says_done_of_all_rate_errors_eta_and_each_stage_s_rows_and_queue():
    run = RunProgress(expected=1000, interval_s=5.0)
    run.errors = 2
    run.stages = [progress.Stage("ReadFilesParquetV2", 600, 3, 0), progress.Stage("Write", 500, 0, 0)]
    run._last = (10.0, 250)
    assert run.line(15.0, 500, now=15.0) == (
        "500 of 1,000 images (50.0%) · 50/s · 2 errors · ETA 10s · stages: ReadFilesParquetV2 600 (3 queued), Write 500"
    )
    assert RunProgress().line(2.0, 30, now=2.0) == "30 images · 15/s"


@pytest.mark.parametrize(
    "operator, shown",
    [
        ("ReadFilesParquetV2->MapBatches(normalise_manifest)->StreamingRepartition[num_rows_per_block=256,strict=False]", "ReadFilesParquetV2"),
        ("MapBatches(SegmentImagesAndEncode)", "SegmentImagesAndEncode"),
        ("Write", "Write"),
    ],
)
def test_a_stage_is_shown_by_the_first_of_its_fused_steps(operator, shown):
    assert short_name(operator) == shown


@pytest.mark.usefixtures("ray_cluster")
def test_output_files_hold_about_output_file_mib_of_rows_each(shapes, tmp_path):
    small, default = tmp_path / "small", tmp_path / "default"
    assert rayseg("segment", shapes.images_dir, small, "--model", "threshold", "--weights", "random", "--output-file-mib", "0.001").exit_code == 0
    assert rayseg("segment", shapes.images_dir, default, "--model", "threshold", "--weights", "random").exit_code == 0
    files = json.loads((small / RUN_FILE).read_text())["files"]
    assert len(files) > 1, "1 KiB of rows per file cuts 20 images' rows into several files"
    assert sum(pq.read_metadata(small / name).num_rows for name in files) == 20
    assert sorted(p.name for p in small.glob("*.parquet")) == files
    assert json.loads((default / RUN_FILE).read_text())["files"] == ["part-00000.parquet"], "20 rows are far below 128 MiB"


def test_an_output_file_size_that_is_not_positive_is_refused_before_any_work(shapes, tmp_path, monkeypatch):
    monkeypatch.setattr("rayseg.jobs.cluster.connect", lambda *a, **k: pytest.fail("reached the cluster"))
    result = rayseg("segment", shapes.images_dir, tmp_path / "out", "--model", "threshold", "--weights", "random", "--output-file-mib", "0")
    assert result.exit_code == 2
    assert "output_file_mib" in result.output and "greater than 0" in result.output


@pytest.mark.usefixtures("ray_cluster")
def test_a_progress_step_that_fails_costs_the_run_nothing(shapes, tmp_path, monkeypatch):
    def broken(self, executor, final=False):
        raise RuntimeError("the counters moved")

    monkeypatch.setattr(RunProgress, "step", broken)
    output = tmp_path / "out"
    result = rayseg("segment", shapes.images_dir, output, "--model", "threshold", "--weights", "random")
    assert result.exit_code == 0, result.output
    assert json.loads((output / RUN_FILE).read_text())["counts"]["images"] == 20
