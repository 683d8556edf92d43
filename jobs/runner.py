"""Running a segment spec: connect, plan, read, segment, commit. The CLI and jobs call this."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import time

import ray

from .. import __version__
from ..models.registry import get_entry
from ..models.weights import RANDOM
from ..pipeline.progress import start_error_tally
from ..pipeline.prompts import attach_prompts, load_prompts
from ..pipeline.repeated_ids import RepeatedIds
from ..pipeline.resources import ResourceError, Resources, parse_actors, plan_resources
from ..pipeline.segment import (
    ModelSpec,
    declared_categories,
    pin_weights,
    segment,
    without_done,
)
from ..pipeline.sink import (
    STAGING_DIR,
    OutputError,
    RunSummary,
    check_attempt,
    check_output,
    new_run_id,
    read_run,
    staged_image_ids,
    write_run,
)
from ..pipeline.sources import MANIFEST_READER_CPUS, open_source
from . import cluster
from .spec import ResourcesSection, SegmentSpec

log = logging.getLogger("rayseg")


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
        spec.run_id,
        spec.output,
        counts["images"],
        counts["ok"],
        counts["error"],
        counts["segments"],
        counts["files"],
        timings["seconds"],
        repeated_ids=RepeatedIds(ids=counts.get("repeated_image_ids", 0)),
        resumed=counts.get("resumed", 0),
    )


def check_spec_output(spec: SegmentSpec, storage_options: dict) -> RunSummary | None:
    """Before any cluster work: refuses an OUTPUT this run cannot write; with resume, returns
    the summary when the run already committed (nothing left to do)."""
    if not spec.resume:
        check_output(spec.output, storage_options)
        return None
    return committed_summary(spec, storage_options)  # a spec that resumes names its run_id


def plan_on_cluster(section: ResourcesSection, model_name: str, reader_cpus: float = 0.0) -> Resources:
    """The resource plan for the cluster as it is now, for model `model_name`.

    When the cluster lacks what is asked (GPUs on a cluster that scales its GPU workers from
    zero, say) and `scale_up_timeout_s` allows, the autoscaler is asked for the actors'
    bundles and the plan retried until the timeout; then the error names the resources.
    """

    def attempt() -> Resources:
        return plan_resources(
            ray.cluster_resources(),
            nodes=cluster.node_count(),
            actors=parse_actors(section.actors),
            cpus_per_actor=section.cpus_per_actor,
            gpus_per_actor=section.gpus_per_actor,
            batch_size=section.batch_size,
            cpu_parallelism=get_entry(model_name).cpu_parallelism,
            node_shapes=cluster.node_shapes(),
            reader_cpus=reader_cpus,
            gpu_decode=section.gpu_decode,
        )

    try:
        return attempt()
    except ResourceError:
        if not section.scale_up_timeout_s:
            raise
    from ray.autoscaler.sdk import request_resources

    _, high = parse_actors(section.actors) or (1, 1)
    gpus = section.gpus_per_actor or 0.0
    bundle = {"CPU": section.cpus_per_actor or 1.0, **({"GPU": gpus} if gpus else {})}
    request_resources(bundles=[bundle] * high)
    log.info("waiting up to %.0f s for the autoscaler to add %d × %s", section.scale_up_timeout_s, high, bundle)
    deadline = time.monotonic() + section.scale_up_timeout_s
    try:
        while True:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            try:
                return attempt()
            except ResourceError as e:
                if time.monotonic() >= deadline:
                    raise ResourceError(f"{e} (after waiting {section.scale_up_timeout_s:.0f} s for the autoscaler)") from None
    finally:
        # A request stands until replaced: left, it would keep the nodes after the job. The
        # actors hold them once placed.
        request_resources(bundles=[])


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
    # What makes the rows what they are: a resumed run must finish with the same.
    attempt = {
        "input": spec.input,
        "image_root": spec.image_root,
        "limit": spec.limit,
        "prompts": spec.prompts,
        "model": model.name,
        "weights_sha256": model.weights_sha256,
        "score_threshold": model.score_threshold,
        "options": model.options,
    }
    if spec.resume:
        check_attempt(spec.output, spec.run_id, attempt, storage_options)
    # Read and checked before any cluster work: a malformed source is a PromptError (exit 2).
    prompts, prompt_categories = load_prompts(spec.prompts, storage_options) if spec.prompts else (None, [])
    takes_categories = "categories" in get_entry(model.name).options.model_fields
    if prompt_categories and takes_categories and not {"categories", "category_file"} & set(model.options):
        # Re-labelled masks keep their box's category: name them as the prompt source does.
        model = dataclasses.replace(model, options={**model.options, "categories": [c.to_dict() for c in prompt_categories]})
    # Listed, or its columns checked, before any cluster work: a bad INPUT is a SourceError (exit 2).
    source = open_source(spec.input, storage_options=storage_options, image_root=spec.image_root, limit=spec.limit)
    ray_seconds = cluster.connect(address)
    resources = plan_on_cluster(spec.resources, spec.model.name, reader_cpus=0.0 if source.rows is not None else MANIFEST_READER_CPUS)
    parallelism = int(ray.cluster_resources().get("CPU", 1))
    dataset = source.dataset(parallelism)
    if source.rows is not None:
        resources = resources.for_rows(source.rows)
    run_id = spec.run_id or new_run_id()
    log.info("run %s: staged in %s until it commits", run_id, posixpath.join(spec.output, STAGING_DIR, run_id))
    if spec.resume:
        dataset = without_done(dataset, staged_image_ids(spec.output, run_id, storage_options), parallelism)
    prompt_report = None
    if prompts is not None:
        # On resume, the images already done would count as unmatched: the first attempt counted.
        dataset, prompt_report = attach_prompts(
            dataset, prompts, storage_options=storage_options, check_unmatched=not spec.resume, name=spec.prompts
        )
    error_tally = start_error_tally()
    rows = segment(dataset, model, resources, storage_options=storage_options, decoded=False, error_tally=error_tally)
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
            "initial_actors": resources.initial_actors,
            "cpus_per_actor": resources.cpus_per_actor,
            "gpus_per_actor": resources.gpus_per_actor,
            "batch_size": resources.batch_size,
            "task_cpus": resources.task_cpus,
            "gpu_decode": resources.gpu_decode,
        },
        "ray_init_seconds": round(ray_seconds, 3),
        **declared_categories(model, storage_options),
    }
    if prompt_report is not None:
        # The report names the table it was given; the run names the source the table was read from.
        counts = {k: v for k, v in dataclasses.asdict(prompt_report).items() if k not in ("source", "categories")}
        run_info["prompts"] = {"source": spec.prompts, **counts}
    return write_run(
        rows,
        spec.output,
        run_id=run_id,
        run_info=run_info,
        storage_options=storage_options,
        started=started,
        write_cpus=resources.task_cpus,
        file_mib=spec.output_file_mib,
        resume=spec.resume,
        attempt=attempt,
        expected_rows=source.expected_rows,
        error_tally=error_tally,
    )
