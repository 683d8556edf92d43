"""On a cluster that advertises GPUs, actors are scheduled onto them by default — and a
process without CUDA (as here, where the GPU is only declared) falls back to the CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pyarrow.parquet as pq

SCRIPT = textwrap.dedent(
    """
    import json, sys, ray
    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    images, output, ray_dir = sys.argv[1:4]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=ray_dir)
    plan = plan_resources(ray.cluster_resources())
    rows = segment(read_source(images, limit=3), ModelSpec("unet"), plan)
    write_run(rows, output, run_id="gpu", run_info={}, write_cpus=plan.task_cpus)
    # A user's own dataset: int ids, and a block whose only uri is None (Ray makes it NaN).
    items = [{"image_id": 7, "uri": images + "/000000.png"}, {"image_id": 8, "uri": None}]
    own = segment(ray.data.from_items(items, override_num_blocks=2), ModelSpec("unet"), plan).take_all()
    print(json.dumps({
        "gpus_per_actor": plan.gpus_per_actor, "max_actors": plan.max_actors,
        "own": sorted((row["image_id"], row["status"], row["error"]) for row in own),
    }))
    """
)


def test_actors_take_the_declared_gpu_and_run_on_the_cpu_without_cuda(shapes, tmp_path):
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(shapes.images_dir), str(tmp_path / "out"), ray_dir],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["gpus_per_actor"], report["max_actors"]) == (1.0, 1)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert report["own"] == [["7", "ok", None], ["8", "error", "no uri"]]
    assert "this actor holds GPU" in done.stderr and "running on the CPU" in done.stderr, "the fallback is said"
