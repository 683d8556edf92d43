"""What a user sees: results on stdout, rayseg's own messages and progress on stderr, and
none of Ray's own lines that say nothing of the run."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from rayseg.jobs import terminal
from rayseg.pipeline import progress


@pytest.fixture
def root_logging():
    """configure_logging sets the process's logging; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level, watchers = root.handlers[:], root.level, progress.WATCHERS[:]
    yield
    root.handlers[:], progress.WATCHERS[:] = handlers, watchers
    root.setLevel(level)


def test_to_a_file_or_pipe_each_message_is_one_plain_line_and_no_bar_watches(root_logging, capsys):
    terminal.configure_logging(verbose=False)
    assert progress.WATCHERS == []
    logging.getLogger("rayseg.progress").info("%s", "1,234 of 10,000 images (12.3%) · 812/s · 0 errors · ETA 11s · stages: " + "Read 1,536, " * 20)
    logging.getLogger("rayseg").debug("not shown without -v")
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO 1,234 of 10,000 images .* Read 1,536, ", line), line


def test_in_a_terminal_each_run_is_a_bar_of_images_done_of_all_with_rate_errors_and_time_left(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(terminal, "console", Console(file=screen, force_terminal=True, width=120))
    bar = terminal.ProgressBar()
    bar(progress.Snapshot(run=1, done=0, expected=20, errors=None))
    bar(progress.Snapshot(run=1, done=12, expected=20, errors=0))
    bar(progress.Snapshot(run=1, done=20, expected=20, errors=1, final=True))
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).replace("\r", "\n").splitlines()[-1]
    assert re.search(r"images .* 20/20 [\d,]+/s 1 errors .*ETA", last), last
    assert bar._bars == {}, "a finished run's bar is gone: the next run gets its own"


def test_ray_s_native_constructor_arguments_line_is_dropped_and_every_other_byte_passed_on():
    noise = f"[2026-12-07 10:55:54,952 E 28709 28709] core_worker.cc:2465: Actor with class name: 'MapWorker' {terminal.NATIVE_NOISE[0]}. If the arguments go out of scope…"
    script = (
        "import os\n"
        "from rayseg.jobs.terminal import filter_native_stderr\n"
        "filter_native_stderr()\n"
        f"os.write(2, {noise.encode()!r} + b'\\nkept line\\n')\n"
        "os.write(2, b'a partial line')\n"
        "os.abort()  # a crash: the filter, a process of its own, still passes on the last words\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.decode() == "kept line\na partial line"


@pytest.mark.slow
def test_the_demo_on_its_own_local_ray_prints_no_warning_or_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COLUMNS")}
    rayseg = os.path.join(os.path.dirname(sys.executable), "rayseg")
    result = subprocess.run([rayseg, "demo", str(tmp_path / "demo"), "--images", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines() if re.search(r"WARNING|ERROR| E \d+ \d+\]|Total Progress|Traceback", line)]
    assert noise == [], "\n".join(noise)
    assert re.search(r"INFO 4 of 4 images \(100\.0%\)", result.stderr), result.stderr
    assert "mIoU" in result.stdout and "segm AP" in result.stdout and "report:" in result.stdout


@pytest.mark.usefixtures("ray_cluster")
def test_an_output_folder_reads_whole_in_pyarrow_pandas_and_ray_and_by_its_glob_in_polars(shapes, tmp_path):
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq
    import ray
    from typer.testing import CliRunner

    from rayseg.jobs.cli import app

    output = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", str(shapes.images_dir), str(output), "--model", "threshold", "--weights", "random"])
    assert result.exit_code == 0, result.output
    assert (output / "_run.json").exists()
    assert pq.read_table(output).num_rows == len(pd.read_parquet(output)) == ray.data.read_parquet(str(output)).count() == 20
    assert pl.scan_parquet(f"{output}/*.parquet").select(pl.len()).collect().item() == 20
