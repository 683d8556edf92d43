"""What the training workers ask of the cluster: workers, their CPUs and GPUs, and what is
left for Ray Data's decode tasks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..resources import ResourceError, gpus_per, task_cpus


@dataclass(frozen=True)
class TrainResources:
    """Ray Train workers and their share of the cluster; task_cpus: each decode task's CPUs."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    task_cpus: float
    torch_threads: int


def plan_train_resources(
    cluster: dict[str, float],
    *,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
) -> TrainResources:
    """Training workers' CPUs/GPUs from the cluster (ray.cluster_resources()), refused early
    when impossible — GPUs on a cluster without any, or workers leaving no CPU for Ray
    Data's decode tasks (the run would hang instead of failing)."""
    cluster_cpus, cluster_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_worker = gpus_per(cluster, gpus_per_worker, cpus_per_worker, "worker")
    if workers is None:
        workers = max(1, math.floor(cluster_gpus / gpus_per_worker)) if gpus_per_worker > 0 else 1
    if workers < 1:
        raise ResourceError(f"--workers must be ≥ 1, got {workers}")
    if gpus_per_worker > 0 and workers * gpus_per_worker > cluster_gpus:
        raise ResourceError(f"{workers} workers × {gpus_per_worker:g} GPUs exceeds the cluster's {cluster_gpus:g} GPUs")
    tasks = task_cpus(cluster_cpus)
    if cpus_per_worker is None:
        # What two decode tasks leave, shared by the workers (at most 8 each): fractions
        # are scheduling tokens, so on a 2-CPU machine a worker and its data tasks share.
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else min(8.0, max(0.25, (cluster_cpus - 2 * tasks) / workers))
    if workers * cpus_per_worker + tasks > cluster_cpus:
        raise ResourceError(
            f"{workers} workers × {cpus_per_worker:g} CPUs leaves no CPU for Ray Data's decode tasks on a "
            f"cluster of {cluster_cpus:g} CPUs (the run would stall); lower --workers or --cpus-per-worker"
        )
    # A worker's torch threads: its CPUs rounded up — a CPU shared with the light decode tasks
    # is still mostly the worker's: a CPU-bound training step wants every core.
    return TrainResources(workers, float(cpus_per_worker), float(gpus_per_worker), tasks, max(1, math.ceil(cpus_per_worker)))
