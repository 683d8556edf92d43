"""Time to the first output batch from a 100k-row manifest: nothing is listed or loaded whole.

Goal ≤ 10 s (after ray.init, which is reported separately).
Run: .venv/bin/python -m benchmarks.first_batch [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from rayseg.pipeline.resources import plan_resources
from rayseg.pipeline.segment import ModelSpec, segment
from rayseg.pipeline.sources import read_source

from .common import machine, repeated_manifest, small_images, tiny_unet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rayseg-bench-"))
    images = small_images(work / "fixtures", 200, 64)
    manifest = repeated_manifest(images, args.rows, work / "manifest.parquet")
    weights = tiny_unet(work / "unet")
    started = time.perf_counter()
    ray.init(num_cpus=None, include_dashboard=False)
    ray_init = time.perf_counter() - started
    started = time.perf_counter()
    rows = segment(
        read_source(str(manifest)), ModelSpec("unet", str(weights)), plan_resources(ray.cluster_resources())
    )
    first = next(iter(rows.iter_batches(batch_size=None, batch_format="pyarrow")))
    first_batch = time.perf_counter() - started
    ray.shutdown()
    print(json.dumps({
        "machine": machine(),
        "manifest_rows": args.rows,
        "ray_init_seconds": round(ray_init, 2),
        "first_batch_seconds": round(first_batch, 2),
        "first_batch_rows": first.num_rows,
    }, indent=2))


if __name__ == "__main__":
    main()
