"""Where a short run's start-up goes, process by process.

Starts a local Ray as the CLI does, lets it settle, runs `rayseg segment` (run_segment_spec)
over a few images, then prints one line per Ray worker process that did anything during
the run: what it ran (Ray's task timeline, `ray.timeline()`), when the raylet started its
process (the raylet's log), when its code began and when it was ready (an actor's
constructor returned, a task ended), all in seconds from the start of the run; then the
CPU-seconds of every process kind over the run (user + sys, from /proc).

    .venv/bin/python -m benchmarks.startup_timeline [--images build/bench/fixtures-128x128-500/images]
        [--limit 16] [--model unet] [--weights build/bench/unet-weights] [--option KEY=JSON ...]
        [--actors N|MIN:MAX]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# "[2026-11-26 04:41:19,140 I 14011 14011] (raylet) worker_pool.cc:564: Started worker process with pid 14195 worker_id=b7ee…"
WORKER_STARTED = re.compile(r"^\[(\S+ \S+),(\d{3}) .*Started worker process with pid (\d+) worker_id=(\w+)")


@dataclass
class Worker:
    """One Ray worker process: what it ran and when (epoch seconds)."""

    spawned: float | None = None
    roles: list[str] = field(default_factory=list)
    first_code: float | None = None
    ready: float | None = None


def worker_spawns(raylet_log: Path) -> dict[str, float]:
    """worker id → when the raylet started its process (epoch seconds, the log's local time)."""
    spawns = {}
    for line in raylet_log.read_text().splitlines():
        if match := WORKER_STARTED.match(line):
            stamp, millis, _, worker_id = match.groups()
            spawns[worker_id] = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    return spawns


def workers_from_timeline(events: list[dict], spawns: dict[str, float], since: float) -> dict[str, Worker]:
    """The workers whose tasks or actor calls ran after `since`, from Ray's timeline events."""
    workers: dict[str, Worker] = {}
    for event in sorted(events, key=lambda e: e.get("ts", 0)):
        category, thread = event.get("cat", ""), event.get("tid", "")
        if event.get("ph") != "X" or not category.startswith("task::") or not thread.startswith("worker:"):
            continue
        begin, end = event["ts"] / 1e6, (event["ts"] + event["dur"]) / 1e6
        if end < since:
            continue
        worker_id = thread.removeprefix("worker:")
        worker = workers.setdefault(worker_id, Worker(spawned=spawns.get(worker_id)))
        # "task::Write", "task::MapWorker(MapBatches(SegmentImages)).__init__",
        # "task::datasets_stats_actor:_StatsActor.__init__" (a named actor), "task::Class.method".
        name = category.removeprefix("task::")
        constructor = name.endswith(".__init__")
        name = name.removesuffix(".__init__").rpartition(":")[2]
        method_call = not constructor and "." in name.rpartition(")")[2]
        if worker.first_code is None:
            worker.first_code = begin
        if method_call:
            continue
        if name not in worker.roles:
            worker.roles.append(name)
        if worker.ready is None:
            worker.ready = end
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="build/bench/fixtures-128x128-500/images")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--weights", default="build/bench/unet-weights")
    parser.add_argument("--option", action="append", default=[], help="a model option, KEY=JSON (e.g. min_size=240)")
    parser.add_argument("--actors", default=None, help="N or MIN:MAX (default: the pipeline's plan)")
    args = parser.parse_args()

    # A local head without token authentication, as the other benchmarks start it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray.data

    from rayseg.jobs import cluster
    from rayseg.jobs.runner import run_segment_spec
    from rayseg.jobs.spec import parse_spec

    from .common import ProcessTreeSampler

    sampler = ProcessTreeSampler()
    cluster.connect()
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler.wait_idle()
    with tempfile.TemporaryDirectory() as scratch:
        spec = {
            "kind": "segment",
            "input": str(Path(args.images).resolve()),
            "limit": args.limit,
            "output": str(Path(scratch) / "output"),
            "model": {
                "name": args.model,
                "weights": str(Path(args.weights).resolve()),
                "options": {key: json.loads(value) for key, _, value in (o.partition("=") for o in args.option)},
            },
        }
        if args.actors:
            spec["resources"] = {"actors": args.actors}
        sampler.start()
        started = time.time()
        summary = run_segment_spec(parse_spec(spec, source="startup_timeline"), storage_options={})
        finished = time.time()
        measured = sampler.stop()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    workers = workers_from_timeline(ray.timeline(), worker_spawns(session / "logs" / "raylet.out"), started)
    ray.shutdown()

    def at(moment: float | None) -> str:
        if moment is None:
            return ""
        return "before the run (Ray's idle worker)" if moment < started else f"{moment - started:.2f}"

    print(f"{summary.ok} images ok, run {finished - started:.2f} s (ray.init before it, not counted)\n")
    print("| worker | process started s | code began s | ready s |")
    print("|---|---|---|---|")
    for worker in sorted(workers.values(), key=lambda w: w.first_code or 0):
        print(f"| {', '.join(worker.roles)} | {at(worker.spawned)} | {at(worker.first_code)} | {at(worker.ready)} |")
    print("\n| process | CPU-s during the run |")
    print("|---|---|")
    for name, cpu in sorted(measured.by_process.items(), key=lambda kv: -kv[1]):
        if cpu >= 0.01:
            print(f"| {name} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
