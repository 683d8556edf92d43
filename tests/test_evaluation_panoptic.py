"""Panoptic quality: hand-computed PQ with VOID and crowd, a panopticapi reference, Ray."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from rayseg.pipeline.evaluation import evaluate_predictions
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.evaluation.base import ExactSum

CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 2, "name": "square", "isthing": 1},
    {"id": 3, "name": "triangle", "isthing": 1},
    {"id": 4, "name": "background", "isthing": 0},
]


def id_png(path, ids: np.ndarray) -> None:
    ids = ids.astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def png_ids(path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def box(rows: slice, cols: slice, size: int = 10) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


# --- hand-computed --------------------------------------------------------------------------------


@pytest.fixture()
def hand(tmp_path):
    """10×10: a square (16 px), a crowd of circles (8 px), VOID rows 8-9, background the rest (56 px)."""
    square, crowd, void = box(slice(2, 6), slice(2, 6)), box(slice(0, 2), slice(6, 10)), box(slice(8, 10), slice(0, 10))
    background = ~(square | crowd | void)
    ids = np.zeros((10, 10), dtype=np.uint32)
    ids[background], ids[square], ids[crowd] = 1, 2, 3
    (tmp_path / "panoptic").mkdir()
    id_png(tmp_path / "panoptic" / "a.png", ids)
    segments_info = [
        {"id": 1, "category_id": 4, "area": 56, "iscrowd": 0},
        {"id": 2, "category_id": 2, "area": 16, "iscrowd": 0},
        {"id": 3, "category_id": 1, "area": 8, "iscrowd": 1},
    ]
    gt = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 10, "width": 10}],
        "annotations": [{"image_id": 7, "file_name": "a.png", "segments_info": segments_info}],
        "categories": CATEGORIES,
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(gt))
    return tmp_path, {"square": square, "crowd": crowd, "void": void}


def test_hand_computed_pq_with_void_and_crowd(hand):
    root, gt = hand
    square = box(slice(2, 6), slice(3, 7))  # shifted 1 px: intersection 12, union 20, IoU 0.6
    circle = box(slice(0, 2), slice(5, 9))  # 6 of its 8 px on the circle crowd: ignored
    on_void = box(slice(9, 10), slice(0, 5))  # all on VOID: ignored
    false_triangle = box(slice(6, 8), slice(0, 2))  # on background: a false positive
    background = ~(square | circle | false_triangle | gt["void"] | gt["crowd"])  # 50 px, 46 on background
    segments = [
        syn.segment(2, square, score=0.9, segment_id=1),
        syn.segment(1, circle, score=0.8, segment_id=2),
        syn.segment(3, on_void, score=0.7, segment_id=3),
        syn.segment(3, false_triangle, score=0.6, segment_id=4),
        syn.segment(4, background, score=0.5, segment_id=5),
    ]
    syn.write_predictions([syn.row("7", 10, 10, segments)], str(root / "pred"))  # joined by COCO id
    m = evaluate_predictions(str(root / "pred"), str(root / "panoptic.json"), use_ray=False).metrics
    per_class = {c["name"]: c for c in m["per_class"]}
    assert (per_class["square"]["tp"], per_class["square"]["fp"], per_class["square"]["fn"]) == (1, 0, 0)
    assert per_class["square"]["PQ"] == per_class["square"]["SQ"] == 0.6 and per_class["square"]["RQ"] == 1.0
    # background: union = 50 + 56 − 46 − 0 (no VOID under it) = 60.
    assert per_class["background"]["PQ"] == 46 / 60
    assert (per_class["triangle"]["tp"], per_class["triangle"]["fp"], per_class["triangle"]["fn"]) == (0, 1, 0)
    assert per_class["triangle"]["PQ"] == 0.0
    assert per_class["circle"]["PQ"] is None, "crowd-only class with its prediction ignored: no TP, FP or FN"
    assert m["All"] == {"pq": (0.0 + 0.6 + 0.0 + 46 / 60) / 3, "sq": (0.6 + 0 + 46 / 60) / 3, "rq": (1.0 + 0.0 + 1.0) / 3, "n": 3}
    assert m["Things"] == {"pq": (0.6 + 0.0) / 2, "sq": (0.6 + 0) / 2, "rq": (1.0 + 0.0) / 2, "n": 2}
    assert m["Stuff"] == {"pq": 46 / 60, "sq": 46 / 60, "rq": 1.0, "n": 1}
    assert m["PQ"] == m["All"]["pq"]


def test_a_match_needs_iou_above_one_half(hand):
    root, gt = hand
    square = box(slice(2, 6), slice(4, 8))  # shifted 2 px: intersection 8, union 24, IoU 1/3
    segments = [syn.segment(2, square, score=0.9), syn.segment(4, ~(square | gt["void"] | gt["crowd"]), score=0.5)]
    syn.write_predictions([syn.row("a.jpg", 10, 10, segments)], str(root / "pred"))  # joined by file name
    m = evaluate_predictions(str(root / "pred"), str(root / "panoptic.json"), use_ray=False).metrics
    square_class = next(c for c in m["per_class"] if c["name"] == "square")
    assert (square_class["tp"], square_class["fp"], square_class["fn"]) == (0, 1, 1)
    assert square_class["PQ"] == 0.0


def test_perfect_predictions_score_one(shapes, tmp_path):
    panoptic = json.loads(shapes.panoptic_json.read_text())
    syn.write_predictions(syn.panoptic_rows(panoptic, str(shapes.panoptic_dir)), str(tmp_path / "pred"))
    m = evaluate_predictions(str(tmp_path / "pred"), str(shapes.panoptic_json), use_ray=False).metrics
    for group in ("All", "Things", "Stuff"):
        assert (m[group]["pq"], m[group]["sq"], m[group]["rq"]) == (1.0, 1.0, 1.0)
    assert m["All"]["n"] == 4


# --- a reference: panopticapi's pq_compute_single_core, transcribed --------------------------------

VOID = 0
OFFSET = 256 * 256 * 256


def panopticapi_reference(gt_json: dict, gt_dir, pred_annotations: list[dict], pred_dir) -> dict:
    """panopticapi's per-image matching and PQStat, on PNGs + segments_info as it reads them.

    The one change: each class's IoUs are summed with math.fsum (exactly rounded), where
    panopticapi adds them in processing order.
    """
    categories = {c["id"]: c for c in gt_json["categories"]}
    stats = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "ious": []})
    preds = {a["image_id"]: a for a in pred_annotations}
    for gt_ann in gt_json["annotations"]:
        pred_ann = preds[gt_ann["image_id"]]
        pan_gt = png_ids(gt_dir / gt_ann["file_name"])
        pan_pred = png_ids(pred_dir / pred_ann["file_name"])
        gt_segms = {el["id"]: el for el in gt_ann["segments_info"]}
        pred_segms = {el["id"]: dict(el) for el in pred_ann["segments_info"]}
        pred_labels_set = set(el["id"] for el in pred_ann["segments_info"])
        labels, labels_cnt = np.unique(pan_pred, return_counts=True)
        for label, label_cnt in zip(labels, labels_cnt):
            if label not in pred_segms:
                if label == VOID:
                    continue
                raise KeyError(label)
            pred_segms[label]["area"] = label_cnt
            pred_labels_set.remove(label)
            assert pred_segms[label]["category_id"] in categories
        assert not pred_labels_set
        pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
        gt_pred_map = {}
        labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
        for label, intersection in zip(labels, labels_cnt):
            gt_pred_map[(label // OFFSET, label % OFFSET)] = intersection
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection - gt_pred_map.get((VOID, pred_label), 0)
            iou = intersection / union
            if iou > 0.5:
                stats[gt_segms[gt_label]["category_id"]]["tp"] += 1
                stats[gt_segms[gt_label]["category_id"]]["ious"].append(float(iou))
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels_dict = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt_info["iscrowd"] == 1:
                crowd_labels_dict[gt_info["category_id"]] = gt_label
                continue
            stats[gt_info["category_id"]]["fn"] += 1
        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            intersection = gt_pred_map.get((VOID, pred_label), 0)
            if pred_info["category_id"] in crowd_labels_dict:
                intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
            if intersection / pred_info["area"] > 0.5:
                continue
            stats[pred_info["category_id"]]["fp"] += 1

    def pq_average(isthing):
        pq = sq = rq = 0.0
        n = 0
        for label, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            s = stats[label]
            iou, tp, fp, fn = math.fsum(s["ious"]), s["tp"], s["fp"], s["fn"]
            if tp + fp + fn == 0:
                continue
            n += 1
            pq += iou / (tp + 0.5 * fp + 0.5 * fn)
            sq += iou / tp if tp != 0 else 0
            rq += tp / (tp + 0.5 * fp + 0.5 * fn)
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}

    return {
        "All": pq_average(None),
        "Things": pq_average(True),
        "Stuff": pq_average(False),
        "counts": {label: (s["tp"], s["fp"], s["fn"]) for label, s in stats.items()},
    }


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """The shapes panoptic ground truth with VOID pixels and crowd segments added."""
    from rayseg.jobs.fixtures import make_fixtures

    root = tmp_path_factory.mktemp("panoptic")
    fixtures = make_fixtures(root / "shapes", images=12, size=(96, 96), seed=2)
    gt = json.loads(fixtures.panoptic_json.read_text())
    gt_dir = root / "gt"
    shutil.copytree(fixtures.panoptic_dir, gt_dir)
    rng = np.random.default_rng(0)
    for index, annotation in enumerate(gt["annotations"]):
        ids = png_ids(gt_dir / annotation["file_name"])
        if index % 2 == 0:  # a VOID band
            top = int(rng.integers(0, 80))
            ids[top : top + 10, :] = VOID
        kept = []
        for segment in annotation["segments_info"]:
            area = int((ids == segment["id"]).sum())
            if area:
                kept.append({**segment, "area": area})
        if index % 3 == 0 and len(kept) > 1:
            kept[0]["iscrowd"] = 1
        annotation["segments_info"] = kept
        id_png(gt_dir / annotation["file_name"], ids)
    path = root / "gt.json"
    path.write_text(json.dumps(gt))
    return fixtures, gt, path, gt_dir


def perturbed_panoptic(gt: dict, gt_dir, seed: int, pred_dir) -> tuple[list[dict], list[dict]]:
    """Rows (shifted, dropped, misclassified and extra segments) and the same predictions as
    panopticapi reads them: PNGs painted highest score first and their segments_info."""
    rng = np.random.default_rng(seed)
    pred_dir.mkdir(parents=True, exist_ok=True)
    images = {image["id"]: image for image in gt["images"]}
    rows, annotations = [], []
    for annotation in gt["annotations"]:
        image = images[annotation["image_id"]]
        ids = png_ids(gt_dir / annotation["file_name"])
        segments = []
        for segment in annotation["segments_info"]:
            if rng.uniform() < 0.15:
                continue
            mask = syn.shift(ids == segment["id"], int(rng.integers(-4, 5)), int(rng.integers(-4, 5)))
            if segment["category_id"] == 4:
                mask = mask | (ids == VOID)  # background predicted over VOID too
            category = segment["category_id"]
            if category != 4 and rng.uniform() < 0.15:
                category = int(rng.integers(1, 4))
            if mask.any():
                segments.append(syn.segment(category, mask, score=float(rng.uniform(0.1, 1.0))))
        for _ in range(int(rng.integers(0, 3))):
            top, left = rng.integers(0, 80, size=2)
            blob = box(slice(top, top + int(rng.integers(4, 16))), slice(left, left + int(rng.integers(4, 16))), size=96)
            segments.append(syn.segment(int(rng.integers(1, 4)), blob, score=float(rng.uniform(0.1, 1.0))))
        row = syn.row(image["file_name"], 96, 96, segments)
        rows.append(row)
        # What the evaluator paints (highest score first, first claim wins), as a PNG.
        painted = np.zeros((96, 96), dtype=np.uint32)
        info = []
        stored = [(float(np.float32(s["score"])), s) for s in segments]
        order = sorted(range(len(stored)), key=lambda i: -stored[i][0])
        for i in order:
            mask = syn.annotation_mask({"segmentation": {"size": [96, 96], "counts": stored[i][1]["rle"]}}, 96, 96) & (painted == 0)
            if mask.any():
                painted[mask] = len(info) + 1
                info.append({"id": len(info) + 1, "category_id": stored[i][1]["category_id"]})
        id_png(pred_dir / annotation["file_name"], painted)
        annotations.append({"image_id": annotation["image_id"], "file_name": annotation["file_name"], "segments_info": info})
    return rows, annotations


def test_equal_to_the_panopticapi_reference_on_perturbed_predictions(edited, tmp_path):
    fixtures, gt, path, gt_dir = edited
    rows, pred_annotations = perturbed_panoptic(gt, gt_dir, seed=0, pred_dir=tmp_path / "pred_png")
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=5)
    result = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False, panoptic_root=str(gt_dir), shard_rows=4)
    reference = panopticapi_reference(gt, gt_dir, pred_annotations, tmp_path / "pred_png")
    m = result.metrics
    assert 0 < m["PQ"] < 1
    for group in ("All", "Things", "Stuff"):
        assert m[group] == reference[group], group
    assert {c["id"]: (c["tp"], c["fp"], c["fn"]) for c in m["per_class"] if c["tp"] + c["fp"] + c["fn"]} == reference["counts"]


def test_ray_tasks_equal_the_single_process_result(ray_cluster, edited, tmp_path):
    fixtures, gt, path, gt_dir = edited
    rows, _ = perturbed_panoptic(gt, gt_dir, seed=1, pred_dir=tmp_path / "pred_png")
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=4)
    local = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False, panoptic_root=str(gt_dir))
    distributed = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=True, shard_rows=2, panoptic_root=str(gt_dir))
    assert distributed.shards == 6
    assert json.dumps(distributed.metrics) == json.dumps(local.metrics)


def test_exact_sums_do_not_depend_on_order():
    values = [0.1, 1e16, 0.7, -1e16, 0.3333333333333333, 2.5e-17] * 50
    forward, backward, merged = ExactSum(), ExactSum(), ExactSum()
    for v in values:
        forward.add(v)
    for v in reversed(values):
        backward.add(v)
    halves = [ExactSum(), ExactSum()]
    for i, v in enumerate(values):
        halves[i % 2].add(v)
    merged.merge(halves[1])
    merged.merge(halves[0])
    assert forward.value == backward.value == merged.value == math.fsum(values)
