"""Which file identifies a checkpoint, per format: its sha256 pins the weights.

Path logic only, importable without torch, so the driver pins a run's weights
(`pipeline.segment.pin_weights`) without importing any model code.
"""

from __future__ import annotations

import logging
import posixpath

import fsspec

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
# segment-anything's own checkpoints (torch.save files).
CHECKPOINT_SUFFIXES = (".pth", ".pt")


def unet_weights_file(weights: str) -> str:
    """The .safetensors file of a rayseg U-Net checkpoint given as its directory or as the file itself."""
    base = weights.rstrip("/")
    return base if base.endswith(".safetensors") else posixpath.join(base, SAFETENSORS_FILE)


def pth_weights_file(weights: str) -> str:
    """A torchvision checkpoint is one `.pth` file: it is its own weights file."""
    return weights


def sam_weights_file(weights: str) -> str:
    """The file whose sha256 identifies a SAM checkpoint: the `.pth` itself, or an HF
    directory's model.safetensors (a path to that file is accepted as the directory's)."""
    base = weights.rstrip("/")
    if base.endswith(CHECKPOINT_SUFFIXES) or base.endswith(".safetensors"):
        return base
    return posixpath.join(base, SAFETENSORS_FILE)


def hf_weights_file(weights: str, storage_options: dict | None = None) -> str:
    """The file whose sha256 identifies an HF checkpoint directory: its model.safetensors,
    or its pytorch_model.bin when it has no safetensors."""
    base = weights.rstrip("/")
    if base.endswith((".safetensors", ".bin")):
        return base
    safetensors = posixpath.join(base, SAFETENSORS_FILE)
    try:
        fs, path = fsspec.core.url_to_fs(safetensors, **(storage_options or {}))
        if not fs.exists(path) and fs.exists(path[: -len(SAFETENSORS_FILE)] + BIN_FILE):
            return posixpath.join(base, BIN_FILE)
    except Exception:  # unreachable store: the caller reports the missing file
        log.debug("cannot list %s", base, exc_info=True)
    return safetensors
