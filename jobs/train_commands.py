"""`rayseg train unet DATA --out WEIGHTS`: the command line of pipeline/training."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..models.weights import WeightsError
from ..pipeline.resources import ResourceError
from ..pipeline.storage import parse_storage_options
from ..pipeline.training import (
    DEFAULT_DEPTH,
    DEFAULT_WIDTH,
    TrainingError,
    parse_size,
    train_unet,
)
from ..pipeline.training.progress import percent
from . import cluster
from .terminal import fail, results

log = logging.getLogger("rayseg")


def unet(
    data: Annotated[str, typer.Argument(help="Dataset root: images/ + annotations/semantic/*.png or annotations/instances.json (path or URI).")],
    out: Annotated[str, typer.Option(help="Checkpoint directory or URI: the latest epoch, epochs/epoch-NNNN/, metrics.json.")],
    epochs: Annotated[int, typer.Option(help="Total epochs (a resumed run continues up to this).")] = 10,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers [one per GPU; 1 on CPUs].")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="GPUs per worker, fractions allowed [1 if the cluster has GPUs, else 0].")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs per worker, fractions allowed [what two decode tasks leave].")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step and worker.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay to 5%).")] = 2e-3,
    resume_from: Annotated[Optional[str], typer.Option(help="Checkpoint to continue (with training_state.pt) or fine-tune (weights only).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of images held out for per-epoch validation mIoU.")] = 0.1,
    size: Annotated[Optional[str], typer.Option(help="Train at HxW (images resized) [the first image's size].")] = None,
    crop: Annotated[Optional[str], typer.Option(help="Train on random HxW windows of the (resized) images; validate on whole ones.")] = None,
    width: Annotated[Optional[int], typer.Option(help=f"U-Net width: channels of the first level [{DEFAULT_WIDTH}].")] = None,
    depth: Annotated[Optional[int], typer.Option(help=f"U-Net depth: number of poolings [{DEFAULT_DEPTH}].")] = None,
    dice_weight: Annotated[float, typer.Option(help="Weight of the dice loss added to cross-entropy (0: none).")] = 1.0,
    colour_shuffle: Annotated[bool, typer.Option(help="Also permute RGB channels and invert images at random (data whose colours carry no class, e.g. the shapes fixtures).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation, split, shuffling and augmentation.")] = 0,
    categories: Annotated[Optional[str], typer.Option(help="Classes of label PNGs: a COCO json or a list of {id, name, isthing}.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address [RAY_ADDRESS, else local Ray].")] = None,
    storage_option: Annotated[list[str], typer.Option(help="fsspec storage option KEY=VALUE, JSON values typed (repeatable).")] = [],
) -> None:
    """Train (or resume, or fine-tune) the U-Net on DATA with Ray Train; write checkpoints to --out."""
    try:
        options = parse_storage_options(storage_option)
        shape = parse_size(size)
        window = parse_size(crop, "--crop")
    except ValueError as e:
        raise fail(str(e)) from None
    cluster.connect(address, state_api=True)
    try:
        summary = train_unet(
            data, out, epochs=epochs, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
            batch_size=batch_size, lr=lr, resume_from=resume_from, val_fraction=val_fraction, size=shape, crop=window, width=width,
            depth=depth, dice_weight=dice_weight, colour_shuffle=colour_shuffle, seed=seed, categories_file=categories, storage_options=options,
        )  # fmt: skip
    except (TrainingError, WeightsError, ResourceError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    except Exception as e:
        log.exception("training failed")
        raise fail(f"training failed: {type(e).__name__}: {e}", code=1) from None
    # Results on stdout (the epoch lines and Ray's are diagnostics, on stderr).
    table = Table("epoch", "loss", "val mIoU %", "pixel acc %", "lr", "seconds", title=f"train {summary.run_id}")
    for row in summary.history:
        table.add_row(
            str(row["epoch"]), f"{row['loss']:.4f}", percent(row["val_mIoU"]), percent(row["val_pixel_accuracy"]),
            f"{row['lr']:.2e}", f"{row['seconds']:.0f}",
        )  # fmt: skip
    results.print(table)
    results.print(f"weights: {summary.out} (epochs {summary.start_epoch}→{summary.epochs}, {summary.seconds:.0f} s)")


def register(app: typer.Typer) -> None:
    """Adds `train unet` to the CLI app: `rayseg train unet DATA --out WEIGHTS ...`."""
    train_app = typer.Typer(help="Train models on Ray Train.", no_args_is_help=True)
    train_app.command("unet")(unet)
    app.add_typer(train_app, name="train")

