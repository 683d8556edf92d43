"""The training loop that runs on every Ray Train worker."""

from __future__ import annotations

import logging
import posixpath
import tempfile
import time

import numpy as np

from ...models.categories import parse_categories
from ..evaluation.confusion import iou_from_confusion
from .augment import augment, normalise
from .checkpoints import EPOCHS_DIR, load_history, load_training_state, save_checkpoint
from .loss import segmentation_loss
from .schedule import cosine_lr, warmup_steps
from .validation import confusion_matrix


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _hold_report_lines_to(level: str) -> None:
    """Ray 2.60's train context names its logger by its file path, not `ray.train.…`, so
    RunConfig's LoggingConfig misses it: a 'Reporting training result N: TrainingReport(…)'
    line per epoch at INFO. Its level is set here, on the worker that logs them."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: nothing to hold
        return
    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build or restore the network, then per epoch train on this
    worker's shard, validate (confusion matrices all-reduced), checkpoint and report."""
    import ray.train
    import ray.train.torch
    import torch

    from ...models.unet import UNet, UNetConfig, load_unet

    _hold_report_lines_to(config["ray_train_log_level"])
    torch.set_num_threads(max(1, int(config["torch_threads"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    storage_options = config.get("storage_options") or None
    categories = parse_categories(config["categories"])
    num_classes = len(categories)

    # Where to start: Ray Train's own checkpoint when it restarts a failed run, else
    # --resume-from, else a fresh network.
    optimizer_state, start_epoch, history = None, 0, []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            network, _ = load_unet(directory)
            state = load_training_state(directory)
            history = load_history(directory)
    elif config.get("resume_from"):
        network, _ = load_unet(config["resume_from"], storage_options=storage_options)
        state = load_training_state(config["resume_from"], storage_options)
        history = load_history(config["resume_from"], storage_options) if state else []
    else:
        torch.manual_seed(config["seed"])
        network = UNet(UNetConfig(categories=categories, width=config["width"], depth=config["depth"]))
        state = None
    if (restored is not None or config.get("resume_from")) and state is not None:
        start_epoch, optimizer_state = state["epoch"], state["optimizer"]

    model = ray.train.torch.prepare_model(network)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    epochs = config["epochs"]
    for epoch in range(start_epoch, epochs):
        started = time.time()
        steps_per_epoch, total_steps = config["steps_per_epoch"], config["steps_per_epoch"] * epochs
        lr = cosine_lr(config["lr"], epoch * steps_per_epoch, total_steps, warmup_steps(total_steps))
        rng = np.random.default_rng([config["seed"], epoch, rank])
        model.train()
        losses, compute_seconds = [], 0.0
        for batch in train_shard.iter_batches(
            batch_size=config["batch_size"], batch_format="numpy", local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=config["seed"] * 1000 + epoch * 10 + rank,
        ):
            step_started = time.time()
            lr = cosine_lr(config["lr"], epoch * steps_per_epoch + len(losses), total_steps, warmup_steps(total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = augment(batch["image"], batch["label"], rng, config["colour_jitter"], config["crop"], config["colour_shuffle"])
            x = normalise(torch.from_numpy(images).to(device))
            y = torch.from_numpy(labels).to(device).long()
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
            loss = segmentation_loss(logits.float(), y, config["dice_weight"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            compute_seconds += time.time() - step_started
        totals = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)

        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        if val_shard is not None:
            model.eval()
            with torch.inference_mode():
                for batch in val_shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy"):
                    # Ray Data's batches are read-only views of its blocks: torch.from_numpy
                    # warns of them (a UserWarning on each worker's stderr). augment() hands
                    # the training loop new arrays.
                    images, labels = (np.require(batch[k], requirements="W") for k in ("image", "label"))
                    x = normalise(torch.from_numpy(images).to(device))
                    predicted = model(x).argmax(dim=1).cpu()
                    confusion += confusion_matrix(predicted, torch.from_numpy(labels), num_classes)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(confusion)
            dist.all_reduce(totals)
        miou, per_class, pixel_accuracy = iou_from_confusion(confusion.numpy())
        metrics = {
            "epoch": epoch + 1,
            "loss": float(totals[0] / max(totals[1], 1)),
            "first_batch_loss": losses[0] if losses else None,
            "last_batch_loss": losses[-1] if losses else None,
            "batches": len(losses),
            "lr": lr,
            "val_mIoU": miou,
            "val_pixel_accuracy": pixel_accuracy,
            "val_IoU": {c.name: v for c, v in zip(categories, per_class)} if val_shard is not None else {},
            "seconds": round(time.time() - started, 2),
            "train_step_seconds": round(compute_seconds, 2),
        }
        history.append(metrics)
        if rank == 0 and config.get("progress") is not None:
            # The driver logs the epoch's line (progress.py); not awaited, so that the
            # line never holds up, or fails, the training.
            config["progress"].add.remote({k: v for k, v in metrics.items() if k != "val_IoU"})

        with tempfile.TemporaryDirectory(prefix="rayseg-ckpt-") as local:
            checkpoint = None
            if rank == 0:
                network_host = _unwrap(model)
                save_checkpoint(network_host, optimizer, epoch + 1, history, local)
                name = f"epoch-{epoch + 1:04d}"
                save_checkpoint(network_host, optimizer, epoch + 1, history, posixpath.join(config["out"], EPOCHS_DIR, name), storage_options)
                save_checkpoint(network_host, optimizer, epoch + 1, history, config["out"], storage_options)
                checkpoint = ray.train.Checkpoint.from_directory(local)
            ray.train.report(
                {k: v for k, v in metrics.items() if k != "val_IoU"},
                checkpoint=checkpoint,
                checkpoint_dir_name=f"epoch-{epoch + 1:04d}",
            )
