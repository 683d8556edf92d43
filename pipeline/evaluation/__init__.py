"""Evaluation of rayseg predictions against ground truth: COCO instance (bbox, segm),
semantic (confusion matrix), panoptic (PQ); exact, distributed over Ray tasks, with reports.

    from rayseg.pipeline.evaluation import evaluate_predictions, write_report

    result = evaluate_predictions("s3://bucket/masks/run1", "instances_val.json")   # task inferred
    result.metrics["segm"]["AP"]
    write_report(result, "reports/run1")    # report.json, report.md, index.html
    write_report(result, "reports/run1", overwrite=True)   # replaces that report (else refused)

Evaluators follow detectron2's `reset / process / evaluate`, plus `merge` so that
evaluators of different shards sum exactly (see base.py).
"""

from ..run_reader import Prediction, RowLocation, prediction_files, read_predictions
from .base import DatasetEvaluator, EvaluationError, ExactSum, ImageRanking, RankedImage
from .data import GroundTruth, infer_task, load_ground_truth
from .instance import InstanceEvaluator
from .panoptic import PanopticEvaluator
from .report import ReportDirectoryError, check_report_directory, render, write_report
from .runner import EvaluationResult, evaluate_predictions, make_evaluator
from .semantic import SemanticEvaluator

__all__ = [
    "DatasetEvaluator",
    "EvaluationError",
    "EvaluationResult",
    "ExactSum",
    "GroundTruth",
    "ImageRanking",
    "InstanceEvaluator",
    "PanopticEvaluator",
    "Prediction",
    "RankedImage",
    "ReportDirectoryError",
    "RowLocation",
    "SemanticEvaluator",
    "check_report_directory",
    "evaluate_predictions",
    "infer_task",
    "load_ground_truth",
    "make_evaluator",
    "prediction_files",
    "read_predictions",
    "render",
    "write_report",
]
