"""Does rayseg's SAM add time around the model? Automatic mask generation per image: our model
object vs transformers' "mask-generation" pipeline, same model, same images, same parameters.

    .venv/bin/python -m benchmarks.sam_overhead [--images 8] [--size 256] [--points 32] [--rounds 2]
        [--ray-images 32] [--attach-rows 20 10000] [--parts model ray attach]

(a) model level: for each image, `model.postprocess(model.forward(model.preprocess([image])))`
    (rayseg.models.sam) vs `pipeline("mask-generation", model=..., image_processor=...)(image)`,
    in this process, same torch threads, alternating a/b/a/b for `--rounds` rounds; seconds
    per image (wall and CPU) and the masks each found (they must agree).
(b) the full Ray pipeline: `segment(read_source(IMAGES), ModelSpec("sam", ...))` + `write_run`
    on a local Ray of this machine's CPUs (started beforehand, not timed): listing, PNG decode,
    the actor (model built in it), RLE encode, Parquet commit. Wall seconds per image.
(c) attaching prompts: Ray Data `Dataset.join` (left outer on image_id) vs rayseg's broadcast
    lookup (`attach_prompts`, with and without its unmatched-prompts count), `--attach-rows`
    image rows, prompts for half of them; wall seconds to materialise, after one warm-up map
    (worker start-up): each lookup twice, then the join twice.

The model: `--weights random`'s config (rayseg.models.sam.RANDOM_CONFIG: a 2-block ViT of
width 64 on 256×256 inputs), seeded, with transformers' near-zero init widened to N(0, 0.3)
so that masks differ from point to point, saved as a transformers directory. Two parameter
sets: segment-anything's defaults (pred_iou_thresh 0.88, stability 0.95) and a permissive one
(pred_iou_thresh 0, stability 0.02 at offset 0.1, mask_threshold 0.3) under which many masks
survive to the NMS — transformers' pipeline's cost grows with them (RLE round trip).
Goal: (a) rayseg / transformers ≤ 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .common import machine

PERMISSIVE = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.02, "stability_score_offset": 0.1, "mask_threshold": 0.3}
DEFAULTS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "stability_score_offset": 1.0, "mask_threshold": 0.0}


def checkpoint(workdir: Path) -> Path:
    from transformers import SamConfig, SamImageProcessor, SamModel

    from rayseg.models.sam import RANDOM_CONFIG

    directory = workdir / "sam-random-widened"
    if (directory / "model.safetensors").exists():
        return directory
    torch.manual_seed(0)
    network = SamModel(SamConfig(**RANDOM_CONFIG)).eval()
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if parameter.dim() > 1 and "positional" not in name:
                parameter.normal_(0, 0.3)
    network.save_pretrained(directory)
    size = RANDOM_CONFIG["vision_config"]["image_size"]
    SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}).save_pretrained(directory)
    return directory


def fixtures(workdir: Path, images: int, size: int) -> Path:
    from rayseg.jobs.fixtures import make_fixtures

    directory = workdir / f"fixtures-{images}x{size}"
    if len(list((directory / "images").glob("*.png"))) != images:
        make_fixtures(directory, images=images, size=(size, size), seed=11)
    return directory / "images"


def timed(function) -> tuple[float, float, object]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def model_level(directory: Path, images: list[np.ndarray], parameters: dict, points: int, rounds: int) -> dict:
    from transformers import SamImageProcessor, SamModel, pipeline

    from rayseg.models.sam import build_sam

    ours = build_sam(str(directory), points_per_side=points, points_per_batch=64, **parameters)
    network = SamModel.from_pretrained(directory, local_files_only=True).eval()
    generator = pipeline(
        "mask-generation", model=network, image_processor=SamImageProcessor.from_pretrained(directory), device="cpu"
    )
    pictures = [Image.fromarray(image) for image in images]

    def run_ours():
        return [len(ours.postprocess(ours.forward(ours.preprocess([im])), [im.shape[:2]])[0]) for im in images]

    def run_theirs():
        return [
            len(generator(p, points_per_crop=points, points_per_batch=64, crops_nms_thresh=0.7, **parameters)["masks"])
            for p in pictures
        ]

    run_ours(), run_theirs()  # warm-up: first-call allocations, lazy imports
    measured = {"rayseg": [], "transformers": []}
    masks = {}
    for _ in range(rounds):
        for name, function in (("rayseg", run_ours), ("transformers", run_theirs)):
            wall, cpu, counts = timed(function)
            measured[name].append({"wall_s_per_image": wall / len(images), "cpu_s_per_image": cpu / len(images)})
            masks[name] = counts
    if masks["rayseg"] != masks["transformers"]:
        raise AssertionError(f"mask counts differ: {masks}")
    best = {name: min(r["wall_s_per_image"] for r in runs) for name, runs in measured.items()}
    return {
        "parameters": parameters,
        "masks_per_image": float(np.mean(masks["rayseg"])),
        "runs": measured,
        "ratio_wall_per_round": [
            a["wall_s_per_image"] / b["wall_s_per_image"] for a, b in zip(measured["rayseg"], measured["transformers"])
        ],
        "ratio_best_wall": best["rayseg"] / best["transformers"],
        "ratio_cpu_per_round": [
            a["cpu_s_per_image"] / b["cpu_s_per_image"] for a, b in zip(measured["rayseg"], measured["transformers"])
        ],
    }


def ray_pipeline(directory: Path, images_dir: Path, output: Path, parameters: dict, points: int) -> dict:
    import ray

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    resources = plan_resources(ray.cluster_resources())
    spec = ModelSpec("sam", str(directory), options={"points_per_side": points, **parameters})
    wall = time.perf_counter()
    rows = segment(read_source(str(images_dir), parallelism=int(ray.cluster_resources()["CPU"])), spec, resources)
    summary = write_run(rows, str(output), run_id="bench", run_info={"model": "sam"}, write_cpus=resources.task_cpus)
    wall = time.perf_counter() - wall
    return {
        "images": summary.images,
        "ok": summary.ok,
        "segments": summary.segments,
        "wall_s": wall,
        "wall_s_per_image": wall / summary.images,
        "actors": resources.max_actors,
        "cpus_per_actor": resources.cpus_per_actor,
        "torch_threads": resources.torch_threads,
        "batch_size": resources.batch_size,
    }


def attach(rows: int) -> dict:
    import pyarrow as pa
    import ray

    from rayseg.pipeline.prompts import attach_prompts

    ids = [f"{i:07d}.png" for i in range(rows)]
    half = max(rows // 2, 1)
    images = ray.data.from_arrow([pa.table({"image_id": ids[:half], "uri": ids[:half]}), pa.table({"image_id": ids[half:], "uri": ids[half:]})])
    boxes = pa.table(
        {"image_id": ids[::2], "bbox": [[1.0, 2.0, 3.0, 4.0]] * len(ids[::2]), "category_id": [1] * len(ids[::2]), "annotation_id": list(range(len(ids[::2])))}
    )
    from rayseg.pipeline.prompts import load_prompts

    prompts, _ = load_prompts(boxes)
    images.map_batches(lambda batch: batch, batch_format="pyarrow", num_cpus=0.25).materialize()  # warm workers

    def join():
        joined = images.join(
            ray.data.from_arrow(prompts), join_type="left_outer", num_partitions=2, on=("image_id",),
            aggregator_ray_remote_args={"num_cpus": 0.25},
        )  # fmt: skip
        assert joined.materialize().count() == rows

    def broadcast(check: bool):
        attached, _ = attach_prompts(images, boxes, check_unmatched=check)
        assert attached.materialize().count() == rows

    # The joins last: for a while after a join (its aggregator actors going away) the next
    # Ray Data execution on this small machine waits too, which would be billed to whatever
    # ran after it.
    results: dict[str, list[float]] = {"broadcast_s": [], "broadcast_with_unmatched_check_s": [], "join_s": []}
    for name, function in (
        ("broadcast_s", lambda: broadcast(False)), ("broadcast_with_unmatched_check_s", lambda: broadcast(True)),
        ("broadcast_s", lambda: broadcast(False)), ("broadcast_with_unmatched_check_s", lambda: broadcast(True)),
        ("join_s", join), ("join_s", join),
    ):  # fmt: skip
        wall = time.perf_counter()
        function()
        results[name].append(time.perf_counter() - wall)
    return {"rows": rows, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--points", type=int, default=32, help="points_per_side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-images", type=int, default=32)
    parser.add_argument("--attach-rows", type=int, nargs="*", default=[20, 10000])
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-sam"))
    parser.add_argument("--parts", nargs="*", default=["model", "ray", "attach"], choices=["model", "ray", "attach"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    directory = checkpoint(args.workdir)
    images_dir = fixtures(args.workdir, args.images, args.size)
    images = [np.array(Image.open(p).convert("RGB")) for p in sorted(images_dir.glob("*.png"))]
    threads = torch.get_num_threads()
    result = {
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "images": len(images),
        "size": f"{args.size}x{args.size}",
        "points_per_side": args.points,
        "torch_threads": threads,
        "model_level": {},
    }
    if "model" in args.parts:
        result["model_level"] = {
            "defaults": model_level(directory, images, DEFAULTS, args.points, args.rounds),
            "permissive": model_level(directory, images, PERMISSIVE, args.points, args.rounds),
        }
    if {"ray", "attach"} & set(args.parts):
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        if "ray" in args.parts:
            ray_images = fixtures(args.workdir, args.ray_images, args.size)
            output = args.workdir / f"out-{time.strftime('%Y%m%dT%H%M%S')}"
            result["ray_pipeline"] = ray_pipeline(directory, ray_images, output, PERMISSIVE, args.points)
            print(f"ray pipeline: {result['ray_pipeline']['wall_s_per_image']:.3f} s/image", file=sys.stderr)
        if "attach" in args.parts:
            result["attach"] = [attach(rows) for rows in args.attach_rows]
        ray.shutdown()
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2, default=float))
    for name, level in result["model_level"].items():
        print(
            f"{name}: {level['masks_per_image']:.1f} masks/image; rayseg/transformers per round: wall "
            + ", ".join(f"×{r:.3f}" for r in level["ratio_wall_per_round"])
            + "; CPU "
            + ", ".join(f"×{r:.3f}" for r in level["ratio_cpu_per_round"]),
            file=sys.stderr,
        )
    with open(args.workdir / "results.jsonl", "a") as f:
        f.write(json.dumps(result, default=float) + "\n")


if __name__ == "__main__":
    main()
