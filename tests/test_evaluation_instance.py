"""COCO instance evaluation: equal (not close) to pycocotools' COCOeval, hand-computed values, sharding."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rayseg.jobs.fixtures import make_fixtures
from rayseg.pipeline.evaluation import InstanceEvaluator, evaluate_predictions
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.evaluation.instance import STAT_NAMES
from rayseg.pipeline.export import export_coco_results

# --- the reference: pycocotools run directly ---------------------------------------------------


def read_back(output) -> list[dict]:
    """The rows as stored (scores are float32 in Parquet: the reference must see those)."""
    return pq.read_table(output).to_pylist()


def coco_results(rows: list[dict], gt: dict) -> list[dict]:
    """COCO results from prediction rows, as `rayseg export coco` writes them: segmentation
    and bbox (rows already joined and filtered as the evaluation under test sees them)."""
    ids = {str(image["id"]): image["id"] for image in gt["images"]}
    ids.update({image["file_name"]: image["id"] for image in gt["images"]})
    results = []
    for row in rows:
        if row["status"] != "ok" or row["image_id"] not in ids:
            continue
        for s in row["segments"]:
            results.append(
                {
                    "image_id": ids[row["image_id"]],
                    "category_id": s["category_id"],
                    "segmentation": {"size": [row["height"], row["width"]], "counts": s["rle"]},
                    "bbox": list(s["bbox"]),
                    "score": s["score"],
                }
            )
    return results


def exported(predictions, annotations, tmp_path) -> list[dict]:
    """`rayseg export coco` of the predictions, read back: what a user gives pycocotools."""
    out = tmp_path / "exported-results.json"
    export_coco_results(str(predictions), str(out), annotations=str(annotations))
    return json.loads(out.read_text())


def coco_reference(gt: dict, results: list[dict], iou_type: str, img_ids: list | None = None, cat_ids=None) -> COCOeval:
    """COCOeval(gt, loadRes(results)) → evaluate, accumulate, summarize; its prints silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        detections = coco.loadRes(copy.deepcopy(results))
        evaluation = COCOeval(coco, detections, iou_type)
        if img_ids is not None:
            evaluation.params.imgIds = sorted(img_ids)
        if cat_ids is not None:
            evaluation.params.catIds = cat_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def assert_equal_to_pycocotools(result, gt: dict, rows: list[dict] | None = None, *, results=None, img_ids=None) -> None:
    """Every stat of each IoU type, overall and per category, and the accumulated arrays,
    equal pycocotools' on `results` (default: `coco_results(rows)`). Under `segm_area="mask"`
    the segm reference gets the results without their bbox, so loadRes takes mask areas."""
    results = coco_results(rows, gt) if results is None else results
    for iou_type in ("segm", "bbox"):
        given = results
        if iou_type == "segm" and result.evaluator.segm_area == "mask":
            given = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        reference = coco_reference(gt, given, iou_type, img_ids)
        accumulated = result.evaluator.accumulate(iou_type)
        np.testing.assert_array_equal(accumulated["precision"], reference.eval["precision"])
        np.testing.assert_array_equal(accumulated["recall"], reference.eval["recall"])
        np.testing.assert_array_equal(accumulated["scores"], reference.eval["scores"])
        assert result.metrics[iou_type]["stats"] == [float(s) for s in reference.stats], iou_type
        for category in result.metrics[iou_type]["per_category"]:
            alone = coco_reference(gt, given, iou_type, img_ids, cat_ids=[category["id"]])
            expected = [None if v == -1 else float(v) for v in alone.stats]
            assert [category[name] for name in STAT_NAMES] == expected, (iou_type, category["id"])


# --- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Shapes at 320×320 (small, medium and large objects), with crowd, polygon and uncompressed-RLE
    ground truth added, and one annotation with id 0 (COCOeval treats a match to it as no match)."""
    fixtures = make_fixtures(tmp_path_factory.mktemp("instances"), images=16, size=(320, 320), seed=5)
    gt = json.loads(fixtures.instances_json.read_text())
    annotations = gt["annotations"]
    annotations[0]["iscrowd"] = 1  # a crowd region, compressed RLE
    crowd = annotations[3]
    mask = mask_utils.decode(crowd["segmentation"])
    crowd["segmentation"] = _uncompressed_rle(mask)  # crowd regions usually come uncompressed
    crowd["iscrowd"] = 1
    x, y, w, h = annotations[5]["bbox"]
    annotations[5]["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # a polygon
    annotations[7]["id"] = 0
    path = fixtures.root / "annotations" / "instances_edited.json"
    path.write_text(json.dumps(gt))
    return fixtures, gt, path


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def perfect_rows(gt: dict) -> list[dict]:
    rows = []
    by_image = {image["id"]: [] for image in gt["images"]}
    for annotation in gt["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    for image in gt["images"]:
        segments = []
        for annotation in by_image[image["id"]]:
            if annotation.get("iscrowd"):
                continue
            mask = syn.annotation_mask(annotation, image["height"], image["width"])
            segments.append(syn.segment(annotation["category_id"], mask, score=0.9))
        rows.append(syn.row(image["file_name"], image["height"], image["width"], segments))
    return rows


# --- perfect predictions and pycocotools equality ------------------------------------------------


def test_perfect_predictions_score_one(dataset, tmp_path):
    fixtures, _, _ = dataset
    path = fixtures.instances_json  # without the edits (a match to annotation id 0 is no match)
    gt = json.loads(path.read_text())
    rows = perfect_rows(gt)
    syn.write_predictions(rows, str(tmp_path / "pred"))
    result = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False)
    assert result.task == "instance"
    for iou_type in ("segm", "bbox"):
        metrics = result.metrics[iou_type]
        assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == 1.0
        assert metrics["APs"] == metrics["APm"] == metrics["APl"] == 1.0, "all three area ranges are populated"
        assert metrics["AR100"] == 1.0
        assert all(c["AP"] == 1.0 for c in metrics["per_category"])
    assert_equal_to_pycocotools(result, gt, results=exported(tmp_path / "pred", path, tmp_path))


@pytest.mark.parametrize("seed,id_style", [(0, "file_name"), (1, "id"), (2, "file_name")])
def test_equal_to_pycocotools_on_shifted_dropped_extra_and_misclassified_predictions(dataset, tmp_path, seed, id_style):
    fixtures, gt, path = dataset
    rows = syn.perturbed_instances(gt, seed=seed, id_style=id_style, extra=3.0, score_levels=10 if seed != 2 else None)
    syn.write_predictions(rows, str(tmp_path / "pred"))
    result = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False, shard_rows=5)
    assert 0 < result.metrics["segm"]["AP"] < 1
    assert_equal_to_pycocotools(result, gt, results=exported(tmp_path / "pred", path, tmp_path))


def test_more_than_100_detections_per_image_are_cut_like_cocoeval(dataset, tmp_path):
    fixtures, gt, path = dataset
    small = {**gt, "images": gt["images"][:3]}
    small["annotations"] = [a for a in gt["annotations"] if a["image_id"] in {i["id"] for i in small["images"]}]
    rows = syn.perturbed_instances(small, seed=4, per_image=130, score_levels=7)
    syn.write_predictions(rows, str(tmp_path / "pred"))
    (tmp_path / "gt.json").write_text(json.dumps(small))
    result = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "gt.json"), use_ray=False)
    assert_equal_to_pycocotools(result, small, results=exported(tmp_path / "pred", tmp_path / "gt.json", tmp_path))


def test_sharding_does_not_change_a_single_bit(dataset, tmp_path):
    fixtures, gt, path = dataset
    syn.write_predictions(syn.perturbed_instances(gt, seed=9), str(tmp_path / "pred"), rows_per_file=5, row_group_size=2)
    results = [evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False, shard_rows=n).metrics for n in (1, 3, 1000)]
    assert results[0] == results[1] == results[2]


def test_rows_with_their_own_ids_join_the_ground_truth_by_the_file_name_their_uri_ends_with(dataset, tmp_path):
    fixtures, gt, path = dataset
    by_name = syn.perturbed_instances(gt, seed=6, images_dir="s3://bucket/shapes")
    syn.write_predictions(by_name, str(tmp_path / "by-name"))
    own_ids = [{**row, "image_id": f"manifest-{index}"} for index, row in enumerate(by_name)]  # a manifest's ids
    syn.write_predictions(own_ids, str(tmp_path / "own-ids"))
    expected = evaluate_predictions(str(tmp_path / "by-name"), str(path), use_ray=False)
    result = evaluate_predictions(str(tmp_path / "own-ids"), str(path), use_ray=False)
    assert result.coverage.evaluated == expected.coverage.evaluated == len(gt["images"])
    assert result.metrics["segm"]["AP"] == expected.metrics["segm"]["AP"]


def test_ray_tasks_equal_the_single_process_result(ray_cluster, dataset, tmp_path):
    fixtures, gt, path = dataset
    rows = syn.perturbed_instances(gt, seed=11, extra=2.0)
    syn.write_predictions(rows, str(tmp_path / "pred"), rows_per_file=6)
    local = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False)
    distributed = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=True, shard_rows=3)
    assert distributed.shards == 6 and distributed.distributed
    assert json.dumps(distributed.metrics) == json.dumps(local.metrics)
    assert_equal_to_pycocotools(distributed, gt, results=exported(tmp_path / "pred", path, tmp_path))


# --- the join --------------------------------------------------------------------------------------


def test_missing_rows_rows_without_ground_truth_and_error_rows(dataset, tmp_path):
    fixtures, gt, path = dataset
    rows = syn.perturbed_instances(gt, seed=3)
    del rows[2], rows[5]  # two ground-truth images without a prediction row
    rows[0] = syn.row(rows[0]["image_id"], rows[0]["height"], rows[0]["width"], [], status="error", error="read failed: boom")
    rows.append(syn.row("not-in-the-ground-truth.png", 320, 320, rows[1]["segments"]))
    rows.append(rows[3])  # a duplicate row: only the first counts
    syn.write_predictions(rows, str(tmp_path / "pred"))
    result = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False)
    coverage = result.coverage
    assert coverage.ground_truth_images == 16 and coverage.prediction_rows == 16
    assert coverage.evaluated == 14 and coverage.gt_without_prediction == 2
    assert coverage.predictions_without_gt == 1 and coverage.examples_without_gt == ["not-in-the-ground-truth.png"]
    assert coverage.error_rows == 1 and coverage.duplicate_rows == 1
    # The reference: only the 14 images with a row; the error row's image has no detections.
    by_file = {image["file_name"]: image["id"] for image in gt["images"]}
    evaluated = [by_file[r["image_id"]] for r in rows[:14]]
    assert_equal_to_pycocotools(result, gt, read_back(tmp_path / "pred")[:14], img_ids=evaluated)


def test_a_row_whose_size_differs_from_the_ground_truth_counts_as_no_predictions(dataset, tmp_path):
    fixtures, gt, path = dataset
    rows = perfect_rows(gt)
    rows[4]["height"] = 128  # e.g. the model ran on a resized copy
    syn.write_predictions(rows, str(tmp_path / "pred"))
    result = evaluate_predictions(str(tmp_path / "pred"), str(path), use_ray=False)
    assert result.evaluator.size_mismatch == 1
    assert result.metrics["segm"]["AR100"] < 1.0
    reference_rows = read_back(tmp_path / "pred")
    reference_rows[4]["segments"] = []
    assert_equal_to_pycocotools(result, gt, reference_rows)


# --- hand-computed values -------------------------------------------------------------------------


def square(top: int, left: int, side: int, size: int = 40) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def tiny_gt(masks: list[tuple[int, np.ndarray]], crowd: list[tuple[int, np.ndarray]] = ()) -> dict:
    annotations = []
    for category, mask in [*masks, *crowd]:
        counts, area, bbox = syn.encode_mask(mask)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": category,
                "segmentation": {"size": list(mask.shape), "counts": counts},
                "area": area,
                "bbox": bbox,
                "iscrowd": int(len(annotations) >= len(masks)),
            }
        )
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }


def evaluate_tiny(tmp_path, gt: dict, segments: list[dict]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    syn.write_predictions([syn.row("a.png", 40, 40, segments)], str(tmp_path / "pred"))
    result = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "gt.json"), use_ray=False)
    assert_equal_to_pycocotools(result, gt, results=exported(tmp_path / "pred", tmp_path / "gt.json", tmp_path))
    return result.metrics["segm"]


# COCOeval's precision is tp / (tp + fp + eps): one true positive alone has precision 1/(1+eps),
# a hair below 1. Hand-computed values below say which precision each of the 101 recall
# thresholds gets at each of the 10 IoU thresholds, and average them as COCOeval does.
P1 = 1 / (1 + np.spacing(1))


def coco_mean(per_threshold: list[list[float]]) -> float:
    """The mean COCOeval takes over one category's (IoU thresholds × 101 recall points) values."""
    return float(np.mean(np.array(per_threshold, dtype=np.float64)))


def test_a_shifted_mask_with_iou_two_thirds_matches_at_four_of_ten_thresholds(tmp_path):
    # 10×10 square moved 2 px: intersection 80, union 120, IoU 0.667 ≥ .50, .55, .60, .65.
    metrics = evaluate_tiny(tmp_path, tiny_gt([(2, square(5, 5, 10))]), [syn.segment(2, square(5, 7, 10), score=0.9)])
    assert metrics["AP"] == coco_mean([[P1] * 101] * 4 + [[0.0] * 101] * 6)
    assert metrics["AP50"] == coco_mean([[P1] * 101]) and metrics["AP75"] == 0.0
    assert metrics["AR100"] == coco_mean([[1.0]] * 4 + [[0.0]] * 6) == 0.4


def test_a_missed_instance_and_a_false_positive(tmp_path):
    gt = tiny_gt([(2, square(2, 2, 8)), (2, square(20, 20, 8))])
    # Found the first (score .9), missed the second, and a false positive scoring lower (.8):
    # precision P1 up to recall .5 (51 of the 101 recall thresholds), then nothing.
    found = syn.segment(2, square(2, 2, 8), score=0.9)
    metrics = evaluate_tiny(tmp_path / "a", gt, [found, syn.segment(2, square(30, 2, 6), score=0.8)])
    assert metrics["AP"] == coco_mean([[P1] * 51 + [0.0] * 50] * 10)
    assert metrics["AP50"] == coco_mean([[P1] * 51 + [0.0] * 50])
    assert metrics["AR100"] == metrics["AR1"] == 0.5
    # The false positive scoring higher: precision 1/2 at recall 1/2.
    metrics = evaluate_tiny(tmp_path / "b", gt, [found, syn.segment(2, square(30, 2, 6), score=0.95)])
    assert metrics["AP"] == coco_mean([[0.5] * 51 + [0.0] * 50] * 10)
    assert metrics["AR1"] == 0.0 and metrics["AR10"] == 0.5


def test_a_wrong_class_is_a_miss_and_a_false_positive_of_a_class_without_ground_truth(tmp_path):
    metrics = evaluate_tiny(tmp_path, tiny_gt([(1, square(5, 5, 10))]), [syn.segment(2, square(5, 5, 10), score=0.9)])
    circle, square_ = metrics["per_category"]
    assert circle["AP"] == 0.0 and circle["AR100"] == 0.0
    assert square_["AP"] is None, "a class without ground truth has no AP (COCO's -1)"
    assert metrics["AP"] == 0.0 and metrics["stats"][0] == 0.0


def test_detections_inside_a_crowd_region_are_ignored_not_false_positives(tmp_path):
    gt = tiny_gt([(2, square(2, 2, 8))], crowd=[(2, square(20, 20, 16))])
    segments = [
        syn.segment(2, square(2, 2, 8), score=0.9),
        syn.segment(2, square(22, 22, 6), score=0.95),  # inside the crowd: intersection / own area = 1
        syn.segment(2, square(24, 24, 6), score=0.7),  # crowds match any number of detections
    ]
    metrics = evaluate_tiny(tmp_path, gt, segments)
    assert metrics["AP"] == coco_mean([[P1] * 101] * 10) and metrics["AR100"] == 1.0


def test_no_detections_at_all(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(tiny_gt([(1, square(5, 5, 10))])))
    syn.write_predictions([syn.row("a.png", 40, 40, [])], str(tmp_path / "pred"))
    result = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "gt.json"), use_ray=False)
    assert result.metrics["segm"]["AP"] == 0.0 and result.metrics["segm"]["AR100"] == 0.0
    assert result.metrics["segm"]["APm"] is None


def test_evaluator_protocol_reset_process_merge_evaluate(dataset, tmp_path):
    """detectron2-style use without the runner: two halves merged equal the whole."""
    from rayseg.pipeline.evaluation.data import load_ground_truth
    from rayseg.pipeline.run_reader import prediction_files, read_predictions

    fixtures, gt, path = dataset
    syn.write_predictions(syn.perturbed_instances(gt, seed=21), str(tmp_path / "pred"))
    ground_truth = load_ground_truth(str(path), "instance")
    fs, (file,) = prediction_files(str(tmp_path / "pred"))
    predictions = read_predictions(fs, [(file, 0, list(range(16)))])
    gts = [ground_truth.images[ground_truth.match(p.image_id, p.uri)] for p in predictions]
    whole = InstanceEvaluator(ground_truth.categories)
    whole.process(gts, predictions)
    first, second = InstanceEvaluator(ground_truth.categories), InstanceEvaluator(ground_truth.categories)
    second.process(gts[9:], predictions[9:])  # the later half first: order must not matter
    first.process(gts[:9], predictions[:9])
    assert first.merge(second).evaluate() == whole.evaluate()
    whole.reset()
    assert whole.images == 0 and whole.evaluate()["segm"]["AP"] is None
    assert len(STAT_NAMES) == 12


# --- the area that puts a detection in the small / medium / large ranges ------------------------


def ring(top: int, left: int, side: int, width: int, size: int = 320) -> np.ndarray:
    """A square outline: its box area side² lies in a larger COCO area range than its mask area."""
    mask = square(top, left, side, size)
    mask[top + width : top + side - width, left + width : left + side - width] = False
    return mask


@pytest.fixture(scope="module")
def boundary_case(tmp_path_factory):
    """Ground truth and detections near the 32² and 96² boundaries whose mask area and box
    area fall in different ranges: outlines of 40 px (mask 444 px: small; box 1600: medium)
    and 100 px (mask 3600: medium; box 10000: large), solid squares of 31 and 33 px around
    32², some matched, some false positives (their area decides whether they are ignored)."""
    root = tmp_path_factory.mktemp("boundaries")
    shapes = [
        (1, ring(10, 10, 40, 3)), (1, ring(10, 120, 100, 10)), (2, square(200, 10, 31, 320)), (2, square(200, 80, 33, 320)),
    ]  # fmt: skip
    images, annotations, rows = [], [], []
    for image_id in (1, 2, 3):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 320, "width": 320})
        for category, mask in shapes[: 2 + image_id % 3]:
            counts, area, bbox = syn.encode_mask(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                    "segmentation": {"size": [320, 320], "counts": counts}, "area": area, "bbox": bbox,
                }
            )  # fmt: skip
        found = [syn.segment(c, np.roll(m, image_id, axis=1), score=0.9 - 0.1 * k) for k, (c, m) in enumerate(shapes[:3])]
        false_positives = [
            syn.segment(1, ring(150, 150, 40, 3), score=0.95),  # small by its mask, medium by its box
            syn.segment(1, ring(180, 200, 100, 10), score=0.85),  # medium by its mask, large by its box
            syn.segment(2, square(260, 260, 31, 320), score=0.65),
        ]
        rows.append(syn.row(f"{image_id}.png", 320, 320, found + false_positives[: image_id]))
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "ring"}, {"id": 2, "name": "square"}]}
    (root / "gt.json").write_text(json.dumps(gt))
    syn.write_predictions(rows, str(root / "pred"))
    return root, gt


def test_evaluate_equals_pycocotools_on_rayseg_export_coco_near_the_area_boundaries(boundary_case, tmp_path):
    root, gt = boundary_case
    result = evaluate_predictions(str(root / "pred"), str(root / "gt.json"), use_ray=False)
    assert result.evaluator.segm_area == "box" and result.metrics["segm_area"] == "box"
    assert_equal_to_pycocotools(result, gt, results=exported(root / "pred", root / "gt.json", tmp_path))


def test_segm_area_mask_puts_segm_detections_in_ranges_by_their_mask_area(boundary_case, tmp_path):
    root, gt = boundary_case
    by_box = evaluate_predictions(str(root / "pred"), str(root / "gt.json"), use_ray=False)
    by_mask = evaluate_predictions(str(root / "pred"), str(root / "gt.json"), use_ray=False, segm_area="mask")
    # pycocotools on the export without its bbox key: loadRes then takes the mask area.
    assert_equal_to_pycocotools(by_mask, gt, results=exported(root / "pred", root / "gt.json", tmp_path))
    # The case exposes the rule: the segm numbers by area range differ, the bbox ones do not.
    assert [by_box.metrics["segm"][k] for k in ("APs", "APm", "APl")] != [by_mask.metrics["segm"][k] for k in ("APs", "APm", "APl")]
    assert by_box.metrics["segm"]["AP"] == by_mask.metrics["segm"]["AP"]
    assert by_box.metrics["bbox"] == by_mask.metrics["bbox"]
    with pytest.raises(ValueError, match="segm_area must be one of box, mask"):
        InstanceEvaluator(gt["categories"], segm_area="boxes")
