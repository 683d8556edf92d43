"""torchvision `.pth` state dicts: read from a path or URI, sha256-checked, never unpickling code.

Shared by the torchvision model families (models/maskrcnn.py, models/torchvision_semantic.py).
"""

from __future__ import annotations

import io
import pickle

import torch
from torch import nn

from .weights import WeightsError, read_checkpoint


def load_state_dict(
    weights: str, *, sha256: str | None = None, storage_options: dict | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict stored at `weights` (path or fsspec URI) and the file's sha256.

    Accepts a bare state dict (what `torch.save(model.state_dict(), f)` and torchvision's
    published files hold) or a training checkpoint `{"model": state_dict, ...}` as
    torchvision's reference scripts write — provided it holds nothing but tensors and plain
    values, because loading is `torch.load(weights_only=True)`: no pickled code runs, ever.
    """
    data, digest = read_checkpoint(weights, sha256, storage_options)
    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise WeightsError(
            f"{weights} is not a torch state dict loadable with weights_only=True "
            f"(save it with torch.save(model.state_dict(), path)): {_first_line(e)}"
        ) from e
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{weights} does not hold a state dict (a mapping of parameter names to tensors)")
    state = dict(loaded)
    # A model saved while wrapped in DistributedDataParallel prefixes every key.
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state, digest


def tensor_shape(state: dict[str, torch.Tensor], key: str, weights: str, architecture: str) -> tuple[int, ...]:
    """The shape of `state[key]`, or a WeightsError saying the file is not an `architecture`."""
    if key not in state:
        raise WeightsError(f"{weights} is not a {architecture} checkpoint: it has no {key!r}")
    return tuple(state[key].shape)


def load_into(network: nn.Module, state: dict[str, torch.Tensor], weights: str, architecture: str) -> None:
    """Strict load; a mismatch is a WeightsError that names the first differing keys."""
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        message = str(e)
        raise WeightsError(
            f"{weights} does not match {architecture}: {message[:600]}{' …' if len(message) > 600 else ''}"
        ) from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
