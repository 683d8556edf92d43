"""A million images on one machine: throughput by decile, memory against 100k, spill, output
files, and a SIGKILL half way with `--resume` equal to the uninterrupted run.

    .venv/bin/python -m benchmarks.million [--small 100000] [--large 1000000] [--files 2000]
        [--workdir build/million] [--skip-resume] [--output-file-mib M]

Each run is `rayseg segment MANIFEST OUT --model threshold --weights random` (the example
outside family, registered by entry point: the pipeline's own cost, no model's) in a fresh
process, on a Parquet manifest of distinct image ids over `--files` generated 32×32 PNGs,
each file referenced many times. Sampled every second: the PSS of the driver (the rayseg
process) and of its whole process tree (Ray's object store counted once). Throughput per
decile comes from the progress samples the run records in `_run.json`; spill from Ray
Data's counters there and from the spill directory of the run's Ray session.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .common import TreeAndDriverSampler, machine, repeated_manifest, small_images, tree

RAYSEG = ".venv/bin/rayseg"
PROGRESS = re.compile(r"([\d,]+) of ([\d,]+) images")


def run_segment(manifest: Path, output: Path, *extra: str, kill_at: float | None = None) -> dict:
    """One `rayseg segment` run, measured; with `kill_at` (a fraction), SIGKILLs the driver
    once its progress line passes that fraction, then the rest of its Ray."""
    command = [RAYSEG, "segment", str(manifest), str(output), "--model", "threshold", "--weights", "random", *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeAndDriverSampler(process.pid, interval=1.0)
    sampler.start()
    log, killed = [], None
    for line in process.stdout:
        log.append(line)
        found = PROGRESS.search(line)
        if kill_at is not None and killed is None and found:
            done, total = (int(g.replace(",", "")) for g in found.groups())
            if done >= kill_at * total:
                ray_processes = tree(psutil.Process(process.pid))[1:]
                os.kill(process.pid, signal.SIGKILL)
                killed = done
                time.sleep(2)
                for child in ray_processes:  # the local Ray the driver started goes with it
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
                break
    process.wait()
    sampler.stop()
    seconds = time.perf_counter() - started
    if killed is None and process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(log[-60:])}")
    result = {
        "seconds": round(seconds, 1),
        "driver_peak_pss_mib": round(sampler.driver_peak / 2**20),
        "tree_peak_pss_mib": round(sampler.tree_peak / 2**20),
    }
    if killed is not None:
        result["killed_at_rows"] = killed
        return result
    run = json.loads((output / "_run.json").read_text())
    result.update(
        images=run["counts"]["images"],
        resumed=run["counts"]["resumed"],
        run_seconds=run["timings"]["seconds"],
        images_per_second=run["timings"]["images_per_second"],
        deciles=decile_rates(run["progress"]["samples"], run["counts"]["images"] - run["counts"]["resumed"]),
        spilled_bytes_ray_data=run["progress"]["spilled_bytes"],
        spill_dir_bytes=spill_dir_bytes(log),
        files=[(name, round((output / name).stat().st_size / 2**20, 1)) for name in run["files"]],
        progress_lines=sum(1 for line in log if PROGRESS.search(line)),
    )
    return result


def decile_rates(samples: list[list], total: int) -> list[int]:
    """Images/s within each tenth of the run's rows, from (seconds, rows done) samples,
    interpolated linearly between them."""
    seconds = np.array([s[0] for s in samples], dtype=float)
    done = np.array([s[1] for s in samples], dtype=float)
    marks = np.interp(np.linspace(0, total, 11), done, seconds)
    # The first decile starts at the first row out, not at the start: that is time to first batch.
    first = seconds[np.argmax(done > 0)] if (done > 0).any() else 0.0
    marks[0] = max(marks[0], first - (seconds[1] - seconds[0] if len(seconds) > 1 else 0.0))
    return [round(total / 10 / (b - a)) if b > a else 0 for a, b in zip(marks[:-1], marks[1:])]


def spill_dir_bytes(log: list[str]) -> int | None:
    """Bytes in the spill directory of the Ray session the run's log names."""
    for line in log:
        found = re.search(r"(/tmp/ray/session_[^/\s]+)", line)
        if found:
            session = Path(found.group(1))
            spilled = [p for p in session.rglob("*") if "spill" in p.name and p.is_dir()]
            return sum(f.stat().st_size for d in spilled for f in d.rglob("*") if f.is_file())
    return None


def committed_table(output: Path):
    run = json.loads((output / "_run.json").read_text())
    table = pq.read_table([str(output / name) for name in run["files"]])
    return table.take(pc.sort_indices(table, [("image_id", "ascending")]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--workdir", default="build/million")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--output-file-mib", help="passed to every run (default: rayseg's)")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = work / "fixtures" / "images"
    if not images.exists():
        small_images(work / "fixtures", args.files, 32)
    report = {"machine": machine(), "files": args.files, "load_before": os.getloadavg()}
    sizing = ("--output-file-mib", args.output_file_mib) if args.output_file_mib else ()
    for rows in (args.small, args.large):
        manifest = work / f"manifest-{rows}.parquet"
        if not manifest.exists():
            repeated_manifest(images, rows, manifest)
        output = work / f"out-{rows}-{int(time.time())}"
        report[rows] = run_segment(manifest, output, *sizing)
        report[rows]["output"] = str(output)
        print(rows, json.dumps(report[rows]), flush=True)
    large = report[args.large]
    report["tree_growth"] = round(large["tree_peak_pss_mib"] / report[args.small]["tree_peak_pss_mib"], 3)
    report["driver_growth"] = round(large["driver_peak_pss_mib"] / report[args.small]["driver_peak_pss_mib"], 3)
    if not args.skip_resume:
        manifest = work / f"manifest-{args.large}.parquet"
        output = work / f"resumed-{int(time.time())}"
        first = run_segment(manifest, output, "--run-id", "million", *sizing, kill_at=0.5)
        staged = sorted((output / "_staging" / "million").glob("*.parquet"))
        first["staged_files"] = len(staged)
        first["staged_rows"] = sum(pq.read_metadata(p).num_rows for p in staged if p.stat().st_size > 0)
        print("killed", json.dumps(first), flush=True)
        second = run_segment(manifest, output, "--run-id", "million", "--resume", *sizing)
        print("resumed", json.dumps(second), flush=True)
        resumed, uninterrupted = committed_table(output), committed_table(Path(large["output"]))
        second["rows"] = resumed.num_rows
        second["distinct_ids"] = pc.count_distinct(resumed["image_id"]).as_py()
        second["equal_to_uninterrupted"] = resumed.equals(uninterrupted)
        report["resume"] = {"first_attempt": first, "resume": second}
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
