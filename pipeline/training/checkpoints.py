"""Checkpoints of a training run, in our format, under WEIGHTS (a path or fsspec URI).

WEIGHTS receives after every epoch::

    WEIGHTS/config.json, model.safetensors   the latest epoch (what `--weights` takes)
    WEIGHTS/training_state.pt                epoch + optimizer state (tensors/ints only;
                                             read back with torch.load(weights_only=True))
    WEIGHTS/metrics.json                     the run's per-epoch history (loss, val mIoU)
    WEIGHTS/epochs/epoch-NNNN/               the same four files for every epoch
    WEIGHTS/_ray_train/RUN_ID/               Ray Train's own run state (latest checkpoint,
                                             used to restart failed workers)
"""

from __future__ import annotations

import io
import json

from ...models.weights import WeightsError
from ..storage import filesystem

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.json"
EPOCHS_DIR = "epochs"
RAY_TRAIN_DIR = "_ray_train"


def save_checkpoint(network, optimizer, epoch: int, history: list[dict], directory: str, storage_options: dict | None = None) -> str:
    """Our format under `directory` (path or URI): config.json + model.safetensors (save_unet),
    training_state.pt (completed epochs + optimizer state: tensors, numbers, strings only) and
    metrics.json. Returns the weights' sha256."""
    import torch

    from ...models.unet import save_unet

    digest = save_unet(network, directory, storage_options)
    buffer = io.BytesIO()
    torch.save({"epoch": int(epoch), "optimizer": optimizer.state_dict()}, buffer)
    fs, root = filesystem(directory, storage_options)
    with fs.open(f"{root}/{STATE_FILE}", "wb") as f:
        f.write(buffer.getvalue())
    with fs.open(f"{root}/{METRICS_FILE}", "w") as f:
        f.write(json.dumps({"epoch": epoch, "history": history}, indent=2))
    return digest


def load_training_state(directory: str, storage_options: dict | None = None) -> dict | None:
    """training_state.pt of a checkpoint ({"epoch", "optimizer"}), or None when it has none.

    Loaded with weights_only=True: tensors and plain values only, never pickled code.
    """
    import torch

    fs, root = filesystem(directory.rstrip("/"), storage_options)
    path = f"{root}/{STATE_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise WeightsError(f"{path} is not a rayseg training state")
    return state


def load_history(directory: str, storage_options: dict | None = None) -> list[dict]:
    """metrics.json's per-epoch history of a checkpoint; [] when it has none."""
    fs, root = filesystem(directory.rstrip("/"), storage_options)
    path = f"{root}/{METRICS_FILE}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return list(json.load(f).get("history", []))


def read_checkpoint_epoch(directory: str, storage_options: dict | None = None) -> int:
    """Completed epochs recorded in a checkpoint (0 without training_state.pt)."""
    state = load_training_state(directory, storage_options)
    return 0 if state is None else state["epoch"]
