"""The `rayseg` command line (DESIGN.md §4). Thin: it parses, checks, and calls pipeline/."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .. import __version__
from ..models.registry import REGISTRY, get_entry
from ..models.weights import RANDOM, WeightsError
from ..pipeline.resources import ResourceError, parse_actors, plan_resources
from ..pipeline.segment import ModelSpec, pin_weights
from ..pipeline.segment import segment as segment_dataset
from ..pipeline.sink import OutputError, RunSummary, check_output, write_run
from ..pipeline.sources import SourceError, read_source
from ..pipeline.storage import parse_storage_options
from . import cluster
from .fixtures import make_fixtures

app = typer.Typer(
    name="rayseg",
    help="Distributed batch image segmentation on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger("rayseg")

# Errors in what the user asked for: reported in one line, exit 2, before any cluster work.
USER_ERRORS = (SourceError, OutputError, WeightsError, ResourceError, ValueError)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable, and unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' → (height, width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HxW, e.g. 128x128, got {text!r}") from None
    return height, width


@app.command()
def models() -> None:
    """List the registered models, their task and the weights they accept."""
    table = Table("model", "task", "weights")
    for entry in REGISTRY.values():
        table.add_row(entry.name, entry.task, entry.weights)
    Console().print(table)


@app.command()
def fixtures(
    directory: Annotated[Path, typer.Argument(help="Where to write images/ and annotations/.")],
    images: Annotated[int, typer.Option(help="Number of images.")] = 20,
    size: Annotated[str, typer.Option(help="Image size HxW.")] = "128x128",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
) -> None:
    """Write the synthetic shapes dataset: images, COCO instances, semantic PNGs, COCO panoptic."""
    try:
        made = make_fixtures(directory, images=images, size=parse_size(size), seed=seed)
    except ValueError as e:
        raise fail(str(e)) from None
    console.print(f"wrote {images} images to {made.images_dir} and annotations to {made.instances_json.parent}")


@app.command()
def segment(
    input: Annotated[str, typer.Argument(help="Directory or URI prefix of images.")],
    output: Annotated[str, typer.Argument(help="Output directory or URI (must be new or empty).")],
    model: Annotated[str, typer.Option(help="Registered model name (see `rayseg models`).")],
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint path or URI, or 'random'.")] = None,
    weights_sha256: Annotated[Optional[str], typer.Option(help="Refuse weights with another sha256.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per model call [GPU 16, CPU 8].")] = None,
    actors: Annotated[Optional[str], typer.Option(help="Inference actors: N or MIN:MAX [one per GPU].")] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(help="GPUs per actor [1 if the cluster has GPUs].")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option(help="CPUs per actor [GPU: 1; CPU: half the cluster].")] = None,
    score_threshold: Annotated[Optional[float], typer.Option(help="Drop segments scoring below this.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images.")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Name of this run [time + random suffix].")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [RAY_ADDRESS, else local Ray].")] = None,
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")] = [],
    image_root: Annotated[Optional[str], typer.Option(help="Root that manifest / COCO json file names are relative to.")] = None,
) -> None:
    """Segment every image of INPUT and write one Parquet row per image to OUTPUT.

    INPUT: a directory or URI prefix (listed), a Parquet/CSV manifest with a `uri` column
    (optional `image_id`), or a COCO json (with --image-root).
    """
    if weights is None:
        raise fail("--weights is required: a checkpoint path or URI, or 'random' for random initialisation")
    spec = ModelSpec(model, weights, weights_sha256, score_threshold)
    try:
        storage_options = parse_storage_options(storage_option)
        get_entry(model)
        check_output(output, storage_options)
        actor_bounds = parse_actors(actors)
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be ≥ 1, got {limit}")
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    summary = run_segment(
        input,
        output,
        spec,
        storage_options=storage_options,
        actors=actor_bounds,
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=cpus_per_actor,
        batch_size=batch_size,
        limit=limit,
        run_id=run_id,
        address=address,
        image_root=image_root,
    )
    print_summary(summary)


def run_segment(
    input: str,
    output: str,
    spec: ModelSpec,
    *,
    storage_options: dict,
    actors: tuple[int, int] | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    run_id: str | None = None,
    address: str | None = None,
    image_root: str | None = None,
) -> RunSummary:
    """Connects to Ray, plans resources, runs the pipeline and commits the output."""
    import ray

    started = time.time()
    ray_seconds = cluster.connect(address)
    try:
        resources = plan_resources(
            ray.cluster_resources(),
            nodes=cluster.node_count(),
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            batch_size=batch_size,
        )
        spec = pin_weights(spec, storage_options)
        parallelism = int(ray.cluster_resources().get("CPU", 1))
        dataset = read_source(
            input, storage_options=storage_options, image_root=image_root, limit=limit, parallelism=parallelism
        )
        rows = segment_dataset(dataset, spec, resources, storage_options=storage_options)
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    if spec.weights == RANDOM:
        log.warning("RANDOM WEIGHTS: %s will run randomly initialised; predictions are meaningless", spec.name)
    run_id = run_id or new_run_id()
    run_info = {
        "rayseg_version": __version__,
        "input": input,
        "image_root": image_root,
        "model": spec.name,
        "weights": spec.weights,
        "weights_sha256": spec.weights_sha256,
        "spec": {
            "score_threshold": spec.score_threshold,
            "limit": limit,
            "min_actors": resources.min_actors,
            "max_actors": resources.max_actors,
            "cpus_per_actor": resources.cpus_per_actor,
            "gpus_per_actor": resources.gpus_per_actor,
            "batch_size": resources.batch_size,
        },
        "ray_init_seconds": round(ray_seconds, 3),
    }
    try:
        return write_run(
            rows,
            output,
            run_id=run_id,
            run_info=run_info,
            storage_options=storage_options,
            started=started,
            write_cpus=resources.task_cpus,
        )
    except Exception as e:
        log.exception("run %s failed", run_id)
        raise fail(f"run {run_id} failed: {type(e).__name__}: {e}", code=1) from None


def print_summary(summary: RunSummary) -> None:
    table = Table(title=f"run {summary.run_id}", show_header=False)
    table.add_row("images", str(summary.images))
    table.add_row("ok", str(summary.ok))
    table.add_row("error", str(summary.error))
    table.add_row("segments", str(summary.segments))
    table.add_row("images/s", f"{summary.images_per_second:.2f}")
    table.add_row("output", summary.output)
    Console().print(table)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Argument(help="Where fixtures and runs go.")] = Path("demo"),
    images: Annotated[int, typer.Option(help="Number of fixture images.")] = 64,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [local Ray].")] = None,
) -> None:
    """Fixtures → segment on Ray → summary: the whole path on this machine's data."""
    # A seed the tests never use: the demo runs on images no one tuned on.
    made = make_fixtures(workdir / "fixtures", images=images, size=(128, 128), seed=1000)
    console.print(f"fixtures: {images} images in {made.images_dir}")
    run_id = new_run_id()
    output = workdir / "runs" / run_id
    summary = run_segment(
        str(made.images_dir), str(output), ModelSpec("unet", RANDOM), storage_options={}, run_id=run_id, address=address
    )
    print_summary(summary)
    console.print(f"predictions: {output} (Parquet, one row per image; {output / '_run.json'})")
