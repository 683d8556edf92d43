"""Peak memory of a whole `rayseg segment` run (driver + Ray) at 1k vs 10k images.

Streaming means memory must not grow with the number of images: goal ≤ 1.2× growth
from 1k to 10k. Run: .venv/bin/python -m benchmarks.streaming_memory [--small 1000 --large 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .common import machine, repeated_manifest, run_measured, small_images, tiny_unet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rayseg-bench-"))
    images = small_images(work / "fixtures", 500, args.size)
    weights = tiny_unet(work / "unet")
    results = {}
    for count in (args.small, args.large):
        manifest = repeated_manifest(images, count, work / f"manifest-{count}.parquet")
        seconds, peak, output = run_measured(
            [".venv/bin/rayseg", "segment", str(manifest), str(work / f"out-{count}"), "--model", "unet", "--weights", str(weights)]
        )
        run = json.loads((work / f"out-{count}" / "_run.json").read_text())
        assert run["counts"]["images"] == count, run["counts"]
        results[count] = {"seconds": round(seconds, 1), "peak_pss_mib": round(peak / 2**20), "images_per_second": run["timings"]["images_per_second"]}
        print(count, results[count], flush=True)
    growth = results[args.large]["peak_pss_mib"] / results[args.small]["peak_pss_mib"]
    print(json.dumps({"machine": machine(), "image_size": args.size, "results": results, "growth": round(growth, 3)}, indent=2))


if __name__ == "__main__":
    main()
