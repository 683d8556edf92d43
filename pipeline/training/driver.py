"""The driver of a training run: checks arguments and data, plans resources, starts Ray
Train and returns the run's summary."""

from __future__ import annotations

import logging
import math
import posixpath
import time
from dataclasses import asdict, dataclass, field

from ..sink import new_run_id
from ..storage import absolute_uri, filesystem
from .checkpoints import RAY_TRAIN_DIR, load_history, read_checkpoint_epoch
from .data import TrainingError, find_training_data, split_items
from .loop import train_loop_per_worker
from .pairs import DecodePairs
from .progress import epoch_progress, quiet_data_context, ray_train_log_level
from .resources import plan_train_resources

log = logging.getLogger("rayseg")

DEFAULT_WIDTH = 16
DEFAULT_DEPTH = 4


@dataclass
class TrainSummary:
    """What a training run did: its data split, resources and per-epoch history (metrics.json)."""

    out: str
    run_id: str
    epochs: int
    start_epoch: int
    images: int
    train_images: int
    val_images: int
    categories: list[dict]
    resources: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def parse_size(text: str | None, option: str = "--size") -> tuple[int, int] | None:
    """'HxW' → (height, width)."""
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise TrainingError(f"{option} takes HxW, e.g. 128x128, got {text!r}") from None
    if height < 1 or width < 1:
        raise TrainingError(f"{option} must be positive, got {text!r}")
    return height, width


def _first_image_size(uri: str, storage_options: dict | None) -> tuple[int, int]:
    from PIL import Image, ImageOps

    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f, Image.open(f) as image:
        width, height = ImageOps.exif_transpose(image).size
    return height, width


def train_unet(
    data: str,
    out: str,
    *,
    epochs: int = 10,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    batch_size: int = 8,
    lr: float = 2e-3,
    resume_from: str | None = None,
    val_fraction: float = 0.1,
    size: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    width: int | None = None,
    depth: int | None = None,
    dice_weight: float = 1.0,
    colour_jitter: float = 0.1,
    colour_shuffle: bool = False,
    seed: int = 0,
    categories_file: str | None = None,
    storage_options: dict | None = None,
    run_id: str | None = None,
    max_failures: int = 0,
) -> TrainSummary:
    """Trains (or resumes / fine-tunes) a U-Net on DATA with Ray Train; checkpoints go to OUT.

    Needs Ray initialised (the CLI connects). Argument, data and checkpoint errors raise
    TrainingError / WeightsError / ResourceError before any cluster work.
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from ...models.unet import UNetConfig

    started = time.time()
    storage_options = dict(storage_options or {})
    data, out = absolute_uri(data, storage_options), absolute_uri(out, storage_options)
    if resume_from:
        resume_from = absolute_uri(resume_from, storage_options)
    if epochs < 1:
        raise TrainingError(f"--epochs must be ≥ 1, got {epochs}")
    if batch_size < 1:
        raise TrainingError(f"--batch-size must be ≥ 1, got {batch_size}")
    if not lr > 0:
        raise TrainingError(f"--lr must be > 0, got {lr}")
    found = find_training_data(data, storage_options, categories_file)
    if found.skipped:
        log.warning("%d image(s) under %s/images have no label PNG and are left out of training", found.skipped, data.rstrip("/"))
    categories = found.categories

    start_epoch = 0
    if resume_from:
        from ...models.unet import CONFIG_FILE, unet_weights_file
        from ...models.weights import read_bytes

        weights_dir = posixpath.dirname(unet_weights_file(resume_from))
        saved = UNetConfig.from_json(read_bytes(posixpath.join(weights_dir, CONFIG_FILE), storage_options).decode())
        if [c.to_dict() for c in saved.categories] != [c.to_dict() for c in categories]:
            raise TrainingError(
                f"--resume-from {resume_from} predicts {[c.name for c in saved.categories]} but {data} has "
                f"{[c.name for c in categories]}; the classes and their order must match"
            )
        for name, given, stored in (("width", width, saved.width), ("depth", depth, saved.depth)):
            if given is not None and given != stored:
                raise TrainingError(f"--{name} {given} differs from the checkpoint's {stored}; leave it out when resuming")
        width, depth = saved.width, saved.depth
        start_epoch = read_checkpoint_epoch(weights_dir, storage_options)
        resume_from = weights_dir
        if start_epoch >= epochs:
            raise TrainingError(f"{resume_from} has already trained {start_epoch} epochs; ask for more with --epochs (the total)")
    width = DEFAULT_WIDTH if width is None else width
    depth = DEFAULT_DEPTH if depth is None else depth
    UNetConfig(categories=categories, width=width, depth=depth)  # validates

    train_items, val_items = split_items(found.items, val_fraction, seed)
    size = size or _first_image_size(found.items[0]["image_uri"], storage_options)
    resources = plan_train_resources(
        ray.cluster_resources(),
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
    )
    if len(train_items) < resources.workers:
        raise TrainingError(f"{len(train_items)} training images cannot feed {resources.workers} workers")

    fs, out_path = filesystem(out, storage_options)
    fs.makedirs(out_path, exist_ok=True)
    run_id = run_id or new_run_id()
    storage_path = posixpath.join(out.rstrip("/"), RAY_TRAIN_DIR)

    decode = DecodePairs([c.to_dict() for c in categories], size, storage_options)

    def pairs(items: list[dict]):
        blocks = max(1, min(len(items) // 8, 64))
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            decode, batch_size=8, batch_format="numpy", num_cpus=resources.task_cpus
        )

    with quiet_data_context():
        datasets = {"train": pairs(train_items).randomize_block_order(seed=seed)}
        if val_items:
            datasets["val"] = pairs(val_items)
    config = {
        "categories": [c.to_dict() for c in categories],
        "width": width,
        "depth": depth,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "dice_weight": dice_weight,
        "colour_jitter": colour_jitter,
        "crop": list(crop) if crop else None,
        "colour_shuffle": bool(colour_shuffle),
        "seed": seed,
        "resume_from": resume_from,
        "out": out.rstrip("/"),
        "storage_options": storage_options,
        "has_val": bool(val_items),
        "torch_threads": resources.torch_threads,
        "shuffle_buffer": max(batch_size, min(4 * batch_size, 64)),
        # Each worker's shard is an equal split of the training images (Ray's streaming_split).
        "steps_per_epoch": math.ceil(len(train_items) // resources.workers / batch_size),
    }
    worker_resources = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        worker_resources["GPU"] = resources.gpus_per_worker
    log.info(
        "training U-Net (width %d, depth %d, %d classes) on %d images (%d held out) at %dx%d: epochs %d→%d, "
        "%d worker(s) × %g CPU / %g GPU",
        width, depth, len(categories), len(train_items), len(val_items), size[0], size[1], start_epoch, epochs,
        resources.workers, resources.cpus_per_worker, resources.gpus_per_worker,
    )  # fmt: skip
    ray_log_level = ray_train_log_level()
    with epoch_progress(epochs) as progress:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**config, "progress": progress, "ray_train_log_level": ray_log_level},
            scaling_config=ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.gpus_per_worker > 0,
                resources_per_worker=worker_resources,
            ),
            run_config=RunConfig(
                name=run_id,
                storage_path=storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                failure_config=FailureConfig(max_failures=max_failures),
                logging_config=LoggingConfig(log_level=ray_log_level),
            ),
            # The DataContext's options, which Train's default (`default_ingest_options`)
            # means to carry over too, but rebuilds passing the deprecated
            # `exclude_resources`: a RayDeprecationWarning from the DatasetManager each run.
            dataset_config=DataConfig(execution_options=ray.data.DataContext.get_current().execution_options),
            datasets=datasets,
        )
        trainer.fit()
    history = load_history(out, storage_options)
    return TrainSummary(
        out=out,
        run_id=run_id,
        epochs=epochs,
        start_epoch=start_epoch,
        images=len(found.items),
        train_images=len(train_items),
        val_images=len(val_items),
        categories=[c.to_dict() for c in categories],
        resources=asdict(resources),
        history=history,
        seconds=time.time() - started,
    )
