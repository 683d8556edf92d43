"""COCO segm evaluation: rayseg's evaluator vs pycocotools' COCOeval, same data, same run.

5,000 fixture images (64×64) with ~10 predictions each (shifted, dropped, duplicated,
misclassified and extra masks; scores with ties). Each round times, one after the other:

- pycocotools, one process, from files: COCO(gt json) → loadRes(results json, segm
  without bbox so areas are mask areas) → evaluate → accumulate → summarize;
- rayseg in one process (`use_ray=False`), from files: the predictions' Parquet + the gt json;
- rayseg on Ray (the same machine's CPUs as Ray tasks), after ray.init (timed apart).

and checks that the 12 stats and the whole precision/recall arrays are identical.
Goal: rayseg ≥ 3× faster than pycocotools with identical stats.

Run: .venv/bin/python -m benchmarks.coco_eval_speed [--images 5000] [--per-image 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psutil


def machine() -> str:
    return f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average {os.getloadavg()[0]:.1f}"


def prepare(work: Path, images: int, per_image: int) -> tuple[Path, Path, Path]:
    """Fixtures, predictions (Parquet OUTPUT) and the same predictions as a COCO results json."""
    from rayseg.jobs.fixtures import make_fixtures
    from rayseg.pipeline.evaluation import synthetic as syn
    from rayseg.pipeline.export import export_coco_results

    marker = work / f"ready-v2-{images}-{per_image}"
    gt_path, predictions, results = work / "fixtures" / "annotations" / "instances.json", work / "pred", work / "results_segm.json"
    if marker.exists():
        return gt_path, predictions, results
    started = time.perf_counter()
    fixtures = make_fixtures(work / "fixtures", images=images, size=(64, 64), seed=7)
    gt = json.loads(fixtures.instances_json.read_text())
    rows = syn.perturbed_instances(gt, seed=7, per_image=per_image, max_shift=1, extra=2.0, duplicates=0.2, score_levels=50)
    syn.write_predictions(rows, str(predictions), run_info={"model": "synthetic"})
    export_coco_results(str(predictions), str(work / "results.json"), annotations=str(fixtures.instances_json))
    segm = [{k: v for k, v in r.items() if k != "bbox"} for r in json.loads((work / "results.json").read_text())]
    results.write_text(json.dumps(segm))
    marker.touch()
    print(f"prepared {images} images, {len(segm)} predictions in {time.perf_counter() - started:.0f} s")
    return gt_path, predictions, results


def run_pycocotools(gt_path: Path, results: Path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        coco = COCO(str(gt_path))
        detections = coco.loadRes(str(results))
        evaluation = COCOeval(coco, detections, "segm")
        core = time.perf_counter()
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        finished = time.perf_counter()
    return finished - started, finished - core, evaluation


def run_rayseg(gt_path: Path, predictions: Path, use_ray: bool):
    from rayseg.pipeline.evaluation import evaluate_predictions

    started = time.perf_counter()
    result = evaluate_predictions(str(predictions), str(gt_path), task="instance", use_ray=use_ray, iou_types=("segm",))
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(f"/tmp/rayseg-bench-cocoeval-{args.images}")
    work.mkdir(parents=True, exist_ok=True)
    gt_path, predictions, results = prepare(work, args.images, args.per_image)
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - started
    times: dict[str, list[float]] = {"pycocotools": [], "pycocotools_core": [], "rayseg_local": [], "rayseg_ray": []}
    identical = True
    for round_ in range(args.rounds):
        total, core, reference = run_pycocotools(gt_path, results)
        times["pycocotools"].append(total)
        times["pycocotools_core"].append(core)
        local_seconds, local = run_rayseg(gt_path, predictions, use_ray=False)
        ray_seconds, distributed = run_rayseg(gt_path, predictions, use_ray=True)
        times["rayseg_local"].append(local_seconds)
        times["rayseg_ray"].append(ray_seconds)
        for result in (local, distributed):
            accumulated = result.evaluator.accumulate("segm")
            same = (
                result.metrics["segm"]["stats"] == [float(s) for s in reference.stats]
                and np.array_equal(accumulated["precision"], reference.eval["precision"])
                and np.array_equal(accumulated["recall"], reference.eval["recall"])
                and np.array_equal(accumulated["scores"], reference.eval["scores"])
            )
            identical &= same
        print(
            f"round {round_ + 1}: pycocotools {total:.2f} s (evaluate+accumulate+summarize {core:.2f} s), "
            f"rayseg one process {local_seconds:.2f} s, rayseg on Ray {ray_seconds:.2f} s, identical={identical}"
        )
    detections = sum(1 for _ in json.loads(results.read_text()))
    median = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "machine": machine(),
        "images": args.images,
        "detections": detections,
        "ray_init_seconds": round(ray_init, 2),
        "median_seconds": {k: round(v, 2) for k, v in median.items()},
        "min_seconds": {k: round(min(v), 2) for k, v in times.items()},
        "speedup_one_process": round(median["pycocotools"] / median["rayseg_local"], 2),
        "speedup_ray": round(median["pycocotools"] / median["rayseg_ray"], 2),
        "speedup_one_process_vs_pycocotools_core": round(median["pycocotools_core"] / median["rayseg_local"], 2),
        "stats": local.metrics["segm"]["stats"],
        "identical_to_pycocotools": identical,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
