"""Semantic evaluation: hand-computed confusion matrices, a direct reference, ignore labels, Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from rayseg.pipeline.evaluation import SemanticEvaluator, evaluate_predictions
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.evaluation.data import infer_task

NAMES = {1: "circle", 2: "square", 3: "triangle", 4: "background"}


def label_png(path, labels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L").save(path)


def semantic_row(name: str, predicted: np.ndarray, **kwargs) -> dict:
    """A row with one segment per value ≥ 0 of a predicted label map (-1 = no segment)."""
    segments = [
        syn.segment(int(c), predicted == c, score=0.9, label=NAMES.get(int(c), f"class {c}"))
        for c in np.unique(predicted).tolist()
        if c >= 0
    ]
    return syn.row(name, predicted.shape[0], predicted.shape[1], segments, **kwargs)


GT = [
    [1, 1, 2, 2],
    [1, 1, 2, 2],
    [0, 0, 255, 255],
    [3, 3, 3, 3],
]
PRED = [
    [1, 1, 4, 2],  # (0, 2): a square predicted as class 4, which the ground truth never has
    [1, 1, 2, 2],
    [5, 5, 5, 5],  # on unlabelled / ignored ground truth: not counted
    [3, 3, -1, -1],  # two triangle pixels no segment covers
]


@pytest.fixture()
def hand(tmp_path):
    label_png(tmp_path / "labels" / "a.png", GT)
    syn.write_predictions([semantic_row("a.jpg", np.array(PRED))], str(tmp_path / "pred"))
    return tmp_path


def test_hand_computed_confusion_and_metrics(hand):
    result = evaluate_predictions(str(hand / "pred"), str(hand / "labels"), use_ray=False)
    m = result.metrics
    assert result.task == "semantic" and result.coverage.evaluated == 1  # a.jpg → a.png
    per_class = {c["id"]: c for c in m["per_class"]}
    assert sorted(per_class) == [1, 2, 3, 4]
    # circle: 4 of 4 right, nothing else called circle; square: 3 of 4 (one called 4);
    # triangle: 2 of 4 (two unpredicted); class 4: predicted once, never in the ground truth.
    assert per_class[1]["IoU"] == 1.0 and per_class[1]["Acc"] == 1.0
    assert per_class[2]["IoU"] == 3 / 4 and per_class[2]["Acc"] == 3 / 4
    assert per_class[3]["IoU"] == 2 / 4 and per_class[3]["Acc"] == 2 / 4
    assert per_class[4]["IoU"] == 0.0 and per_class[4]["Acc"] is None
    assert per_class[3]["unpredicted_pixels"] == 2
    assert m["mIoU"] == (1.0 + 3 / 4 + 2 / 4 + 0.0) / 4
    assert m["mAcc"] == (1.0 + 3 / 4 + 2 / 4) / 3
    assert m["fwIoU"] == 4 / 12 * 1.0 + 4 / 12 * (3 / 4) + 4 / 12 * (2 / 4)
    assert m["pAcc"] == 9 / 12
    assert m["confusion_matrix"]["class_ids"] == [1, 2, 3, 4]
    assert m["confusion_matrix"]["counts"] == [
        [4, 0, 0, 0, 0],
        [0, 3, 0, 1, 0],
        [0, 0, 2, 0, 2],
        [0, 0, 0, 0, 0],
    ]
    assert m["pixels"] == {"evaluated": 12, "unpredicted": 2}


def test_ignore_labels_are_configurable(hand):
    # Only 255 ignored: the two unlabelled (0) pixels become a class, predicted as 5.
    result = evaluate_predictions(str(hand / "pred"), str(hand / "labels"), use_ray=False, ignore_labels=(255,))
    per_class = {c["id"]: c for c in result.metrics["per_class"]}
    assert sorted(per_class) == [0, 1, 2, 3, 4, 5]
    assert per_class[0]["IoU"] == 0.0 and per_class[0]["gt_pixels"] == 2
    assert per_class[5]["IoU"] == 0.0 and per_class[5]["predicted_pixels"] == 2
    assert result.metrics["pAcc"] == 9 / 14


def test_predicting_an_ignore_label_counts_as_unpredicted(tmp_path):
    label_png(tmp_path / "labels" / "a.png", [[1, 1], [2, 2]])
    syn.write_predictions([semantic_row("a.png", np.array([[1, 0], [2, 2]]))], str(tmp_path / "pred"))
    m = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "labels"), use_ray=False).metrics
    assert [c["id"] for c in m["per_class"]] == [1, 2]
    assert m["confusion_matrix"]["counts"] == [[1, 0, 1], [0, 2, 0]]


def test_overlapping_segments_the_highest_score_wins(tmp_path):
    label_png(tmp_path / "labels" / "a.png", [[1, 1], [1, 1]])
    everything = np.ones((2, 2), dtype=bool)
    segments = [syn.segment(1, everything, score=0.9), syn.segment(2, everything, score=0.3)]
    syn.write_predictions([syn.row("a.png", 2, 2, segments)], str(tmp_path / "pred"))
    assert evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "labels"), use_ray=False).metrics["pAcc"] == 1.0


def test_perfect_predictions_score_one(shapes, tmp_path):
    names = sorted(os.listdir(shapes.images_dir))
    syn.write_predictions(syn.semantic_rows(str(shapes.semantic_dir), names), str(tmp_path / "pred"))
    m = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=False).metrics
    assert m["mIoU"] == m["fwIoU"] == m["mAcc"] == m["pAcc"] == 1.0
    assert [c["IoU"] for c in m["per_class"]] == [1.0, 1.0, 1.0, 1.0]


# --- a direct reference on the fixtures ------------------------------------------------------------


def perturbed(shapes, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Predictions: shifted, noisy, with a class swapped and holes; plus the label maps they paint."""
    rng = np.random.default_rng(seed)
    rows, maps = [], {}
    for name in sorted(os.listdir(shapes.images_dir)):
        gt = np.asarray(Image.open(shapes.semantic_dir / name)).astype(np.int64)
        predicted = np.roll(gt, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
        noise = rng.uniform(size=gt.shape)
        predicted = np.where(noise < 0.05, rng.integers(1, 5, size=gt.shape), predicted)
        if rng.uniform() < 0.3:
            predicted = np.where(predicted == 1, 2, predicted)
        predicted = np.where(noise > 0.97, -1, predicted)  # holes: no segment there
        maps[name] = predicted
        rows.append(semantic_row(name, predicted))
    rows[3] = syn.row(rows[3]["image_id"], 64, 64, [], status="error", error="decode failed")
    maps[rows[3]["image_id"]] = np.full((64, 64), -1)
    return rows, maps


def reference_metrics(shapes, maps: dict[str, np.ndarray], ignore=(0, 255)) -> dict:
    """Straight from the definitions: one confusion matrix over all images' valid pixels."""
    size = 256
    conf = np.zeros((size, size + 1), dtype=np.int64)
    for name, predicted in maps.items():
        gt = np.asarray(Image.open(shapes.semantic_dir / name)).astype(np.int64)
        valid = ~np.isin(gt, ignore)
        p = np.where((predicted < 0) | np.isin(predicted, ignore), size, predicted)
        np.add.at(conf, (gt[valid], p[valid]), 1)
    classes = [c for c in range(size) if (conf[c].sum() or conf[:, c].sum()) and c not in ignore]
    tp = np.array([conf[c, c] for c in classes], dtype=float)
    gt_pixels = np.array([conf[c].sum() for c in classes], dtype=float)
    predicted_pixels = np.array([conf[:, c].sum() for c in classes], dtype=float)
    iou = tp / (gt_pixels + predicted_pixels - tp)
    acc = tp / gt_pixels
    return {
        "mIoU": float(np.sum(iou) / len(iou)),
        "fwIoU": float(np.sum(gt_pixels / gt_pixels.sum() * iou)),
        "mAcc": float(np.sum(acc) / len(acc)),
        "pAcc": float(tp.sum() / gt_pixels.sum()),
        "IoU": [float(v) for v in iou],
    }


def test_equal_to_a_direct_reference_on_perturbed_predictions(shapes, tmp_path):
    rows, maps = perturbed(shapes, seed=0)
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=7)
    result = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=False, shard_rows=3)
    reference = reference_metrics(shapes, maps)
    m = result.metrics
    assert 0 < m["mIoU"] < 1
    assert {k: m[k] for k in ("mIoU", "fwIoU", "mAcc", "pAcc")} == {k: reference[k] for k in ("mIoU", "fwIoU", "mAcc", "pAcc")}
    assert [c["IoU"] for c in m["per_class"]] == reference["IoU"]
    assert result.coverage.error_rows == 1


def test_ray_tasks_equal_the_single_process_result(ray_cluster, shapes, tmp_path):
    rows, _ = perturbed(shapes, seed=1)
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=5)
    local = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=False)
    distributed = evaluate_predictions(str(tmp_path / "pred"), str(shapes.semantic_dir), use_ray=True, shard_rows=4)
    assert distributed.shards == 5
    assert json.dumps(distributed.metrics) == json.dumps(local.metrics)


def test_merge_of_evaluators_with_different_label_ranges():
    a, b = SemanticEvaluator(), SemanticEvaluator()
    a._grow(3)
    a.matrix[2, 2] = 5
    b._grow(7)
    b.matrix[6, 6] = 1
    b.matrix[6, 7] = 2  # unpredicted
    a.merge(b)
    assert a.matrix.shape == (7, 8) and a.matrix[2, 2] == 5 and a.matrix[6, 6] == 1 and a.matrix[6, 7] == 2


def test_task_is_inferred_from_a_directory_of_label_pngs(shapes):
    assert infer_task(str(shapes.semantic_dir)) == "semantic"
    assert infer_task(str(shapes.instances_json)) == "instance"
    assert infer_task(str(shapes.panoptic_json)) == "panoptic"


def test_class_names_come_from_categories_then_labels_then_the_run(tmp_path):
    label_png(tmp_path / "labels" / "a.png", [[1, 2], [3, 3]])
    row = semantic_row("a.png", np.array([[1, 2], [2, 2]]))
    row["segments"][0]["label"] = "from the label"
    run_info = {"categories": [{"id": 1, "name": "run one"}, {"id": 2, "name": "run two"}, {"id": 3, "name": "run three"}]}
    syn.write_predictions([row], str(tmp_path / "pred"), run_info=run_info)
    names = lambda result: [c["name"] for c in result.metrics["per_class"]]  # noqa: E731
    result = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "labels"), use_ray=False)
    assert names(result) == ["from the label", "square", "run three"]
    result = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "labels"), use_ray=False, categories=[{"id": 1, "name": "given"}, {"id": 9, "name": "nine"}])
    assert names(result) == ["given", "square", "run three", "nine"]
    assert result.metrics["per_class"][-1]["IoU"] is None, "a given class absent everywhere is undefined"
