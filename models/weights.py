"""Reading checkpoints from a local path or any fsspec URI, safely.

Nothing here executes pickled code and nothing is fetched from a model hub: weights are
safetensors or `torch.load(weights_only=True)` state dicts, read from where the user says.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator

import fsspec

RANDOM = "random"

log = logging.getLogger("rayseg.models")


class WeightsError(ValueError):
    """A checkpoint that cannot be used: missing, wrong format, wrong hash, wrong shape."""


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole file at `uri` (local path or fsspec URI)."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as e:
        raise WeightsError(f"weights not found: {uri}") from e


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str | None, uri: str) -> str:
    """Returns the sha256 of `data`; raises WeightsError when it differs from `expected`."""
    actual = sha256_hex(data)
    if expected is not None and actual != expected.strip().lower():
        raise WeightsError(f"sha256 mismatch for {uri}: expected {expected}, got {actual}")
    return actual


# The seed of every `--weights random` network: each actor, and each restarted one, builds
# the same network, so a run's rows do not depend on which actor took an image.
RANDOM_SEED = 0


@contextlib.contextmanager
def seeded_random_init() -> Iterator[None]:
    """Runs a random initialisation under RANDOM_SEED, leaving the process's own random
    state as it was."""
    import torch  # here: the driver imports this module without torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def warn_random(model_name: str) -> None:
    """Random initialisation is legitimate (tests, benchmarks) but must never go unnoticed."""
    log.warning(
        "RANDOM WEIGHTS: model %r is randomly initialised (--weights random); "
        "its predictions are meaningless",
        model_name,
    )
