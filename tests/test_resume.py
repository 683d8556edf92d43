"""Resume: a run whose driver was killed finishes with --resume, with exactly the rows of an
uninterrupted run — nothing lost, nothing twice."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.unet import UNet, UNetConfig, save_unet
from rayseg.pipeline.sink import ATTEMPT_FILE, RUN_FILE, STAGING_DIR

pytestmark = pytest.mark.usefixtures("ray_cluster")

runner = CliRunner()

# The interrupted attempt: the Python API with small output files, so rows are staged
# while the run is still going, and rows held back a little on their way to the writer, so
# that the run is surely still writing when it is killed (a fast machine would otherwise
# reach the commit between two polls).
INTERRUPTED_RUN = textwrap.dedent(
    """
    import sys, time, ray
    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    def held_back(batch):
        time.sleep(0.25)
        return batch

    images, output, weights, ray_dir = sys.argv[1:5]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir)
    rows = segment(read_source(images), ModelSpec("unet", weights), plan_resources(ray.cluster_resources(), batch_size=2))
    rows = rows.map_batches(held_back, batch_size=4, batch_format="pyarrow", num_cpus=0.25)
    write_run(rows, output, run_id="nightly", run_info={}, rows_per_file=4, write_cpus=0.25)
    """
)


def rows_of(output) -> list[dict]:
    rows = pq.read_table(output).to_pylist()
    return sorted(rows, key=lambda row: row["image_id"])


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray included)."""
    parent = psutil.Process(process.pid)
    family = [parent, *parent.children(recursive=True)]
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def staged_rows(staging) -> int:
    total = 0
    for path in staging.glob("*.parquet"):
        try:
            total += pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - a file still being written
            pass
    return total


def test_a_killed_run_resumes_to_exactly_the_rows_of_an_uninterrupted_run(tmp_path):
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    images = make_fixtures(tmp_path / "fixtures", images=80, size=(96, 96), seed=5).images_dir
    torch.manual_seed(0)
    network = UNet(UNetConfig(width=8, depth=3))
    with torch.no_grad():
        network.head.weight.mul_(100)  # several classes per image, so rows differ meaningfully
    weights = str(tmp_path / "unet")
    save_unet(network, weights)
    reference = tmp_path / "reference"
    result = runner.invoke(app, ["segment", str(images), str(reference), "--model", "unet", "--weights", weights])
    assert result.exit_code == 0, result.output

    output = tmp_path / "out"
    staging = output / STAGING_DIR / "nightly"
    log = tmp_path / "driver.log"
    with log.open("wb") as sink:
        driver = subprocess.Popen(
            [sys.executable, "-c", INTERRUPTED_RUN, str(images), str(output), weights, ray_dir],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 240
    while staged_rows(staging) < 8:
        assert driver.poll() is None, "the run ended before it could be interrupted:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "nothing was staged in time"
        time.sleep(0.1)
    kill_tree(driver)
    shutil.rmtree(ray_dir, ignore_errors=True)
    staged = staged_rows(staging)
    assert 0 < staged < 80, staged
    assert not (output / RUN_FILE).exists(), "a killed run is never taken as complete"
    (staging / "torn.parquet").write_bytes(b"PAR1 half a file")  # what a killed writer leaves

    result = runner.invoke(
        app, ["segment", str(images), str(output), "--model", "unet", "--weights", weights, "--run-id", "nightly", "--resume"]
    )
    assert result.exit_code == 0, result.output
    resumed = rows_of(output)
    assert [row["image_id"] for row in resumed] == sorted({row["image_id"] for row in resumed}), "no duplicates"
    assert resumed == rows_of(reference)
    assert not (output / STAGING_DIR).exists()
    assert json.loads((output / RUN_FILE).read_text())["counts"]["resumed"] == staged
    assert f"80 ({staged} staged by an earlier attempt)" in result.output, "images/s counts this attempt's rows"

    again = runner.invoke(
        app, ["segment", str(images), str(output), "--model", "unet", "--weights", weights, "--run-id", "nightly", "--resume"]
    )
    assert again.exit_code == 0 and "80" in again.output, "resuming a committed run changes nothing"
    assert rows_of(output) == resumed


def test_resume_needs_the_run_id(shapes, tmp_path):
    result = runner.invoke(app, ["segment", str(shapes.images_dir), str(tmp_path / "o"), "--model", "unet", "--weights", "random", "--resume"])
    assert result.exit_code == 2 and "--run-id" in result.output


def test_resume_refuses_rows_staged_by_another_model_and_goes_on_with_its_own(shapes, tmp_path):
    output = tmp_path / "out"
    staging = output / STAGING_DIR / "nightly"
    staging.mkdir(parents=True)
    began = {
        "input": str(shapes.images_dir), "image_root": None, "limit": None, "prompts": None,
        "model": "fcn", "weights_sha256": None, "score_threshold": None, "options": {},
    }  # fmt: skip
    (staging / ATTEMPT_FILE).write_text(json.dumps(began))
    args = ["segment", str(shapes.images_dir), str(output), "--model", "unet", "--weights", "random", "--run-id", "nightly", "--resume"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "run nightly" in refused.output and "model ('fcn', now 'unet')" in " ".join(refused.output.split())
    (staging / ATTEMPT_FILE).write_text(json.dumps({**began, "model": "unet"}))
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert len(rows_of(output)) == len(list(shapes.images_dir.glob("*.png")))
