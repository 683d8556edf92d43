"""One measured phase of the benchmark harness, run in a fresh process by benchmarks/harness.py:

    python -m benchmarks.harness_phases CONFIG.json RESULT.json

Phases, all over the same PNG files with the same model object (rayseg's, built from the same
weights and options) and the same batch size as the pipeline's actors; a single process runs
torch on every core (`torch_threads`, torch's own default), the pipeline as it plans:

- ceiling: `model.forward` alone over batches decoded and preprocessed beforehand, in one
  process with torch on every core (`torch_threads`), as a user's own loop runs it;
- parallel: the same bare forward in one single-threaded process per core, each over its
  share of the batches (prepared before the clock starts): a reference for data-parallel
  actors, which the ceiling's one process cannot show;
- baseline: what a user writes instead of rayseg — one process: PIL decode → preprocess →
  forward → postprocess → pycocotools RLE → pyarrow Parquet, batch by batch;
- pool: the same loop over multiprocessing.Pool(2), the parent writing the Parquet;
- rayseg: `rayseg segment IMAGES OUTPUT` (jobs.runner.run_segment_spec) on a local Ray
  started as the CLI starts it; ray.init is timed apart and the freshly started Ray is left
  to settle before measuring.

A phase runs over the first `images` fixtures and measures its whole process tree
(ProcessTreeSampler: user + sys CPU of every process, Ray's included; peak PSS) from its
start (for rayseg: the call of run_segment_spec, Ray already up and settled) to its end (the
committed run), and when its first output came (a batch written; for rayseg, the first rows
out of the inference actors, which hand on whole blocks: a coarse clock). The harness runs
each phase twice, short and full, and takes the steady state from the difference.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rayseg.models.base import SegmentationModel
from rayseg.models.registry import build_model
from rayseg.models.segments import Segments
from rayseg.pipeline.schema import OUTPUT_SCHEMA, STATUS_OK

from .common import ProcessTreeSampler, TreeMeasurement

POOL_PROCESSES = 2
PARALLEL_PROCESSES = os.cpu_count() or 1
# The operator of the inference actors in a Ray Data plan (pipeline/segment.py).
INFERENCE_OPERATOR = "SegmentImages"


@dataclass
class PhaseConfig:
    """What one phase runs. model: the harness's name for it (unet, maskrcnn, sam, trivial);
    registry_name/weights/options: how rayseg builds it; images: how many of images_dir's
    PNGs (the first by name); output: a directory the phase creates for what it writes;
    device: where the single-process phases run the model ("cpu" or "cuda")."""

    model: str
    phase: str
    registry_name: str
    weights: str
    images_dir: str
    images: int
    output: str
    batch_size: int
    torch_threads: int
    options: dict = field(default_factory=dict)
    device: str = "cpu"


def build(config: PhaseConfig) -> SegmentationModel:
    return build_model(config.registry_name, config.weights, device=config.device, **config.options)


def image_paths(config: PhaseConfig) -> list[Path]:
    """The first `config.images` images of the fixtures, by name."""
    return sorted(Path(config.images_dir).glob("*.png"))[: config.images]


def decode(path: Path) -> np.ndarray:
    """uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def output_row(path: Path, image: np.ndarray, segments: Segments, model: SegmentationModel) -> dict:
    """One output row (rayseg's schema) with the masks RLE-encoded by pycocotools."""
    labels = {category.id: category.name for category in model.categories}
    encoded = []
    if segments:
        masks = np.asfortranarray(np.stack([s.mask for s in segments], axis=-1).astype(np.uint8))
        rles = mask_utils.encode(masks)
        areas, boxes = mask_utils.area(rles).tolist(), mask_utils.toBbox(rles).tolist()
        encoded = [
            {
                "category_id": s.category_id, "label": labels.get(s.category_id), "score": s.score, "bbox": box,
                "area": area, "rle": rle["counts"].decode("ascii"), "segment_id": s.segment_id,
                "iscrowd": s.iscrowd, "annotation_id": s.annotation_id,
            }
            for s, rle, area, box in zip(segments, rles, areas, boxes)
        ]  # fmt: skip
    return {
        "image_id": path.name, "uri": str(path), "width": image.shape[1], "height": image.shape[0],
        "status": STATUS_OK, "error": None, "model": model.name, "segments": encoded,
    }  # fmt: skip


def segment_and_encode(model: SegmentationModel, paths: list[Path]) -> list[dict]:
    """The user's loop body for one batch: decode, model, encode."""
    images = [decode(path) for path in paths]
    sizes = [image.shape[:2] for image in images]
    with torch.inference_mode():
        results = model.postprocess(model.forward(model.preprocess(images)), sizes)
    return [output_row(path, image, segments, model) for path, image, segments in zip(paths, images, results)]


def batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def prepared_batches(model: SegmentationModel, paths: list[Path], batch_size: int) -> list[tuple[object, int]]:
    """(preprocessed batch, its image count) over `paths`, decoded beforehand."""
    return [(model.preprocess([decode(path) for path in chunk]), len(chunk)) for chunk in batches(paths, batch_size)]


class OutputMarks:
    """Marks the sampler "first_output" at the first output and "last_output" when every
    image is out, from the running count of images out."""

    def __init__(self, sampler: ProcessTreeSampler, total: int):
        self.sampler = sampler
        self.total = total
        self.first_rows: int | None = None

    def rows_out(self, rows: int) -> None:
        if self.first_rows is None:
            self.first_rows = rows
            self.sampler.mark("first_output")
        if rows >= self.total:
            self.sampler.mark("last_output")


# --- phases: each measures itself with `sampler` (marks "start", then OutputMarks) and returns
# its own result fields. ----------------------------------------------------------------------


def run_ceiling(config: PhaseConfig, sampler: ProcessTreeSampler) -> dict:
    model = build(config)
    prepared = prepared_batches(model, image_paths(config), config.batch_size)
    outputs = OutputMarks(sampler, sum(count for _, count in prepared))
    sampler.start()
    sampler.mark("start")
    done = 0
    with torch.inference_mode():
        for batch, count in prepared:
            model.forward(batch)
            if config.device == "cuda":
                torch.cuda.synchronize()  # CUDA runs the forward asynchronously: done when it is
            done += count
            outputs.rows_out(done)
    return {"first_rows": outputs.first_rows}


def _forward_share(config: dict, paths: list[Path], ready, go, done) -> None:
    """One process of the `parallel` phase: builds the model and prepares its share of the
    batches, reports ready, waits for `go`, runs the forward passes, puts its image count."""
    torch.set_num_threads(1)
    phase = PhaseConfig(**config)
    model = build(phase)
    prepared = prepared_batches(model, paths, phase.batch_size)
    ready.put(True)
    go.wait()
    with torch.inference_mode():
        for batch, _count in prepared:
            model.forward(batch)
    done.put(sum(count for _, count in prepared))


def run_parallel(config: PhaseConfig, sampler: ProcessTreeSampler) -> dict:
    """The ceiling as separate processes: one per core, each the bare forward on one torch
    thread over its own share of the batches — what the cores do when forward passes run
    side by side instead of splitting each one over intra-op threads."""
    paths = image_paths(config)
    shares = [paths[i::PARALLEL_PROCESSES] for i in range(PARALLEL_PROCESSES)]
    context = multiprocessing.get_context("spawn")
    ready, done, go = context.Queue(), context.Queue(), context.Event()
    workers = [context.Process(target=_forward_share, args=(asdict(config), share, ready, go, done)) for share in shares]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get()
    outputs = OutputMarks(sampler, len(paths))
    sampler.start()
    sampler.mark("start")
    go.set()
    finished = 0
    for _ in workers:
        finished += done.get()
        outputs.rows_out(finished)
    for worker in workers:
        worker.join()
    return {"first_rows": outputs.first_rows, "processes": PARALLEL_PROCESSES}


def write_rows(config: PhaseConfig, row_batches, outputs: OutputMarks) -> int:
    """Writes batches of output rows to one Parquet file as they come; returns the segments."""
    segments = done = 0
    Path(config.output).mkdir(parents=True)
    with pq.ParquetWriter(Path(config.output) / "part-00000.parquet", OUTPUT_SCHEMA) as writer:
        for rows in row_batches:
            writer.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
            segments += sum(len(row["segments"]) for row in rows)
            done += len(rows)
            outputs.rows_out(done)
    return segments


def run_baseline(config: PhaseConfig, sampler: ProcessTreeSampler) -> dict:
    sampler.start()
    sampler.mark("start")
    model = build(config)
    paths = image_paths(config)
    outputs = OutputMarks(sampler, len(paths))
    segments = write_rows(config, (segment_and_encode(model, chunk) for chunk in batches(paths, config.batch_size)), outputs)
    return {"first_rows": outputs.first_rows, "segments": segments}


_pool_model: SegmentationModel | None = None


def _pool_start(config: dict) -> None:
    global _pool_model
    torch.set_num_threads(1)  # two processes on two cores
    _pool_model = build(PhaseConfig(**config))


def _pool_batch(paths: list[Path]) -> list[dict]:
    return segment_and_encode(_pool_model, paths)


def run_pool(config: PhaseConfig, sampler: ProcessTreeSampler) -> dict:
    sampler.start()
    sampler.mark("start")
    paths = image_paths(config)
    outputs = OutputMarks(sampler, len(paths))
    with multiprocessing.Pool(POOL_PROCESSES, initializer=_pool_start, initargs=(asdict(config),)) as pool:
        segments = write_rows(config, pool.imap(_pool_batch, batches(paths, config.batch_size)), outputs)
    return {"first_rows": outputs.first_rows, "segments": segments, "processes": POOL_PROCESSES}


def run_rayseg(config: PhaseConfig, sampler: ProcessTreeSampler) -> dict:
    import ray
    from ray.data.context import EXECUTION_CALLBACKS_ENV_VAR

    from rayseg.jobs import cluster
    from rayseg.jobs.runner import run_segment_spec
    from rayseg.jobs.spec import parse_spec
    from rayseg.models.registry import get_entry
    from rayseg.pipeline.resources import plan_resources

    from .stage_clock import StageClock

    started = time.perf_counter()
    cluster.connect()
    ray_init = time.perf_counter() - started
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Read by the driver's planner only, after Ray's processes started with the old environment.
    os.environ[EXECUTION_CALLBACKS_ENV_VAR] = f"{StageClock.__module__}.{StageClock.__qualname__}"
    outputs = OutputMarks(sampler, len(image_paths(config)))
    StageClock.watch(INFERENCE_OPERATOR, outputs.rows_out)
    spec = parse_spec(
        {
            "kind": "segment",
            "input": config.images_dir,
            "limit": config.images,
            "output": config.output,
            "model": {"name": config.registry_name, "weights": config.weights, "options": config.options},
        },
        source="benchmark",
    )
    resources = plan_resources(ray.cluster_resources(), cpu_parallelism=get_entry(config.registry_name).cpu_parallelism)
    sampler.wait_idle()
    sampler.start()
    start = sampler.mark("start").time
    summary = run_segment_spec(spec, storage_options={})
    sampler.mark("end")
    sampler.mark("last_output")  # in case the executor ended before its callback saw the last rows
    stages = {
        name: {
            **stage,
            "first_output": stage["first_output"] - start,
            "last_output": stage["last_output"] - start,
            "timeline": [(at - start, rows) for at, rows in stage["timeline"]],
        }
        for name, stage in StageClock.stages.items()
    }
    return {
        "first_rows": outputs.first_rows,
        "segments": summary.segments,
        "ok": summary.ok,
        "error": summary.error,
        "ray_init_s": ray_init,
        "stages": stages,
        "actors": resources.max_actors,
        "cpus_per_actor": resources.cpus_per_actor,
        "task_cpus": resources.task_cpus,
        "actor_threads": resources.torch_threads,
    }


RUNNERS = {
    "ceiling": run_ceiling,
    "parallel": run_parallel,
    "baseline": run_baseline,
    "pool": run_pool,
    "rayseg": run_rayseg,
}


def summarise(config: PhaseConfig, measured: TreeMeasurement, extra: dict) -> dict:
    """Wall time, CPU, memory and first output of a phase, from its marks."""
    marks = measured.marks
    start, first, last = marks["start"].time, marks["first_output"].time, marks["last_output"].time
    end = marks["end"].time if "end" in marks else last
    return {
        "model": config.model,
        "phase": config.phase,
        "images": config.images,
        "batch_size": config.batch_size,
        "torch_threads": config.torch_threads,
        "wall_s": end - start,
        "first_output_s": first - start,
        "tail_s": end - last,
        "images_per_s": config.images / (end - start),
        "cpu_s": measured.cpu_s,
        "cpu_s_per_image": measured.cpu_s / config.images,
        "peak_pss_mib": measured.peak_pss_bytes / 2**20,
        "by_process_cpu_s": measured.by_process,
        "sampler_cpu_s": measured.sampler_cpu_s,
        **extra,
    }


def main() -> None:
    config_path, result_path = sys.argv[1:3]
    config = PhaseConfig(**json.loads(Path(config_path).read_text()))
    torch.set_num_threads(config.torch_threads)
    sampler = ProcessTreeSampler()
    extra = RUNNERS[config.phase](config, sampler)
    measured = sampler.stop()
    Path(result_path).write_text(json.dumps(summarise(config, measured, extra), indent=2, default=float))


if __name__ == "__main__":
    main()
