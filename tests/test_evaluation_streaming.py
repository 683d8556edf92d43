"""Evaluation over a stream of shards: planned a batch at a time, a bounded number of Ray
tasks in flight, and results equal to evaluating everything in one process."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from rayseg.pipeline.evaluation import (
    SemanticEvaluator,
    data,
    evaluate_predictions,
    runner,
)
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.run_reader import prediction_files


def semantic_predictions(shapes, output) -> None:
    """Rolled label maps of the fixtures as predictions, in files of 3 rows, with an error
    row, a second row of one image in another file, and a row without ground truth."""
    rng = np.random.default_rng(7)
    rows = []
    for name in sorted(os.listdir(shapes.images_dir)):
        gt = np.asarray(Image.open(shapes.semantic_dir / name)).astype(np.int64)
        predicted = np.roll(gt, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
        segments = [syn.segment(int(c), predicted == c, score=0.9) for c in np.unique(predicted).tolist()]
        rows.append(syn.row(name, *predicted.shape, segments))
    rows[2] = syn.row(rows[2]["image_id"], 64, 64, [], status="error", error="decode failed")
    rows.append(rows[0])  # evaluated once, with its first row
    rows.append(syn.row("not-in-the-ground-truth.png", 64, 64, []))
    syn.write_predictions(rows, str(output), rows_per_file=3, row_group_size=2)


def test_a_small_in_flight_bound_over_many_shards_equals_the_one_process_result(ray_cluster, shapes, tmp_path, monkeypatch):
    semantic_predictions(shapes, tmp_path / "pred")
    local = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=False)
    # Pending tasks at each submission: submitted so far minus merged so far.
    merged, pending_at_submit = [0], []
    real_merge, real_remote = SemanticEvaluator.merge, runner._remote_evaluate_shard()

    def counting_merge(self, other):
        merged[0] += 1
        return real_merge(self, other)

    class CountingRemote:
        def remote(self, *args):
            pending_at_submit.append(len(pending_at_submit) - merged[0])
            return real_remote.remote(*args)

    monkeypatch.setattr(SemanticEvaluator, "merge", counting_merge)
    monkeypatch.setattr(runner, "_remote_evaluate_shard", CountingRemote)
    bounded = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=True, shard_rows=1, max_in_flight=2)
    assert bounded.shards == 20 == len(pending_at_submit), "one shard per evaluated image"
    assert max(pending_at_submit) == 1, "a third task waits until one of two has been merged"
    assert json.dumps(bounded.metrics) == json.dumps(local.metrics)
    assert bounded.coverage.to_dict() == local.coverage.to_dict()
    assert (local.coverage.duplicate_rows, local.coverage.error_rows, local.coverage.predictions_without_gt) == (1, 1, 1)


def test_the_join_hands_out_its_first_shard_before_reading_the_last_file(shapes, tmp_path):
    semantic_predictions(shapes, tmp_path / "pred")
    fs, files = prediction_files(str(tmp_path / "pred"))
    ground_truth = data.load_ground_truth(str(shapes.semantic_dir), "semantic")
    opened = []

    class Recording:
        def open(self, path, mode):
            opened.append(path)
            return fs.open(path, mode)

    coverage = data.Coverage()
    shards = data.iter_shards(Recording(), files, ground_truth, 2, coverage)
    first = next(shards)
    assert len(first) == 2 and opened == files[:1], "the first shard comes from the first file alone"
    rest = list(shards)
    assert opened == files and sum(map(len, [first, *rest])) == coverage.evaluated == 20
    assert coverage.gt_without_prediction == 0 and coverage.prediction_rows == 22


def test_images_without_a_prediction_row_are_counted_and_named_in_ground_truth_order(shapes, tmp_path):
    names = sorted(os.listdir(shapes.images_dir))
    syn.write_predictions(syn.semantic_rows(str(shapes.semantic_dir), names[3:]), str(tmp_path / "pred"), rows_per_file=4)
    coverage = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=False, shard_rows=3).coverage
    assert (coverage.evaluated, coverage.gt_without_prediction) == (17, 3)
    assert coverage.examples_gt_without_prediction == names[:3]
