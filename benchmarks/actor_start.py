"""What an inference actor's process spends before its first result, step by step, alone.

Runs, in a fresh Python process with nothing else on the cores, what a new Ray actor
process runs for the U-Net: import Ray (done by every Ray worker at start), import Ray Data
(the actor pool's worker class lives there), import the actor class and the inference module
(torch, PIL, pycocotools, rayseg), build the model from its weights, then two calls of a
block of images, decoded, segmented and encoded. Prints wall and CPU seconds per step; the
sum is the floor of a run's start-up on one free core, before Ray's own process start and
any competition for the cores.

    .venv/bin/python -m benchmarks.actor_start [--images build/bench/fixtures-128x128-500/images]
        [--weights build/bench/unet-weights] [--block 16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

STEPS = """
import glob, os, resource, time

def clock():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime

marks = [("start", *clock())]
import ray
marks.append(("import ray", *clock()))
import ray.data
from ray.data._internal.execution.operators import actor_pool_map_operator
marks.append(("import Ray Data and its actor pool", *clock()))
from rayseg.pipeline import inference
from rayseg.pipeline.actor import SegmentImagesAndEncode
from rayseg.pipeline.decode import MODEL_MAX_PIXELS
from rayseg.pipeline.model_spec import ModelSpec
marks.append(("import rayseg's inference (torch, PIL, pycocotools)", *clock()))
import numpy as np
actor = SegmentImagesAndEncode(
    ModelSpec("unet", WEIGHTS, score_threshold=0.5), storage_options=None, torch_threads=1,
    model_max_pixels=MODEL_MAX_PIXELS, decode_options={"storage_options": None, "max_pixels": 10**9}, batch_size=8,
)
marks.append(("build the model", *clock()))
uris = sorted(glob.glob(os.path.join(IMAGES, "*.png")))[:BLOCK]
block = {
    "image_id": np.array([os.path.basename(u) for u in uris], dtype=object),
    "uri": np.array(uris, dtype=object),
    "error": np.full(len(uris), None, dtype=object),
}
for call in ("first", "second"):
    rows = sum(table.num_rows for table in actor(block))
    assert rows == len(uris)
    marks.append((f"{call} call: {len(uris)} images", *clock()))
for (_, wall0, cpu0), (name, wall1, cpu1) in zip(marks, marks[1:]):
    print(f"{name:55s} {wall1 - wall0:6.3f} s wall {cpu1 - cpu0:6.3f} CPU-s")
print(f"{'total to the first result':55s} {marks[-2][1] - marks[0][1]:6.3f} s wall {marks[-2][2] - marks[0][2]:6.3f} CPU-s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="build/bench/fixtures-128x128-500/images")
    parser.add_argument("--weights", default="build/bench/unet-weights")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    program = f"IMAGES, WEIGHTS, BLOCK = {args.images!r}, {args.weights!r}, {args.block}\n{STEPS}"
    for run in range(1, args.repeat + 1):
        print(f"run {run}:", flush=True)
        subprocess.run([sys.executable, "-c", program], check=True)


if __name__ == "__main__":
    main()
