"""evaluate_predictions: predictions + ground truth → metrics, the work spread over Ray tasks.

The driver loads the ground truth's index, reads only the `image_id`/`status`/`uri` columns
of the predictions to join them, and cuts the joined rows into shards as it reads them
(data.iter_shards). Each shard is a Ray task that reads its own rows (masks included) and
ground-truth files and returns a fresh evaluator holding only mergeable partial results.
At most IN_FLIGHT_PER_CPU tasks per cluster CPU are submitted at a time, the next shard
planned as one finishes, and the driver merges them as they finish: it holds the shards in
flight, never all of them, and never the masks of more than the handful of images it draws
in the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable

from ..run_reader import prediction_files, read_predictions, read_run_info
from ..storage import filesystem
from .base import DatasetEvaluator, EvaluationError
from .data import (
    TASKS,
    Coverage,
    GroundTruth,
    Shard,
    infer_task,
    iter_shards,
    load_ground_truth,
)

DEFAULT_IGNORE_LABELS = (0, 255)
# Rows per task: enough work to amortise a task's start, small enough to spread the work.
MIN_SHARD_ROWS = 32
MAX_SHARD_ROWS = 2000
TASKS_PER_CPU = 4
# Tasks submitted and not yet merged, per cluster CPU: enough that a CPU finds the next task
# queued when one finishes, few enough that the driver holds a handful of shards.
IN_FLIGHT_PER_CPU = 2


@dataclass
class EvaluationResult:
    """Everything a report needs: metrics, how the join went, the run, the merged evaluator."""

    task: str
    predictions: str
    annotations: str
    metrics: dict
    coverage: Coverage
    run: dict
    evaluator: DatasetEvaluator
    ground_truth: GroundTruth
    storage_options: dict = field(default_factory=dict)
    seconds: float = 0.0
    shards: int = 0
    distributed: bool = False


def make_evaluator(
    task: str,
    ground_truth: GroundTruth,
    *,
    storage_options: dict | None = None,
    ignore_labels=DEFAULT_IGNORE_LABELS,
    categories: list[dict] | None = None,
    iou_types: tuple[str, ...] | None = None,
    segm_area: str = "box",
    ranking_k: int = 6,
    score_threshold: float = 0.5,
    run: dict | None = None,
) -> DatasetEvaluator:
    """A fresh evaluator for `task`, configured from the ground truth (and the run's `_run.json`)."""
    if task == "instance":
        from .instance import IOU_TYPES, InstanceEvaluator

        return InstanceEvaluator(
            ground_truth.categories,
            iou_types=tuple(iou_types or IOU_TYPES),
            segm_area=segm_area,
            ranking_k=ranking_k,
            ranking_score_threshold=score_threshold,
        )
    if task == "semantic":
        from .semantic import SemanticEvaluator

        return SemanticEvaluator(
            ignore_labels=ignore_labels,
            categories=categories,
            names=_run_category_names(run or {}),
            storage_options=storage_options,
            ranking_k=ranking_k,
        )
    if task == "panoptic":
        from .panoptic import PanopticEvaluator

        return PanopticEvaluator(ground_truth.categories, storage_options=storage_options, ranking_k=ranking_k)
    raise EvaluationError(f"unknown task {task!r}: one of {', '.join(TASKS)}")


def _run_category_names(run: dict) -> dict[int, str]:
    """Class names a run recorded (`categories`: [{id, name}, ...]), if it did."""
    names = {}
    for entry in run.get("categories") or []:
        if isinstance(entry, dict) and "id" in entry and "name" in entry:
            names[int(entry["id"])] = str(entry["name"])
    return names


def evaluate_shard(evaluator: DatasetEvaluator, shard: Shard, storage_options: dict | None) -> DatasetEvaluator:
    """One shard: read its rows, process them with `evaluator` (reset first), return it.

    The body of each Ray task; the evaluator comes back holding only partial results.
    """
    evaluator.reset()
    if shard.parts:
        fs, _ = filesystem(shard.parts[0][0], storage_options)
        evaluator.process(shard.ground_truths, read_predictions(fs, shard.parts))
    return evaluator


def _remote_evaluate_shard():
    import ray

    return ray.remote(num_cpus=1, max_retries=2)(evaluate_shard)


def evaluate_predictions(
    predictions: str,
    annotations: str,
    *,
    task: str | None = None,
    storage_options: dict | None = None,
    use_ray: bool = True,
    shard_rows: int | None = None,
    max_in_flight: int | None = None,
    ignore_labels=DEFAULT_IGNORE_LABELS,
    panoptic_root: str | None = None,
    categories: list[dict] | None = None,
    iou_types: tuple[str, ...] | None = None,
    segm_area: str = "box",
    ranking_k: int = 6,
    score_threshold: float = 0.5,
) -> EvaluationResult:
    """Evaluates a `rayseg segment` OUTPUT against ground truth (see the package docstring).

    task: instance | semantic | panoptic; by default inferred from `annotations` (a COCO
        instances json, a directory of label PNGs, a COCO panoptic json).
    use_ray: run the shards as Ray tasks (on the cluster `ray.init` connected to, else a
        local one) or, when False, one after the other in this process.
    shard_rows: rows per shard (default: about TASKS_PER_CPU shards per cluster CPU).
    max_in_flight: Ray tasks submitted at a time (default: IN_FLIGHT_PER_CPU per cluster CPU).
    ignore_labels: semantic label values that are not evaluated (default 0 and 255).
    panoptic_root: directory of the panoptic PNGs (default: the json's path without .json).
    categories: semantic class ids and names ([{"id", "name"}]); default: the ids seen.
    segm_area: instance `segm` area ranges by the detection's box area w·h (`box`, what
        pycocotools gives on `rayseg export coco`) or its mask area (`mask`); see instance.py.
    score_threshold: detections drawn in the report, and counted in its per-image ranking.
    """
    started = time.time()
    storage_options = dict(storage_options or {})
    task = task or infer_task(annotations, storage_options)
    ground_truth = load_ground_truth(annotations, task, storage_options=storage_options, panoptic_root=panoptic_root)
    fs, files = prediction_files(predictions, storage_options)
    run = read_run_info(predictions, storage_options)
    evaluator = make_evaluator(
        task,
        ground_truth,
        storage_options=storage_options,
        ignore_labels=ignore_labels,
        categories=categories,
        iou_types=iou_types,
        segm_area=segm_area,
        ranking_k=ranking_k,
        score_threshold=score_threshold,
        run=run,
    )
    if shard_rows is None:
        shard_rows = _default_shard_rows(len(ground_truth.images), use_ray)
    coverage = Coverage()
    shards = iter_shards(fs, files, ground_truth, max(1, shard_rows), coverage)
    if use_ray:
        merged, count = _run_on_ray(evaluator, shards, storage_options, max_in_flight or _default_in_flight())
    else:
        merged, count = make_copy(evaluator), 0
        for shard in shards:
            merged.merge(evaluate_shard(make_copy(evaluator), shard, storage_options))
            count += 1
    metrics = merged.evaluate()
    return EvaluationResult(
        task=task,
        predictions=predictions,
        annotations=annotations,
        metrics=metrics,
        coverage=coverage,
        run=run,
        evaluator=merged,
        ground_truth=ground_truth,
        storage_options=storage_options,
        seconds=time.time() - started,
        shards=count,
        distributed=use_ray,
    )


def make_copy(evaluator: DatasetEvaluator) -> DatasetEvaluator:
    """An empty evaluator with the same configuration."""
    import copy

    fresh = copy.copy(evaluator)
    fresh.reset()
    return fresh


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


def _default_shard_rows(images: int, use_ray: bool) -> int:
    if not use_ray:
        return MAX_SHARD_ROWS
    return min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, math.ceil(images / (TASKS_PER_CPU * _cluster_cpus()))))


def _default_in_flight() -> int:
    return IN_FLIGHT_PER_CPU * _cluster_cpus()


def _run_on_ray(
    evaluator: DatasetEvaluator, shards: Iterable[Shard], storage_options: dict, max_in_flight: int
) -> tuple[DatasetEvaluator, int]:
    """Runs each shard as a task, at most `max_in_flight` at a time, merging the evaluators
    as they finish; returns the merged evaluator and the number of shards."""
    import ray

    remote = _remote_evaluate_shard()
    template = ray.put(make_copy(evaluator))
    merged = make_copy(evaluator)
    pending: list = []
    count = 0

    def merge_one() -> None:
        nonlocal pending
        done, pending = ray.wait(pending, num_returns=1)
        merged.merge(ray.get(done[0]))

    for shard in shards:
        if len(pending) >= max(1, max_in_flight):
            merge_one()
        pending.append(remote.remote(template, shard, storage_options))
        count += 1
    while pending:
        merge_one()
    return merged, count
