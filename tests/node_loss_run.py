"""A segment run on a two-node Ray cluster whose worker node is removed mid-run.

    RAY_TMPDIR=/tmp/short python -m rayseg.tests.node_loss_run IMAGES OUTPUT

Run by tests/test_reliability.py in a subprocess: a process holds one Ray, and the test
session already runs one. Starts a head and a worker node (1 CPU each) with
`ray.cluster_utils.Cluster`, runs `segment` + `write_run` in a thread, kills the worker
node once it hosts an inference actor and some output is staged, adds a replacement node
(as an autoscaler would), lets the run finish, and prints a JSON summary as its last line
of stdout (exit status 1 when the run failed or stalled).

RAY_TMPDIR must be set (to a short private directory) before Ray is imported: the cluster
writes its address to RAY_TMPDIR/ray_current_cluster, which every `ray.init()` on the
machine would otherwise find and join.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import psutil

from rayseg.tests.own_ray_script import run_script

# A run takes ~25 s on a loaded 2-core machine; past this, it reports itself stalled.
RUN_DEADLINE_S = 150


def processes_on(node) -> list[psutil.Process]:
    """The processes a node's raylet started: its workers and actors."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    try:
        return psutil.Process(raylet.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def hosts_inference_actor(node) -> bool:
    for process in processes_on(node):
        try:
            if "SegmentImages" in " ".join(process.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def staged_files(output: Path) -> int:
    return len(list((output / "_staging").rglob("*.parquet"))) if (output / "_staging").exists() else 0


def print_diagnostics() -> None:
    """What a stalled run was waiting for: free resources per node, Ray Data's last log lines."""
    import ray

    print(f"available per node: {ray._private.state.available_resources_per_node()}", file=sys.stderr)
    for log in Path(os.environ["RAY_TMPDIR"]).glob("ray/session_latest/logs/ray-data/ray-data*.log"):
        print(f"--- {log.name}:\n" + "\n".join(log.read_text().splitlines()[-60:]), file=sys.stderr, flush=True)


def main(images: str, output: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    node_args = {"num_cpus": 1, "object_store_memory": 96 * 1024 * 1024}
    # The GCS declares a node dead after `threshold` failed health checks, `period` apart:
    # ~5 s here instead of Ray's default ~15 s, to keep the test short. A removed node
    # refuses connections, so every check after the removal fails; a slow but live node on
    # this loaded machine still answers within the (default, 10 s) timeout.
    failure_detection = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "include_dashboard": False, "_system_config": failure_detection},
    )
    try:
        worker = cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Two half-CPU actors, one torch thread each: Ray Data spreads them over the nodes,
        # so one of them is on the node that dies.
        plan = plan_resources(ray.cluster_resources(), nodes=2, actors=(2, 2), batch_size=2)
        rows = segment(read_source(images, parallelism=12), ModelSpec("unet"), plan)

        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = write_run(
                    rows, output, run_id="node-loss", run_info={}, write_cpus=plan.task_cpus, rows_per_file=4
                )
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
                outcome["error"] = f"{type(e).__name__}: {e}"

        started = time.monotonic()
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        removal: dict = {"removed": False}
        next_report = started
        while runner.is_alive() and time.monotonic() < started + RUN_DEADLINE_S:
            if not removal["removed"]:
                on_worker, staged = hosts_inference_actor(worker), staged_files(Path(output))
                if on_worker and staged > 0:
                    removal = {
                        "removed": True,
                        "after_seconds": round(time.monotonic() - started, 1),
                        "files_staged_before": staged,
                    }
                    print(f"removing the worker node: {removal}", file=sys.stderr, flush=True)
                    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL, as a crash
                    # A replacement joins when it is up, as an autoscaler's would: the
                    # pool's minimum of two half-CPU actors plus the tasks around them needs
                    # more than the head's one CPU, and Ray Data waits for capacity rather
                    # than run less.
                    cluster.add_node(wait=False, **node_args)
            if time.monotonic() >= next_report:  # progress, for the test's failure message
                print(f"{time.monotonic() - started:.0f} s: {removal}, {staged_files(Path(output))} files staged", file=sys.stderr, flush=True)
                next_report += 10
            time.sleep(0.05)
        if runner.is_alive():
            outcome["error"] = f"no result after {RUN_DEADLINE_S} s"
            print_diagnostics()
        summary = outcome.get("summary")
        return {
            **removal,
            "error": outcome.get("error"),
            "images": summary and summary.images,
            "ok": summary and summary.ok,
            "files_staged_total": summary and summary.files,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    run_script(main)
