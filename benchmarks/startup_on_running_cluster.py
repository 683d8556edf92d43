"""Start-up of `rayseg segment` jobs on a Ray cluster that is already running, against the
first job on it.

Starts a one-node Ray cluster of this machine's CPUs (`ray.cluster_utils.Cluster`, no
dashboard), then runs `rayseg segment --address` JOBS times one after the other, each as
its own process (its own Ray job, as `rayseg submit` or a CronJob would), over the same
images into a fresh output. Per job it prints, from the run's `_run.json`: the seconds
from the start of the run to its commit, the seconds connecting took (`ray.init`), and what
is left, the job's start-up plus its images' work. Ray Data's helper actors (stats,
autoscaling coordinator, actor-location tracker) are detached, so only the first job on a
cluster starts them.

    .venv/bin/python -m benchmarks.startup_on_running_cluster [--images DIR] [--limit 16] [--jobs 3]
        [--weights build/bench/unet-weights] [--preload MODULE,...]

--preload starts the cluster with Ray's `preload_python_modules` (every worker process it
starts imports them first), e.g. torch,ray.data,rayseg.pipeline.inference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="build/bench/fixtures-128x128-500/images")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--weights", default="build/bench/unet-weights")
    parser.add_argument("--preload", default="", help="modules every Ray worker imports when it starts, comma-separated")
    args = parser.parse_args()

    # A local head without token authentication, for this process and the jobs it starts.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    head = {"num_cpus": os.cpu_count(), "include_dashboard": False}
    if args.preload:
        head["_system_config"] = {"preload_python_modules": args.preload.split(",")}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for job in range(1, args.jobs + 1):
                output = Path(scratch) / f"job-{job}"
                command = [
                    sys.executable, "-m", "rayseg.jobs.cli", "segment", args.images, str(output),
                    "--model", "unet", "--weights", args.weights, "--limit", str(args.limit),
                    "--address", cluster.address,
                ]  # fmt: skip
                subprocess.run(command, check=True, capture_output=True)
                run = json.loads((output / "_run.json").read_text())
                seconds, connect = run["timings"]["seconds"], run["ray_init_seconds"]
                print(
                    f"job {job}: {seconds:.2f} s from start to commit, of which connecting {connect:.2f} s; "
                    f"start-up and {run['counts']['images']} images' work: {seconds - connect:.2f} s",
                    flush=True,
                )
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
