"""The `rayseg` command line (README.md, "Usage"). Thin: it parses, checks, and calls pipeline/."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Annotated, Optional

import fsspec
import typer
from ray.job_submission import JobStatus
from rich.table import Column, Table
from rich.text import Text

from ..models.options import describe
from ..models.registry import REGISTRY, get_entry
from ..models.text_prompts import read_text_file, split_text
from ..models.weights import WeightsError
from ..pipeline.actor import model_build_error
from ..pipeline.file_size import FILE_MIB
from ..pipeline.resources import ResourceError
from ..pipeline.sink import OutputError, RunSummary, new_run_id, staged_files
from ..pipeline.sources import SourceError
from ..pipeline.storage import parse_storage_options
from .cluster import JOBS_API_HINT, ClusterError, check_reachable
from .evaluate_commands import register as register_evaluation
from .fixtures import make_fixtures
from .relabel import VERSIONS_DIR, has_versions_dir, list_versions, relabel
from .runner import run_segment_spec
from .spec import RelabelSpec, SegmentSpec, SpecError, load_spec, parse_spec
from .submit import submit_spec, wait_for
from .terminal import configure_logging, fail, results
from .train_commands import register as register_training

app = typer.Typer(
    name="rayseg",
    help="Distributed batch image segmentation on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts show defaults in [brackets]: plain text, not Rich markup tags to swallow.
    rich_markup_mode=None,
)
log = logging.getLogger("rayseg")

# Errors in what the user asked for: reported, exit 2, before any cluster work.
USER_ERRORS = (SpecError, SourceError, OutputError, WeightsError, ResourceError, ValueError)


register_evaluation(app)
register_training(app)

# The demo's fixtures: the size the bundled U-Net was trained at, and a seed it never saw.
DEMO_IMAGE_SIZE = (128, 128)
DEMO_SEED = 1000


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    configure_logging(verbose)


def load_or_fail(spec_file: str) -> SegmentSpec | RelabelSpec:
    """The validated spec, or exit 2 listing every error."""
    try:
        return load_spec(spec_file)
    except SpecError as e:
        raise fail(str(e)) from None


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' → (height, width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HxW, e.g. 128x128, got {text!r}") from None
    return height, width


@app.command()
def models(
    name: Annotated[Optional[str], typer.Argument(help="One model: its options, with type, default, values and meaning.")] = None,
) -> None:
    """List the registered models, their task and the weights they accept (NAME: one model's options)."""
    if name is not None:
        try:
            entry = get_entry(name)
        except ValueError as e:
            raise fail(str(e)) from None
        lines = [
            f"{entry.name}: {entry.task}", f"weights: {entry.weights}", f"on CPUs: {entry.cpu_parallelism}",
            f"score: {entry.scores.meaning}", f"--score-threshold F: {entry.scores.range}: {entry.scores.cut}",
            "options (--model-option K=V):",
        ]  # fmt: skip
        lines = [textwrap.fill(line, results.width, subsequent_indent="    ") for line in lines]
        for option, values, meaning in describe(entry.options):
            lines += [
                textwrap.fill(f"  {option}: {values}", results.width, subsequent_indent="    "),
                textwrap.fill(meaning, results.width, initial_indent=" " * 6, subsequent_indent=" " * 6),
            ]
        results.print(Text("\n".join(lines)))
        return
    # Within 80 columns: a model's options are `rayseg models NAME`'s, in full.
    table = Table("model", "task", "weights", Column("on CPUs", no_wrap=True), caption="options, scores and thresholds of one model: rayseg models NAME")
    for entry in REGISTRY.values():
        # Plain text: "[default: …]" is not Rich markup.
        table.add_row(Text(entry.name, no_wrap=True), entry.task, Text(entry.weights), entry.cpu_parallelism)
    results.print(table)


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
    results.print(f"wrote {images} images to {made.images_dir} and annotations to {made.instances_json.parent}")


@app.command()
def segment(
    input: Annotated[str, typer.Argument(help="Directory/URI prefix, Parquet/CSV manifest, or COCO json.")],
    output: Annotated[str, typer.Argument(help="Output directory or URI (must be new or empty).")],
    model: Annotated[str, typer.Option(help="Registered model name (see `rayseg models`).")],
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint path or URI, or 'random' [the model's bundled weights: unet].")] = None,
    weights_sha256: Annotated[Optional[str], typer.Option(help="Refuse weights with another sha256.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per model call [GPU 16, CPU 8].")] = None,
    actors: Annotated[Optional[str], typer.Option(help="Inference actors: N or MIN:MAX [one per GPU].")] = None,
    gpus_per_actor: Annotated[Optional[float], typer.Option(help="GPUs per actor [1 if the cluster has GPUs].")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option(help="CPUs per actor [GPUs: 1; CPUs: the pool's share, see README Tuning].")] = None,
    gpu_decode: Annotated[bool, typer.Option(help="GPU actors decode JPEGs with nvJPEG, in batches (ignored on CPU actors; see README Tuning).")] = False,
    score_threshold: Annotated[Optional[float], typer.Option(help="Drop segments scoring below this (each model's score and range: `rayseg models`).")] = None,
    model_option: Annotated[list[str], typer.Option(help="Model option KEY=VALUE, JSON values typed (repeatable; see `rayseg models`).")] = [],
    category_file: Annotated[Optional[str], typer.Option(help="COCO json or list of categories for the model's classes.")] = None,
    task: Annotated[Optional[str], typer.Option(help="semantic | instance | panoptic, for models that do several.")] = None,
    text: Annotated[Optional[str], typer.Option(help="Phrases to find, comma-separated, each a category (sam3, grounded-sam).")] = None,
    text_file: Annotated[Optional[str], typer.Option(help="Phrases to find, one per line (path or URI).")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Box prompts for SAM: a COCO json (keyed like --image-root's images) or a committed run's OUTPUT.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images.")] = None,
    output_file_mib: Annotated[float, typer.Option(help="MiB of rows (in memory) per output file; the Parquet file is smaller.")] = FILE_MIB,
    run_id: Annotated[Optional[str], typer.Option(help="Name of this run [time + random suffix].")] = None,
    resume: Annotated[bool, typer.Option(help="Finish the interrupted run --run-id: only images without a staged row.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [RAY_ADDRESS, else local Ray].")] = None,
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")] = [],
    image_root: Annotated[Optional[str], typer.Option(help="Root that manifest / COCO json file names are relative to.")] = None,
) -> None:
    """Segment every image of INPUT and write one Parquet row per image to OUTPUT.

    INPUT: a directory or URI prefix (listed), a Parquet/CSV manifest with a `uri` column
    (optional `image_id`), or a COCO json (with --image-root). The flags are a job spec
    (`rayseg run`), written on the command line.
    """
    try:
        options = parse_storage_options(model_option, flag="--model-option")
        # Typed on the command line, storage options are the user's own to pass inline
        # (a spec file may only reference secrets); they are used, never stored.
        storage_options = parse_storage_options(storage_option)
        phrases = read_phrases(text, text_file, storage_options)
        for flag, key, value in (
            ("--category-file", "category_file", category_file), ("--task", "task", task), ("--text", "text", phrases)
        ):
            if value is not None and options.setdefault(key, value) != value:
                raise ValueError(f"{flag} {value} and --model-option {key}={options[key]} disagree: give one")
        spec = parse_spec(
            {
                "kind": "segment",
                "input": input,
                "output": output,
                "image_root": image_root,
                "prompts": prompts,
                "model": {
                    "name": model,
                    "weights": weights,
                    "weights_sha256": weights_sha256,
                    "score_threshold": score_threshold,
                    "options": options,
                },
                "resources": {
                    "actors": actors,
                    "gpus_per_actor": gpus_per_actor,
                    "cpus_per_actor": cpus_per_actor,
                    "batch_size": batch_size,
                    "gpu_decode": gpu_decode,
                },
                "limit": limit,
                "output_file_mib": output_file_mib,
                "run_id": run_id,
                "resume": resume,
            },
            source="arguments",
        )
    except SpecError as e:
        raise fail("\n".join(e.errors)) from None
    except ValueError as e:
        raise fail(str(e)) from None
    print_summary(execute(spec, address, storage_options))


def read_phrases(text: str | None, text_file: str | None, storage_options: dict) -> list[str] | None:
    """The phrases of `--text` (comma-separated) or `--text-file` (one per line, path or URI)."""
    if text is not None and text_file is not None:
        raise ValueError("give --text or --text-file, not both")
    if text_file is None:
        return None if text is None else split_text(text)
    try:
        with fsspec.open(text_file, "rt", **storage_options) as f:
            return read_text_file(f.read(), text_file)
    except FileNotFoundError:
        raise ValueError(f"text file not found: {text_file}") from None


@app.command()
def run(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC", help="A segment or relabel spec (YAML).")],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [RAY_ADDRESS, else local Ray].")] = None,
) -> None:
    """Run a job spec (kind: segment or relabel) — what `rayseg submit` runs on the cluster."""
    spec = load_or_fail(spec_file)
    if isinstance(spec, RelabelSpec):
        run_relabel(spec, address)
    else:
        print_summary(execute(spec, address))


@app.command("relabel")
def relabel_command(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC", help="A relabel spec (YAML).")],
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [RAY_ADDRESS, else local Ray].")] = None,
) -> None:
    """Re-label a dataset incrementally: a new version with only new or changed images run."""
    spec = load_or_fail(spec_file)
    if not isinstance(spec, RelabelSpec):
        raise fail(f"{spec_file} is a {spec.kind} spec; `rayseg relabel` takes kind: relabel")
    run_relabel(spec, address)


def run_relabel(spec: RelabelSpec, address: str | None) -> None:
    try:
        summary = relabel(spec, address=address)
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    # An unfinished version's staged rows are taken over by the next relabel (jobs/relabel.py).
    except KeyboardInterrupt:
        raise fail("interrupted: the next relabel run takes over the rows this one staged", code=130) from None
    except Exception as e:
        log.exception("relabel failed")
        raise fail(f"relabel failed: {type(e).__name__}: {e}\nthe next relabel run takes over the rows this one staged", code=1) from None
    if summary.version is None:
        results.print(f"source unchanged since {summary.previous}: no new version")
        return
    images = summary.diff["images"]
    results.print(
        f"{summary.version}: {summary.processed} images segmented, "
        + (f"{summary.recovered} taken from unfinished versions, " if summary.recovered else "")
        + f"{summary.carried} carried forward from "
        f"{summary.previous or '(none)'}; {images['added']} added, {images['removed']} removed, "
        f"{images['changed']} changed, {images['retried']} error rows retried"
        + (f", {images['relabelled']} relabelled (the model, weights or options changed)" if images["relabelled"] else "")
        + f"\n{summary.path}"
    )


# A version's diff counts (jobs/relabel.py), in the order `rayseg versions` shows them.
DIFF_COUNTS = ("added", "removed", "changed", "retried", "relabelled")


@app.command()
def versions(
    root: Annotated[str, typer.Argument(help="A relabel spec's output_root.")],
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE (repeatable).")] = [],
) -> None:
    """List the re-labelling versions under ROOT and their counts."""
    try:
        storage_options = parse_storage_options(storage_option)
        found = list_versions(root, storage_options)
    except ValueError as e:
        raise fail(str(e)) from None
    if not found and not has_versions_dir(root, storage_options):
        raise fail(f"{root} holds no re-labelling versions (no {VERSIONS_DIR}/ directory): give a relabel spec's output_root")
    # Two tables, each narrower than 80 columns: a version's rows, and what changed since the
    # version before it. Names and counts never wrap.
    rows = Table(*(Column(name, no_wrap=True) for name in ("version", "finished (UTC)", "images", "ok", "error", "segments", "segmented")), title="rows of each version")
    changes = Table(*(Column(name, no_wrap=True) for name in ("version", *DIFF_COUNTS)), title="images changed since the version before")
    for version in found:
        counts, images = version.run["counts"], version.diff.get("images", {})
        finished = version.run["timings"]["finished"].replace("T", " ")[:16]
        rows.add_row(version.name, finished, *(f"{counts[k]:,}" for k in ("images", "ok", "error", "segments")), f"{version.run.get('processed', 0):,}")
        changes.add_row(version.name, *(f"{images[k]:,}" if k in images else "" for k in DIFF_COUNTS))
    results.print(rows, changes)


@app.command()
def validate(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC", help="A job spec (YAML).")],
    strict: Annotated[bool, typer.Option(help="Environment variables the spec's storage.env names must be set here too.")] = False,
) -> None:
    """Check a job spec and report every error with its field path; no cluster work."""
    spec = load_or_fail(spec_file)
    if missing := spec.storage.missing_env():
        message = f"storage.env: environment variable(s) not set here: {', '.join(missing)}"
        if strict:
            raise fail(message)
        # The spec is for where it runs: a cluster's pods get them from a Secret (infra/).
        log.warning("%s; the job's environment must set them (--strict: an error)", message)
    results.print(f"{spec_file}: valid {spec.kind} spec (model {spec.model.name})")


@app.command()
def submit(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC", help="A segment or relabel spec (YAML).")],
    address: Annotated[str, typer.Option(help="Ray Jobs API address, e.g. http://HEAD:8265.")],
    wait: Annotated[bool, typer.Option(help="Stream the job's logs; exit with its status.")] = False,
    submission_id: Annotated[Optional[str], typer.Option(help="Submission id [Ray chooses one].")] = None,
) -> None:
    """Submit a spec to a Ray cluster (Ray Jobs API); prints the submission id."""
    spec = load_or_fail(spec_file)
    if "://" not in address and address != "auto":
        # Other commands take the cluster's GCS address (HOST:6379); this one its Jobs API.
        raise fail(f"--address {address} is not the Ray Jobs API's URL: give http://HEAD:8265 (the dashboard's port)")
    try:
        # Nothing is submitted to an address that does not answer: a bad argument (exit 2),
        # as for every command's --address.
        check_reachable(address, hint=JOBS_API_HINT)
    except ClusterError as e:
        raise fail(str(e)) from None
    try:
        client, job_id = submit_spec(spec, address, submission_id=submission_id)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise fail(f"could not submit to {address}: {e}", code=1) from None
    typer.echo(job_id)
    if wait:
        try:
            status = wait_for(client, job_id, on_logs=lambda text: typer.echo(text, nl=False, err=True))
        except Exception as e:  # noqa: BLE001 - the cluster, not the job: say what is known
            raise fail(f"lost contact with {address} while waiting ({type(e).__name__}: {e}); job {job_id} may still be running", code=1) from None
        results.print(f"job {job_id}: {status.value}")
        if status != JobStatus.SUCCEEDED:
            raise typer.Exit(1)


def execute(spec: SegmentSpec, address: str | None, storage_options: dict | None = None) -> RunSummary:
    """Runs a segment spec; user errors exit 2, failures of the job itself exit 1, an
    interrupt 130. A run that stops before its commit says how to finish it."""
    if spec.run_id is None:
        # Named here, so that a run that stops can be resumed by name.
        spec = spec.model_copy(update={"run_id": new_run_id()})
    try:
        return run_segment_spec(spec, address=address, storage_options=storage_options)
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail(f"interrupted: {_how_to_finish(spec, storage_options)}", code=130) from None
    except Exception as e:
        if (build := model_build_error(e)) is not None:
            log.debug("the model's actors failed", exc_info=True)
            raise fail(f"run failed: {build}", code=1) from None
        log.exception("run failed")
        raise fail(f"run failed: {type(e).__name__}: {e}\n{_how_to_finish(spec, storage_options)}", code=1) from None


def _how_to_finish(spec: SegmentSpec, storage_options: dict | None) -> str:
    """What to run after `spec`'s run stopped uncommitted: resume it when it staged rows."""
    try:
        staged = staged_files(spec.output, spec.run_id, spec.storage.resolve() if storage_options is None else storage_options)
    except Exception:  # noqa: BLE001 - the storage itself may be what failed: offer the resume
        staged = True
    if not staged:
        return f"run {spec.run_id} staged no rows: the same command runs it again from the start"
    return f"run {spec.run_id} is not committed; the same command with `--resume --run-id {spec.run_id}` finishes it, keeping the rows it staged"


def print_summary(summary: RunSummary) -> None:
    table = Table(title=f"run {summary.run_id}", show_header=False)
    table.add_row("images", str(summary.images) + (f" ({summary.resumed} staged by an earlier attempt)" if summary.resumed else ""))
    table.add_row("ok", str(summary.ok))
    # Text, not markup: a reason may hold brackets ("[Errno 2]", a path).
    table.add_row("error", Text(str(summary.error) + (f" (e.g. {summary.example_error})" if summary.example_error else "")))
    table.add_row("segments", str(summary.segments))
    table.add_row("images/s", f"{summary.images_per_second:.2f}")
    table.add_row("output", summary.output)
    results.print(table)
    if summary.images and not summary.ok:
        log.warning("every image of run %s failed: its rows hold the reasons (column `error`)", summary.run_id)
    repeated = summary.repeated_ids
    if repeated.ids:
        examples = f" (e.g. {', '.join(repr(i) for i in repeated.examples)})" if repeated.examples else ""
        log.warning(
            "repeated image ids: %d%s. Export, evaluation and resume join on image_id and take "
            "each such id as one image; give the input unique ids",
            repeated.ids,
            examples,
        )


@app.command()
def demo(
    workdir: Annotated[Path, typer.Argument(help="Where fixtures, runs and reports go.")] = Path("demo"),
    images: Annotated[int, typer.Option(help="Number of fixture images.")] = 64,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [local Ray].")] = None,
) -> None:
    """Fixtures → segment with the bundled U-Net on Ray → evaluate → report, on this machine's data.

    The U-Net runs twice over the same images: semantic (evaluated as mIoU against the label
    PNGs) and instance (connected components, evaluated as COCO segm AP).
    """
    from ..pipeline.evaluation.report import write_report
    from ..pipeline.evaluation.runner import evaluate_predictions
    from .evaluate_commands import print_evaluation

    # A seed the training never saw: the demo runs on images no one trained or tuned on.
    made = make_fixtures(workdir / "fixtures", images=images, size=DEMO_IMAGE_SIZE, seed=DEMO_SEED)
    results.print(f"fixtures: {images} images in {made.images_dir}")
    headlines = []
    for task, truth in (("semantic", made.semantic_dir), ("instance", made.instances_json)):
        run_id = f"{new_run_id()}-{task}"
        output = workdir / "runs" / run_id
        spec = SegmentSpec(input=str(made.images_dir), output=str(output), model={"name": "unet", "options": {"task": task}}, run_id=run_id)
        print_summary(execute(spec, address))
        results.print(f"predictions: {output} (Parquet, one row per image; {output / '_run.json'})")
        result = evaluate_predictions(str(output), str(truth), task=task)
        written = write_report(result, str(workdir / "reports" / run_id))
        print_evaluation(result, written)
        metric = ("mIoU", result.metrics["mIoU"]) if task == "semantic" else ("segm AP", result.metrics["segm"]["AP"])
        headlines.append((*metric, written.get("index.html", "")))
    for name, value, report in headlines:
        results.print(f"{name} {100 * value:.1f}  report: {report}")


if __name__ == "__main__":
    app()
