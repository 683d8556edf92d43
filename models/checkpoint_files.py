"""Which file identifies a checkpoint, per format: its sha256 pins the weights.

Every finder takes (weights, storage_options): a directory's layout may only be known by
listing it on its object store.

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


def unet_weights_file(weights: str, storage_options: dict | None = None) -> str:
    """The .safetensors file of a rayseg U-Net checkpoint given as its directory or as the file itself."""
    base = weights.rstrip("/")
    return base if base.endswith(".safetensors") else posixpath.join(base, SAFETENSORS_FILE)


def pth_weights_file(weights: str, storage_options: dict | None = None) -> str:
    """A torchvision checkpoint is one `.pth` file: it is its own weights file."""
    return weights


def is_segment_anything_file(weights: str) -> bool:
    """Whether `weights` names a segment-anything checkpoint file (rather than an HF directory)."""
    return weights.rstrip("/").endswith(CHECKPOINT_SUFFIXES)


def sam_weights_file(weights: str, storage_options: dict | None = None) -> str:
    """The file whose sha256 identifies a SAM checkpoint: the `.pth` itself, or an HF
    directory's weights file (`hf_weights_file`)."""
    if is_segment_anything_file(weights):
        return weights.rstrip("/")
    return hf_weights_file(weights, storage_options)


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
