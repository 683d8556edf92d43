"""Submission through the Ray Jobs API, against a real Ray head started by the test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.jobs.cluster import ClusterError, check_reachable
from rayseg.jobs.spec import parse_spec
from rayseg.jobs.submit import job_env

runner = CliRunner()
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 with the job server, on free ports, in its own temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # Ray's socket paths must stay short
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token authentication protects real clusters; this one listens on loopback for one test.
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={free_port()}", f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as response:
                json.load(response)
            break
        except OSError:
            assert time.monotonic() < deadline, "the job server did not come up"
            time.sleep(1)
    yield address
    # Only this head's processes: `ray stop` would stop every Ray on the machine.
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            process.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def spec_file(tmp_path, **fields) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "unet", "weights": "random"}, **fields}))
    return path


def test_a_submitted_spec_runs_on_the_cluster_and_commits_its_output(ray_head, shapes, tmp_path):
    output = tmp_path / "out"
    spec = spec_file(tmp_path, input=str(shapes.images_dir), output=str(output), limit=4, resources={"batch_size": 2})
    result = runner.invoke(app, ["submit", str(spec), "--address", ray_head, "--wait", "--submission-id", "rayseg-test-ok"])
    assert result.exit_code == 0, result.output
    assert "rayseg-test-ok" in result.output and "SUCCEEDED" in result.output
    rows = pq.read_table(output).to_pylist()
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)


def test_a_failing_job_gives_a_non_zero_exit(ray_head, tmp_path):
    spec = spec_file(tmp_path, input=str(tmp_path / "no-such-images"), output=str(tmp_path / "out"))
    result = runner.invoke(app, ["submit", str(spec), "--address", ray_head, "--wait"])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "input not found" in result.output


def test_an_invalid_spec_is_refused_before_contacting_the_cluster(tmp_path):
    spec = spec_file(tmp_path, input="x")  # no output
    result = runner.invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "output: Field required" in result.output


def test_a_gcs_address_given_to_submit_is_refused_naming_the_jobs_api(tmp_path):
    spec = spec_file(tmp_path, input="x", output="y")
    result = runner.invoke(app, ["submit", str(spec), "--address", "127.0.0.1:6379"])
    assert result.exit_code == 2 and "is not the Ray Jobs API's URL: give http://HEAD:8265" in " ".join(result.output.split())


def test_submit_to_a_jobs_api_that_does_not_answer_exits_2_naming_it_and_submits_nothing(tmp_path):
    spec = spec_file(tmp_path, input="x", output="y")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
        result = runner.invoke(app, ["submit", str(spec), "--address", address])
    assert result.exit_code == 2 and result.stdout == ""
    assert f"error: cannot reach Ray at {address}" in result.stderr and "dashboard port (8265" in result.stderr


def test_jobs_carry_referenced_and_standard_storage_variables_only():
    spec = parse_spec({"input": "s3://b/i", "output": "s3://b/o", "model": {"name": "unet", "weights": "random"}, "storage": {"env": {"token": "MY_TOKEN"}}})
    environ = {"MY_TOKEN": "t", "AWS_ENDPOINT_URL": "http://minio:9000", "HOME": "/root", "UNRELATED": "x"}
    assert job_env(spec, environ) == {"MY_TOKEN": "t", "AWS_ENDPOINT_URL": "http://minio:9000"}


def test_an_address_that_does_not_answer_fails_fast_naming_it():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        with pytest.raises(ClusterError, match=f"cannot reach Ray at ray://127.0.0.1:{port}: .*client port"):
            check_reachable(f"ray://127.0.0.1:{port}")
        assert time.monotonic() - started < 5
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
    check_reachable("auto")  # no port: left to ray.init
