"""Peak memory of `rayseg export coco` and `rayseg evaluate` at 100k vs 1,000,000 rows (issue 25).

Streaming means memory must not grow with the number of rows: goal peak(1M) ≤ 1.5× peak(100k).

The prediction OUTPUT is what a `threshold`-model (semantic) run over a COCO json would
commit: image_id = str(COCO id) ("1", "2", …, so `export coco` needs no ground truth),
32×32 images with 3 segments each (real pycocotools RLE of a few distinct label maps,
cycled), uris cycling over a few thousand fixture PNGs, files of 200k rows in row groups of
10k, and a `_run.json` with the keys pipeline/sink.py writes. It is written with pyarrow
directly (a segment run of a million images would take hours here).

The semantic ground truth is a directory of label PNGs named `<image_id>.png` (how
GroundTruth.match finds them: the id's stem + ".png", in the directory itself, so one flat
directory): LABELS distinct small PNGs, each hard-linked (os.link) under the names of the
images whose prediction it scores, so a million entries cost directory entries, no inodes.

Each command runs in a fresh subprocess, sampled every 0.5 s: wall time, peak PSS of its
whole process tree (driver, and for evaluate the local Ray: GCS, raylet, workers) and of
the driver alone. A last probe loads the ground truth's index alone, to split the driver's
memory into index and the rest.

Run: .venv/bin/python -m benchmarks.export_memory [--sizes 100000 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.schema import OUTPUT_SCHEMA
from rayseg.pipeline.sink import RUN_FILE

from .common import TreeAndDriverSampler, machine

SIDE = 32
PATTERNS = 4  # distinct predicted label maps, cycled over the rows
LABELS = 2000  # distinct ground-truth label PNGs (and fixture images), cycled
FILE_ROWS = 200_000
ROW_GROUP_ROWS = 10_000


def measured(command: list[str]) -> dict:
    """Runs `command`; wall seconds, peak tree and driver PSS (MiB), the load around it."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeAndDriverSampler(process.pid)
    sampler.start()
    output, _ = process.communicate()
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "tree_peak_pss_mib": round(sampler.tree_peak / 2**20),
        "driver_peak_pss_mib": round(sampler.driver_peak / 2**20),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def label_maps() -> list[np.ndarray]:
    """PATTERNS label maps of 3 classes (1, 2, 3) on 32×32: bands at different offsets."""
    maps = []
    for k in range(PATTERNS):
        rows = (np.arange(SIDE)[:, None] + 3 * k + np.arange(SIDE)[None, :] // 8) % 12
        maps.append(1 + np.minimum(rows // 4, 2))
    return maps


def write_fixtures(work: Path) -> tuple[Path, Path]:
    """LABELS fixture images and LABELS label PNGs; label j is pattern j % PATTERNS rolled by
    (j // PATTERNS) % 3 pixels, so predictions are good but not perfect."""
    images, labels = work / "images", work / "labels"
    if not (labels / f"{LABELS - 1}.png").exists():
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        maps = label_maps()
        for j in range(LABELS):
            label = np.roll(maps[j % PATTERNS], (j // PATTERNS) % 3, axis=1).astype(np.uint8)
            Image.fromarray(label, mode="L").save(labels / f"{j}.png")
            Image.fromarray(np.stack([label * 60] * 3, axis=-1)).save(images / f"{j}.png")
    return images, labels


def pattern_table() -> pa.Table:
    """One OUTPUT_SCHEMA row per pattern, 3 segments each (RLE from pycocotools)."""
    rows = []
    for k, predicted in enumerate(label_maps()):
        segments = [syn.segment(c, predicted == c, score=0.9 - c / 10, label=f"class {c}") for c in (1, 2, 3)]
        rows.append(syn.row(str(k), SIDE, SIDE, segments, model="threshold"))
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def write_output(rows: int, output: Path, images: Path) -> None:
    """`rows` prediction rows as a committed OUTPUT (part files + `_run.json`)."""
    if (output / RUN_FILE).exists():
        return
    output.mkdir(parents=True)
    patterns = pattern_table()
    files = []
    for index, first in enumerate(range(0, rows, FILE_ROWS)):
        numbers = np.arange(first, min(first + FILE_ROWS, rows))
        table = patterns.take(pa.array(numbers % PATTERNS))
        ids = pa.array([str(n + 1) for n in numbers.tolist()], pa.string())
        uris = pa.array([f"file://{images}/{n % LABELS}.png" for n in numbers.tolist()], pa.string())
        table = table.set_column(0, OUTPUT_SCHEMA.field("image_id"), ids).set_column(1, OUTPUT_SCHEMA.field("uri"), uris)
        name = f"part-{index:05d}.parquet"
        pq.write_table(table, output / name, row_group_size=ROW_GROUP_ROWS)
        files.append(name)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {
        "run_id": f"synthetic-{rows}",
        "status": "complete",
        "input": "synthetic.json",
        "model": "threshold",
        "weights": None,
        "weights_sha256": None,
        "spec": {"model": {"name": "threshold", "options": {}}},
        "counts": {"images": rows, "ok": rows, "error": 0, "segments": 3 * rows, "files": len(files), "repeated_image_ids": 0, "resumed": 0},
        "timings": {"started": now, "finished": now, "seconds": 0.0, "images_per_second": 0.0},
        "files": files,
    }
    (output / RUN_FILE).write_text(json.dumps(record, indent=2))


def write_ground_truth(rows: int, directory: Path, labels: Path) -> None:
    """`<id>.png` for ids 1…rows, hard links to the label PNG that scores the row."""
    if (directory / f"{rows}.png").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(rows):
        os.link(labels / f"{n % LABELS}.png", directory / f"{n + 1}.png")


INDEX_PROBE = """
import gc, json, sys, psutil
from rayseg.pipeline.evaluation.data import load_ground_truth
p = psutil.Process()
before = p.memory_full_info().pss
gt = load_ground_truth(sys.argv[1], "semantic")
gc.collect()
after = p.memory_full_info().pss
print(json.dumps({"images": len(gt.images), "index_mib": round((after - before) / 2**20), "before_mib": round(before / 2**20)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/rayseg-export-memory", help="kept between runs: data is made once")
    parser.add_argument("--skip", nargs="*", default=[], choices=["export", "evaluate"])
    args = parser.parse_args()
    work = Path(args.work)
    images, labels = write_fixtures(work)
    rayseg = str(Path(sys.executable).with_name("rayseg"))
    results: dict = {}
    for rows in args.sizes:
        output, gt = work / f"out-{rows}", work / f"gt-{rows}"
        started = time.perf_counter()
        write_output(rows, output, images)
        write_ground_truth(rows, gt, labels)
        print(f"{rows} rows: data ready in {time.perf_counter() - started:.0f} s", flush=True)
        entry = results.setdefault(rows, {"export": [], "evaluate": []})
        for repeat in range(args.repeats):
            if "export" not in args.skip:
                entry["export"].append(measured([rayseg, "export", "coco", str(output), str(work / f"results-{rows}.json")]))
                print(rows, "export", repeat, entry["export"][-1], flush=True)
            if "evaluate" not in args.skip:
                report = work / f"report-{rows}"
                entry["evaluate"].append(
                    measured([rayseg, "evaluate", str(output), "--annotations", str(gt), "--report", str(report), "--task", "semantic"])
                )
                evaluated = json.loads((report / "report.json").read_text())["images"]["evaluated"]
                assert evaluated == rows, f"evaluated {evaluated} of {rows}"
                print(rows, "evaluate", repeat, entry["evaluate"][-1], flush=True)
        if "evaluate" not in args.skip:
            probe = subprocess.run([sys.executable, "-c", INDEX_PROBE, str(gt)], capture_output=True, text=True, check=True)
            entry["ground_truth_index"] = json.loads(probe.stdout)
            print(rows, "ground truth index", entry["ground_truth_index"], flush=True)
    small, large = min(args.sizes), max(args.sizes)
    ratios = {}
    for command in ("export", "evaluate"):
        for key in ("tree_peak_pss_mib", "driver_peak_pss_mib", "seconds"):
            pairs = list(zip(results[small][command], results[large][command]))
            if pairs:
                ratios[f"{command} {key}"] = [round(b[key] / a[key], 2) for a, b in pairs]
    print(json.dumps({"machine": machine(), "results": results, "ratios_large_over_small": ratios}, indent=2))


if __name__ == "__main__":
    main()
