"""benchmarks/gpu_check.sh, dry: on a machine without CUDA every CUDA step says "skipped: no
CUDA", the steps that need none still run, and the report is written whatever happens."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CUDA_STEPS = ("cuda-tests", "parity", "gpu-decode", "harness")


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def rows(report: str) -> dict[str, str]:
    """The summary table: step → result."""
    found = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("step", "---"):
            found[cells[0]] = cells[1]
    return found


def test_the_gpu_check_dry_run_reports_every_cuda_step_skipped_and_writes_its_report(tmp_path):
    report = tmp_path / "check" / "report.md"
    started = time.monotonic()
    done = gpu_check("--dry-run", "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30, "a dry run takes seconds"
    text = report.read_text()
    steps = rows(text)
    skipped = "skipped: dry run" if torch.cuda.is_available() else "skipped: no CUDA"
    assert {step: steps.get(step) for step in CUDA_STEPS} == dict.fromkeys(CUDA_STEPS, skipped)
    # What needs no CUDA ran: the install check, the CUDA probe, the families' list.
    assert steps["install"].startswith("ok") and steps["cuda"].startswith("ok") and steps["families"].startswith("ok")
    assert "dry run; CUDA: " + ("yes" if torch.cuda.is_available() else "no") in text
    families = next(line for line in text.splitlines() if line.startswith("Model families:")).split(":")[1].split()
    assert {"unet", "maskrcnn", "sam", "oneformer", "threshold"} <= set(families)
    assert "tests/test_gpu_path.py" in text and "tests/test_gpu_decode.py" in text  # the CUDA-only tests found
    assert (tmp_path / "check" / "logs" / "families.log").is_file()


def test_a_step_that_cannot_run_is_recorded_and_the_others_still_report(tmp_path):
    report = tmp_path / "report.md"
    done = gpu_check("--dry-run", "--report", str(report), "--budget-s", "0")
    assert done.returncode == 1
    steps = rows(report.read_text())
    assert steps["cuda"].startswith("skipped: out of time") and steps["families"].startswith("skipped: out of time")
    assert set(CUDA_STEPS) <= set(steps)


def test_bad_arguments_are_refused_before_any_step():
    done = gpu_check("--dry-run", "--images", "many")
    assert done.returncode == 2 and "whole numbers" in done.stderr
    assert gpu_check("--frobnicate").returncode == 2
