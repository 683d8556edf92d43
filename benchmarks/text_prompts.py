"""Text-prompted auto-labelling: rayseg's batched `sam3` (and `grounded-sam`) vs the
transformers reference a user writes today — one image at a time in a loop — same tiny
weights, same images, same phrases, back to back.

    .venv/bin/python -m benchmarks.text_prompts [--images 32] [--size 128] [--batch-size 8]
        [--phrases "circle, square, triangle"] [--rounds 3] [--models sam3 grounded-sam] [--ray]

(a) model level, in this process, same torch threads, alternating loop / rayseg for
    `--rounds` rounds: the loop is `processor(images=image, text=...)`, the network and the
    processor's post-processing per image (sam3: per image and phrase, as its processor takes
    one phrase a call; grounded-sam: Grounding DINO on the joined phrases, then SAM on its
    boxes); rayseg is `model.postprocess(model.forward(model.preprocess(batch)))` over
    batches of `--batch-size` images. Images/s and CPU-s per image (process CPU time, all
    threads), and the instances each found (they must agree).
(b) `--ray`: the whole pipeline (`segment` + `write_run` on a local Ray of this machine's
    CPUs, started beforehand): listing, PNG decode, the actor, RLE encode, Parquet commit.

The weights: each family's `--weights random` config (tiny), seeded, saved as transformers
directories; sam3's class scoring widened so that instances pass its threshold. Goal:
rayseg ≥ 1.5× the loop's images/s, CPU-s per image ≤ the loop's.
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

SAM3_THRESHOLD = 0.2


def sam3_checkpoint(workdir: Path) -> Path:
    from rayseg.models.sam3 import random_parts

    directory = workdir / "sam3"
    if not (directory / "config.json").exists():
        network, processor = random_parts()
        with torch.no_grad():
            for parameter in network.dot_product_scoring.parameters():
                parameter.mul_(6)
        network.save_pretrained(directory)
        processor.save_pretrained(directory)
    return directory


def sam3_parts(directory: Path, phrases: list[str]):
    """(rayseg's model, the loop over images) for sam3."""
    from transformers import Sam3Model, Sam3Processor

    from rayseg.models.sam3 import build_sam3

    ours = build_sam3(str(directory), text=phrases, score_threshold=SAM3_THRESHOLD)
    processor = Sam3Processor.from_pretrained(directory)
    network = Sam3Model.from_pretrained(directory).eval()

    def loop(images: list[np.ndarray]) -> list[int]:
        found = []
        for image in images:
            count = 0
            for phrase in phrases:
                inputs = processor(images=image, text=phrase, return_tensors="pt")
                with torch.inference_mode():
                    outputs = network(**inputs)
                (result,) = processor.post_process_instance_segmentation(
                    outputs, threshold=SAM3_THRESHOLD, mask_threshold=0.5, target_sizes=[image.shape[:2]]
                )
                count += len(result["scores"])
            found.append(count)
        return found

    return ours, loop


def grounded_sam_checkpoint(workdir: Path) -> Path:
    """A directory with the random Grounding DINO (detector/) and the random SAM (sam/)."""
    from transformers import SamConfig, SamModel

    from rayseg.models.grounded_sam import random_parts
    from rayseg.models.sam import RANDOM_CONFIG, image_processor_for

    directory = workdir / "grounded-sam"
    if not (directory / "sam" / "config.json").exists():
        network, processor = random_parts()
        network.save_pretrained(directory / "detector")
        processor.save_pretrained(directory / "detector")
        torch.manual_seed(0)
        sam = SamModel(SamConfig(**RANDOM_CONFIG)).eval()
        sam.save_pretrained(directory / "sam")
        image_processor_for(sam, None, None).save_pretrained(directory / "sam")
    return directory


def grounded_sam_parts(directory: Path, phrases: list[str]):
    """(rayseg's model, the loop over images) for grounded-sam: per image, Grounding DINO on
    the joined phrases and its processor's boxes, then SAM on those boxes."""
    from transformers import (
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamModel,
        SamProcessor,
    )

    from rayseg.models.grounded_sam import build_grounded_sam
    from rayseg.models.text_prompts import joined_prompt

    # text_threshold 0: every kept box names a phrase, so both keep the same boxes.
    ours = build_grounded_sam(
        str(directory / "detector"), text=phrases, segmenter_weights=str(directory / "sam"), text_threshold=0.0
    )
    detector_processor = GroundingDinoProcessor.from_pretrained(directory / "detector")
    detector = GroundingDinoForObjectDetection.from_pretrained(directory / "detector").eval()
    sam_processor = SamProcessor.from_pretrained(directory / "sam")
    sam = SamModel.from_pretrained(directory / "sam").eval()
    prompt = joined_prompt(phrases)

    def loop(images: list[np.ndarray]) -> list[int]:
        found = []
        for image in images:
            inputs = detector_processor(images=image, text=prompt, return_tensors="pt")
            with torch.inference_mode():
                outputs = detector(**inputs)
            (result,) = detector_processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=0.25, text_threshold=0.0, target_sizes=[image.shape[:2]]
            )
            boxes = result["boxes"]
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])][:100]
            if len(boxes):
                sam_inputs = sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
                with torch.inference_mode():
                    masks = sam(**sam_inputs, multimask_output=False).pred_masks
                sam_processor.post_process_masks(masks, sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"])
            found.append(len(boxes))
        return found

    return ours, loop


PARTS = {"sam3": (sam3_checkpoint, sam3_parts), "grounded-sam": (grounded_sam_checkpoint, grounded_sam_parts)}


def timed(function) -> tuple[float, float, object]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def model_level(name: str, workdir: Path, images: list[np.ndarray], phrases: list[str], batch_size: int, rounds: int) -> dict:
    make_checkpoint, make_parts = PARTS[name]
    ours, loop = make_parts(make_checkpoint(workdir), phrases)

    def batched() -> list[int]:
        found = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            segments = ours.postprocess(ours.forward(ours.preprocess(batch)), [image.shape[:2] for image in batch])
            found.extend(len(s) for s in segments)
        return found

    batched(), loop(images[:2])  # warm-up: first-call allocations, lazy imports
    runs = {"loop": [], "rayseg": []}
    found = {}
    for _ in range(rounds):
        for label, function in (("loop", lambda: loop(images)), ("rayseg", batched)):
            wall, cpu, counts = timed(function)
            runs[label].append({"images_per_s": len(images) / wall, "cpu_s_per_image": cpu / len(images)})
            found[label] = counts
    if found["loop"] != found["rayseg"]:
        raise AssertionError(f"{name}: instances per image differ: {found}")
    return {
        "instances_per_image": float(np.mean(found["rayseg"])),
        "runs": runs,
        "speedup_per_round": [b["images_per_s"] / a["images_per_s"] for a, b in zip(runs["loop"], runs["rayseg"])],
        "cpu_ratio_per_round": [b["cpu_s_per_image"] / a["cpu_s_per_image"] for a, b in zip(runs["loop"], runs["rayseg"])],
    }


def ray_pipeline(name: str, workdir: Path, images_dir: Path, phrases: list[str]) -> dict:
    import ray

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    make_checkpoint = PARTS[name][0]
    resources = plan_resources(ray.cluster_resources())
    directory = make_checkpoint(workdir)
    if name == "sam3":
        spec = ModelSpec(name, str(directory), score_threshold=SAM3_THRESHOLD, options={"text": phrases})
    else:
        options = {"text": phrases, "segmenter_weights": str(directory / "sam"), "text_threshold": 0.0}
        spec = ModelSpec(name, str(directory / "detector"), options=options)
    output = workdir / f"out-{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    wall = time.perf_counter()
    rows = segment(read_source(str(images_dir), parallelism=int(ray.cluster_resources()["CPU"])), spec, resources)
    summary = write_run(rows, str(output), run_id="bench", run_info={"model": name}, write_cpus=resources.task_cpus)
    wall = time.perf_counter() - wall
    return {"images": summary.images, "ok": summary.ok, "segments": summary.segments, "wall_s": wall,
            "images_per_s": summary.images / wall, "batch_size": resources.batch_size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--phrases", default="circle, square, triangle")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--ray", action="store_true", help="also time the whole Ray pipeline")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench-text"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from rayseg.jobs.fixtures import make_fixtures
    from rayseg.models.text_prompts import split_text

    fixtures = args.workdir / f"fixtures-{args.images}x{args.size}"
    if len(list((fixtures / "images").glob("*.png"))) != args.images:
        make_fixtures(fixtures, images=args.images, size=(args.size, args.size), seed=13)
    images = [np.array(Image.open(p).convert("RGB")) for p in sorted((fixtures / "images").glob("*.png"))]
    phrases = split_text(args.phrases)
    result = {"machine": machine(), "load_average_at_start": os.getloadavg(), "images": len(images),
              "size": f"{args.size}x{args.size}", "phrases": phrases, "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "model_level": {}}  # fmt: skip
    for name in args.models:
        result["model_level"][name] = model_level(name, args.workdir, images, phrases, args.batch_size, args.rounds)
        print(f"{name}: speedup per round {result['model_level'][name]['speedup_per_round']}", file=sys.stderr)
    if args.ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result["ray_pipeline"] = {name: ray_pipeline(name, args.workdir, fixtures / "images", phrases) for name in args.models}
        ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
