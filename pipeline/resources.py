"""How many inference actors, with what CPUs and GPUs: defaults from the cluster, checked early.

Two mistakes hang a Ray Data job instead of failing it, so both are refused here before any
work starts: asking for GPUs on a cluster that has none, and giving the actor pool so many
CPUs that no decode/encode task can ever run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..models.registry import DATA_PARALLEL

# CPU clusters run one single-threaded actor per core for data-parallel models, up to this
# many per node: each holds its own copy of the model. Threaded models get one actor per
# this many cores.
CPU_ACTORS_PER_NODE = 8
THREADS_PER_THREADED_ACTOR = 8


class ResourceError(ValueError):
    """A resource request this cluster can never satisfy."""


def task_cpus(cluster_cpus: float) -> float:
    """CPUs asked by each decode and encode/write task: a whole one on clusters of 8+ CPUs,
    down to a quarter on small machines.

    Every stage must be able to run at once — a manifest reader (1 CPU, Ray's default,
    alive while the manifest streams), decode, the actors, encode/write — or the first
    results wait for the slowest stage to finish. Logical CPUs are scheduling tokens:
    fractions let the stages share the cores the OS gives them.
    """
    return min(1.0, max(0.25, cluster_cpus / 8))


def reserved_cpus(cluster_cpus: float) -> float:
    """CPUs a default pool leaves to the stages around it: a reader, a decode and an encode task."""
    return 1.0 + 2 * task_cpus(cluster_cpus)


@dataclass(frozen=True)
class Resources:
    """The resolved request: actor pool size, per-actor CPUs/GPUs, batch size, torch threads.

    The pool starts with `initial_actors` and Ray Data's autoscaler keeps it between
    `min_actors` and `max_actors`.
    """

    min_actors: int
    max_actors: int
    initial_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    batch_size: int
    torch_threads: int
    task_cpus: float
    # CPU clusters: the actors decode their own rows and encode their own masks. They are
    # CPU workers already, so a decode stage before them and an encode stage after them
    # would only add hops: pixels and masks serialised into the object store and out again,
    # and encoding held back until the writer gathers a file's rows. GPU actors leave both
    # to the CPU tasks beside them.
    cpu_stages_in_actors: bool
    # GPU actors decode the JPEGs themselves, batched by nvJPEG (`pipeline/gpu_decode.py`);
    # the decode tasks read the files and decode only the rest. Never on CPU actors.
    gpu_decode: bool = False

    def for_rows(self, rows: int) -> Resources:
        """This plan for an input of `rows` rows known before the run (a listing, a COCO
        json): the pool starts with no more actors than there are model batches to give
        them, and never fewer than `min_actors`. An actor started for no work costs a
        model load — seconds, and on CPU nodes cores the working actors need."""
        batches = max(1, math.ceil(rows / self.batch_size))
        return replace(self, initial_actors=max(self.min_actors, min(self.initial_actors, batches)))


def parse_actors(value: str | int | None) -> tuple[int, int] | None:
    """'N' or 'MIN:MAX' → (min, max); None stays None (use the default)."""
    if value is None:
        return None
    text = str(value)
    try:
        low, _, high = text.partition(":")
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ResourceError(f"--actors takes N or MIN:MAX, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ResourceError(f"--actors needs 1 ≤ MIN ≤ MAX, got {text!r}")
    return bounds


def _describe(cluster: dict[str, float]) -> str:
    """The cluster's CPUs, GPUs and memory, for error messages."""
    parts = [f"{cluster.get(name, 0):g} {name}" for name in ("CPU", "GPU")]
    parts.append(f"{cluster.get('memory', 0) / 2**30:.1f} GiB memory")
    return ", ".join(parts)


def gpus_per(cluster: dict, gpus: float | None, cpus: float | None, unit: str) -> float:
    """GPUs per `unit` ("actor", "worker"): as asked, else 1 when the cluster has GPUs and
    0 when it has none. Refuses negative requests, and GPUs asked of a cluster without
    any — Ray would wait for them forever — naming what the cluster has."""
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0.0) else 0.0
    if gpus < 0 or (cpus is not None and cpus <= 0):
        raise ResourceError(f"--gpus-per-{unit} must be ≥ 0 and --cpus-per-{unit} > 0")
    if gpus > 0 and not cluster.get("GPU", 0.0):
        raise ResourceError(
            f"--gpus-per-{unit} {gpus:g} asks for GPUs but the cluster has none "
            f"({_describe(cluster)}); use --gpus-per-{unit} 0 to run on CPUs"
        )
    return gpus


def plan_resources(
    cluster: dict[str, float],
    *,
    nodes: int = 1,
    actors: tuple[int, int] | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    batch_size: int | None = None,
    cpu_parallelism: str = DATA_PARALLEL,
    node_shapes: list[dict[str, float]] | None = None,
    reader_cpus: float = 0.0,
    gpu_decode: bool = False,
) -> Resources:
    """Fills defaults from `cluster` (ray.cluster_resources()) and refuses impossible requests.

    node_shapes: each node's resources, when known: an actor that fits on no one node can
    never start. reader_cpus: CPUs a task reading the input holds for the whole run (a
    streamed manifest's reader), beside the pool. gpu_decode: JPEGs decoded by the GPU
    actors (`Resources.gpu_decode`); ignored when the actors have no GPUs.

    GPU cluster: one actor per GPU (1 GPU, 1 CPU each), batch 16.
    CPU cluster: the pool gets half the CPUs, at most all but `reserved_cpus` (at least
    half a CPU), split over its actors, which decode their own images and encode their own
    masks; batch 8. A DATA_PARALLEL model (`models.registry`) gets one single-threaded actor
    per core (at most CPU_ACTORS_PER_NODE per node); a THREADED one an actor per node per
    THREADS_PER_THREADED_ACTOR cores, each with a torch thread per core it covers. Pools
    are 1:MAX and start at MAX: a batch job has its work from the start, and an actor
    added later makes the run wait again for a model load. An explicit `actors` (MIN, MAX)
    starts at MIN. `Resources.for_rows` starts fewer when the input is known to be small.
    """
    cluster_cpus = cluster.get("CPU", 0.0)
    cluster_gpus = cluster.get("GPU", 0.0)
    gpus_per_actor = gpus_per(cluster, gpus_per_actor, cpus_per_actor, "actor")
    if gpus_per_actor > 0:
        default_actors = max(1, math.floor(cluster_gpus / gpus_per_actor))
        cpus_per_actor = 1.0 if cpus_per_actor is None else cpus_per_actor
    else:
        pool_cpus = max(min(cluster_cpus / 2, cluster_cpus - reserved_cpus(cluster_cpus)), 0.5)
        if cpus_per_actor is None:
            node_cpus = cluster_cpus / nodes
            if cpu_parallelism == DATA_PARALLEL:
                actors_per_node = max(1, min(math.floor(node_cpus), CPU_ACTORS_PER_NODE))
            else:
                actors_per_node = max(1, math.ceil(node_cpus / THREADS_PER_THREADED_ACTOR))
            cpus_per_actor = pool_cpus / (actors_per_node * nodes)
        # The tolerance keeps P / (P / n) from flooring to n − 1 on a rounding error. The cap
        # holds for an explicit --cpus-per-actor too: each actor is a copy of the model in memory.
        default_actors = max(1, min(math.floor(pool_cpus / cpus_per_actor + 1e-9), CPU_ACTORS_PER_NODE * nodes))
    # The pool may shrink to one actor: a run keeps going on whatever capacity is left when
    # a node is lost, instead of stalling below a minimum it can no longer hold.
    min_actors, max_actors = actors or (1, default_actors)
    initial_actors = min_actors if actors else max_actors
    if gpus_per_actor > 0 and min_actors * gpus_per_actor > cluster_gpus:
        raise ResourceError(
            f"{min_actors} actors × {gpus_per_actor:g} GPUs exceeds the cluster's {cluster_gpus:g} GPUs"
        )
    shapes = [(node.get("CPU", 0.0), node.get("GPU", 0.0)) for node in node_shapes or []]
    if shapes and not any(cpus >= cpus_per_actor and gpus >= gpus_per_actor for cpus, gpus in shapes):
        raise ResourceError(
            f"an actor of {cpus_per_actor:g} CPUs and {gpus_per_actor:g} GPUs fits on no node (nodes: "
            + ", ".join(f"{cpus:g} CPUs {gpus:g} GPUs" for cpus, gpus in sorted(set(shapes)))
            + "); lower --cpus-per-actor or --gpus-per-actor"
        )
    tasks = task_cpus(cluster_cpus)
    if max_actors * cpus_per_actor + tasks + reader_cpus > cluster_cpus:
        reader = f" and {reader_cpus:g} for the manifest's reader" if reader_cpus else ""
        raise ResourceError(
            f"{max_actors} actors × {cpus_per_actor:g} CPUs leaves no CPU for decode/encode tasks{reader} "
            f"on a cluster of {cluster_cpus:g} CPUs (the job would stall); lower --actors or --cpus-per-actor"
        )
    if batch_size is not None and batch_size < 1:
        raise ResourceError(f"--batch-size must be ≥ 1, got {batch_size}")
    # On one machine the actors share every core between their torch threads, the forward
    # pass being most of the work. Across nodes, each its own share.
    threads = math.floor(cluster_cpus / max_actors) if nodes == 1 else math.ceil(cpus_per_actor)
    return Resources(
        min_actors=min_actors,
        max_actors=max_actors,
        initial_actors=initial_actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        batch_size=batch_size or (16 if gpus_per_actor > 0 else 8),
        torch_threads=max(1, threads),
        task_cpus=tasks,
        cpu_stages_in_actors=gpus_per_actor == 0,
        gpu_decode=gpu_decode and gpus_per_actor > 0,
    )
