"""`rayseg evaluate` and `rayseg export coco|dataset`: plain typer-compatible command functions.

Registered on the CLI app with `register(app)` (or one by one: `app.command()(evaluate)`,
and `export_coco` / `export_dataset` as `coco` / `dataset` of an `export` sub-app).
Exit codes as everywhere in rayseg: 0 done, 2 bad arguments (said before any cluster
work), 1 the job failed.
"""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..models.categories import load_category_file
from ..pipeline.evaluation.base import EvaluationError
from ..pipeline.evaluation.data import TASKS, infer_task
from ..pipeline.evaluation.instance import IOU_TYPES, SEGM_AREAS
from ..pipeline.evaluation.runner import DEFAULT_IGNORE_LABELS
from ..pipeline.export import (
    ExportError,
    ExportSummary,
    export_coco_dataset,
    export_coco_results,
)
from ..pipeline.panoptic_export import export_panoptic
from ..pipeline.run_reader import prediction_files, read_run_info, warn_if_other_task
from ..pipeline.sink import OutputError
from ..pipeline.storage import parse_storage_options
from .terminal import fail

log = logging.getLogger("rayseg")


def evaluate(
    predictions: Annotated[str, typer.Argument(help="A `rayseg segment` OUTPUT (directory or URI) or one Parquet file.")],
    annotations: Annotated[str, typer.Option(help="Ground truth: COCO instances json, COCO panoptic json, or a directory of label PNGs.")],
    report: Annotated[str, typer.Option(help="Directory or URI for report.json, report.md and index.html.")],
    task: Annotated[Optional[str], typer.Option(help="instance | semantic | panoptic (default: inferred from --annotations).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")] = None,
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")] = [],
    ignore_label: Annotated[list[int], typer.Option(help="Semantic label value not evaluated, repeatable (default: 0 and 255).")] = [],
    panoptic_root: Annotated[Optional[str], typer.Option(help="Directory of the panoptic PNGs (default: the json path without .json).")] = None,
    categories: Annotated[Optional[str], typer.Option(help="Semantic class names: a COCO json or a list of {id, name}.")] = None,
    iou_type: Annotated[list[str], typer.Option(help="Instance IoU type, segm or bbox, repeatable (default: both).")] = [],
    segm_area: Annotated[
        str,
        typer.Option(
            help="What puts a segm detection in the small/medium/large ranges: box (its box w·h, as pycocotools "
            "on `rayseg export coco` and detectron2) or mask (its mask area)."
        ),
    ] = "box",
    thumbnails: Annotated[int, typer.Option(help="Best and worst images drawn in the report (each); 0 for none.")] = 6,
    score_threshold: Annotated[float, typer.Option(help="Instance detections drawn and counted in the per-image ranking.")] = 0.5,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier report in --report (its folder is cleared first); without it a non-empty folder is refused.")
    ] = False,
) -> None:
    """Evaluate PREDICTIONS against ground truth on Ray and write a report.

    Rows join ground-truth images by COCO id (image_id as a string) or by file name; only images in both count. Rows with status "error" count as images without predictions.
    """
    from ..pipeline.evaluation.report import (
        ReportDirectoryError,
        check_report_directory,
        write_report,
    )
    from ..pipeline.evaluation.runner import evaluate_predictions
    from . import cluster

    try:
        options = parse_storage_options(storage_option)
        if task is not None and task not in TASKS:
            raise EvaluationError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
        unknown = sorted(set(iou_type) - set(IOU_TYPES))
        if unknown:
            raise EvaluationError(f"--iou-type takes {' / '.join(IOU_TYPES)}, got {', '.join(unknown)}")
        if segm_area not in SEGM_AREAS:
            raise EvaluationError(f"--segm-area takes {' / '.join(SEGM_AREAS)}, got {segm_area!r}")
        if thumbnails < 0:
            raise EvaluationError(f"--thumbnails must be ≥ 0, got {thumbnails}")
        task = task or infer_task(annotations, options)
        prediction_files(predictions, options)
        warn_if_other_task(predictions, read_run_info(predictions, options), task)
        category_list = [c.to_dict() for c in load_category_file(categories, options)] if categories else None
        check_report_directory(report, options, overwrite=overwrite)
    except ReportDirectoryError as e:
        raise fail(f"{e}; {'give another --report' if overwrite else 'give --overwrite to replace it, or another --report'}") from None
    except (EvaluationError, ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    cluster.connect(address)
    try:
        result = evaluate_predictions(
            predictions,
            annotations,
            task=task,
            storage_options=options,
            use_ray=True,
            ignore_labels=tuple(ignore_label) or DEFAULT_IGNORE_LABELS,
            panoptic_root=panoptic_root,
            categories=category_list,
            iou_types=tuple(iou_type) or None,
            segm_area=segm_area,
            ranking_k=thumbnails,
            score_threshold=score_threshold,
        )
    except (EvaluationError, OutputError) as e:
        raise fail(str(e)) from None
    except Exception as e:
        log.exception("evaluation failed")
        raise fail(f"evaluation failed: {type(e).__name__}: {e}", code=1) from None
    try:
        written = write_report(
            result, report, storage_options=options, draw_thumbnails=thumbnails > 0, score_threshold=score_threshold, overwrite=overwrite
        )
    except ReportDirectoryError as e:  # written to while the evaluation ran
        raise fail(f"{e}; nothing written", code=1) from None
    except Exception as e:
        log.exception("report failed")
        raise fail(f"writing the report to {report} failed: {type(e).__name__}: {e}", code=1) from None
    print_evaluation(result, written)


def print_evaluation(result, written: dict[str, str]) -> None:
    from ..pipeline.evaluation.report import headline

    table = Table(title=f"{result.task} evaluation", show_header=False)
    for label, value, hint in headline(result):
        table.add_row(label, value, hint)
    coverage = result.coverage
    table.add_row("images evaluated", str(coverage.evaluated), f"of {coverage.ground_truth_images} ground-truth images")
    if coverage.gt_without_prediction:
        table.add_row("without a prediction row", str(coverage.gt_without_prediction), "not evaluated")
    if coverage.predictions_without_gt:
        table.add_row("rows without ground truth", str(coverage.predictions_without_gt), "not evaluated")
    if coverage.error_rows:
        table.add_row("error rows", str(coverage.error_rows), "evaluated as no predictions")
    console = Console()
    console.print(table)
    console.print(f"report: {written.get('index.html', '')}", soft_wrap=True)


def _print_export(summary: ExportSummary, what: str) -> None:
    table = Table(title=what, show_header=False)
    table.add_row("images", str(summary.images))
    table.add_row("annotations", str(summary.annotations))
    table.add_row("categories", str(summary.categories))
    if summary.error_rows:
        table.add_row("error rows (left out)", str(summary.error_rows))
    if summary.without_ground_truth:
        table.add_row("rows not in --annotations (left out)", f"{summary.without_ground_truth} e.g. {', '.join(summary.examples_without_ground_truth)}")
    if summary.duplicate_rows:
        table.add_row("duplicate rows (left out)", str(summary.duplicate_rows))
    console = Console()
    console.print(table)
    console.print(f"wrote {summary.output}", soft_wrap=True)


def export_coco(
    predictions: Annotated[str, typer.Argument(help="A `rayseg segment` OUTPUT (directory or URI).")],
    out: Annotated[str, typer.Argument(help="Results json to write (path or URI).")],
    annotations: Annotated[Optional[str], typer.Option(help="COCO json whose images map file-name image ids to COCO ids.")] = None,
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")] = [],
) -> None:
    """Export PREDICTIONS in the COCO results format (what COCO.loadRes / COCOeval take)."""
    try:
        options = parse_storage_options(storage_option)
        prediction_files(predictions, options)
        summary = export_coco_results(predictions, out, annotations=annotations, storage_options=options)
    except (ExportError, OutputError, ValueError) as e:
        raise fail(str(e)) from None
    _print_export(summary, "COCO results")


def export_dataset(
    predictions: Annotated[str, typer.Argument(help="A `rayseg segment` OUTPUT (directory or URI).")],
    out: Annotated[str, typer.Argument(help="COCO dataset json to write (path or URI).")],
    annotations: Annotated[Optional[str], typer.Option(help="COCO json whose images give ids and file names.")] = None,
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")] = [],
) -> None:
    """Export PREDICTIONS as a COCO dataset (images, categories, RLE annotations with scores)."""
    try:
        options = parse_storage_options(storage_option)
        prediction_files(predictions, options)
        summary = export_coco_dataset(predictions, out, annotations=annotations, storage_options=options)
    except (ExportError, OutputError, ValueError) as e:
        raise fail(str(e)) from None
    _print_export(summary, "COCO dataset")


export_app = typer.Typer(name="export", help="Export predictions to COCO formats (results, dataset, panoptic).", no_args_is_help=True)
export_app.command("coco")(export_coco)
export_app.command("dataset")(export_dataset)


def export_panoptic_command(
    predictions: Annotated[str, typer.Argument(help="A `rayseg segment` OUTPUT (path or URI).")],
    out_dir: Annotated[str, typer.Argument(metavar="DIR", help="Where to write panoptic.json and panoptic/*.png.")],
    category_file: Annotated[
        str | None,
        typer.Option(
            help="COCO json or list of categories with isthing (default: --annotations' isthing, else the "
            "run's category file, else the run's task)."
        ),
    ] = None,
    annotations: Annotated[
        Optional[str],
        typer.Option(help="COCO instances or panoptic json whose image ids and file names the export takes."),
    ] = None,
    storage_option: Annotated[
        list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")
    ] = [],  # noqa: B006 - typer reads the default
) -> None:
    """COCO panoptic PNGs (id = R + 256·G + 256²·B) and json from a predictions OUTPUT."""
    try:
        options = parse_storage_options(storage_option)
        prediction_files(predictions, options)
        summary = export_panoptic(
            predictions, out_dir, storage_options=options, category_file=category_file, annotations=annotations
        )
    except (ValueError, FileNotFoundError) as e:  # ExportError, EvaluationError, OutputError are ValueErrors
        raise fail(str(e)) from None
    typer.echo(
        f"wrote {summary.json_path} and {summary.images} PNGs in {summary.png_dir}: {summary.segments} segments"
        f" ({summary.error_rows} error rows left out, {summary.dropped_segments} segments without pixels dropped"
        + (f", {summary.duplicate_rows} rows of an image id already exported left out)" if summary.duplicate_rows else ")")
    )


export_app.command("panoptic")(export_panoptic_command)


def register(app: typer.Typer) -> None:
    """Adds `evaluate` and the `export` group (coco, dataset) to `app`."""
    app.command("evaluate")(evaluate)
    app.add_typer(export_app, name="export")
