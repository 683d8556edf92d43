"""Running a segment spec: connect, plan, read, segment, commit. The CLI and jobs call this."""

from __future__ import annotations

import logging
import time
import uuid

import ray

from .. import __version__
from ..models.weights import RANDOM
from ..pipeline.resources import parse_actors, plan_resources
from ..pipeline.segment import ModelSpec, pin_weights, segment, without_done
from ..pipeline.sink import OutputError, RunSummary, check_output, read_run, staged_image_ids, write_run
from ..pipeline.sources import read_source
from . import cluster
from .spec import SegmentSpec

log = logging.getLogger("rayseg")


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable, and unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def model_spec(spec: SegmentSpec) -> ModelSpec:
    section = spec.model
    return ModelSpec(section.name, section.weights, section.weights_sha256, section.score_threshold, dict(section.options))


def committed_summary(spec: SegmentSpec, storage_options: dict) -> RunSummary | None:
    """The summary of OUTPUT's committed run when it is this spec's run_id, else None."""
    try:
        run = read_run(spec.output, storage_options)
    except OutputError:
        return None
    if run.get("run_id") != spec.run_id:
        raise OutputError(f"{spec.output} holds another committed run ({run.get('run_id')}); choose a new OUTPUT")
    counts, timings = run["counts"], run["timings"]
    return RunSummary(
        spec.run_id, spec.output, counts["images"], counts["ok"], counts["error"], counts["segments"], counts["files"], timings["seconds"]
    )


def check_spec_output(spec: SegmentSpec, storage_options: dict) -> RunSummary | None:
    """Before any cluster work: refuses an OUTPUT this run cannot write; with resume, returns
    the summary when the run already committed (nothing left to do)."""
    if not spec.resume:
        check_output(spec.output, storage_options)
        return None
    if spec.run_id is None:
        raise OutputError("--resume needs the --run-id of the run to finish")
    return committed_summary(spec, storage_options)


def run_segment_spec(
    spec: SegmentSpec, *, address: str | None = None, storage_options: dict | None = None
) -> RunSummary:
    """Runs `spec` to a committed OUTPUT and returns its summary.

    storage_options: used instead of the spec's storage section when given (the command
    line's own options).

    Raises the pipeline's user errors (SourceError, WeightsError, ResourceError,
    OutputError, ValueError) before any cluster work where it can.
    """
    started = time.time()
    storage_options = spec.storage.resolve() if storage_options is None else storage_options
    done = check_spec_output(spec, storage_options)
    if done is not None:
        log.info("run %s is already committed in %s", spec.run_id, spec.output)
        return done
    model = pin_weights(model_spec(spec), storage_options)
    ray_seconds = cluster.connect(address)
    resources = plan_resources(
        ray.cluster_resources(),
        nodes=cluster.node_count(),
        actors=parse_actors(spec.resources.actors),
        cpus_per_actor=spec.resources.cpus_per_actor,
        gpus_per_actor=spec.resources.gpus_per_actor,
        batch_size=spec.resources.batch_size,
    )
    parallelism = int(ray.cluster_resources().get("CPU", 1))
    dataset = read_source(
        spec.input, storage_options=storage_options, image_root=spec.image_root, limit=spec.limit, parallelism=parallelism
    )
    run_id = spec.run_id or new_run_id()
    if spec.resume:
        dataset = without_done(dataset, staged_image_ids(spec.output, run_id, storage_options), parallelism)
    rows = segment(dataset, model, resources, storage_options=storage_options)
    if model.weights == RANDOM:
        log.warning("RANDOM WEIGHTS: %s will run randomly initialised; predictions are meaningless", model.name)
    run_info = {
        "rayseg_version": __version__,
        "input": spec.input,
        "image_root": spec.image_root,
        "model": model.name,
        "weights": model.weights,
        "weights_sha256": model.weights_sha256,
        # The spec as run, minus storage (options may name endpoints; env names secrets' homes).
        "spec": spec.model_dump(mode="json", exclude={"storage"}),
        "resources": {
            "min_actors": resources.min_actors,
            "max_actors": resources.max_actors,
            "cpus_per_actor": resources.cpus_per_actor,
            "gpus_per_actor": resources.gpus_per_actor,
            "batch_size": resources.batch_size,
            "task_cpus": resources.task_cpus,
        },
        "ray_init_seconds": round(ray_seconds, 3),
    }
    return write_run(
        rows,
        spec.output,
        run_id=run_id,
        run_info=run_info,
        storage_options=storage_options,
        started=started,
        write_cpus=resources.task_cpus,
        resume=spec.resume,
    )
