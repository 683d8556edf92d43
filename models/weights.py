"""Reading checkpoints from a local path or any fsspec URI, safely.

Nothing here executes pickled code and nothing is fetched from a model hub: weights are
safetensors or `torch.load(weights_only=True)` state dicts, read from where the user says.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import fsspec

RANDOM = "random"

log = logging.getLogger("rayseg.models")


class WeightsError(ValueError):
    """A checkpoint that cannot be used: missing, wrong format, wrong hash, wrong shape."""


# Checkpoints are hashed in 4 MiB reads: whole multi-GB files never sit in memory twice.
CHUNK_BYTES = 1 << 22


def stream_sha256(f: IO[bytes]) -> tuple[str, bytes, int]:
    """(sha256 hex digest, first chunk, size in bytes) of what is left to read in `f`."""
    digest, head, size = hashlib.sha256(), b"", 0
    while chunk := f.read(CHUNK_BYTES):
        digest.update(chunk)
        head, size = head or chunk, size + len(chunk)
    return digest.hexdigest(), head, size


def check_sha256(actual: str, expected: str | None, uri: str) -> str:
    """`actual`, the digest of the weights at `uri`; WeightsError when it differs from
    `expected` (a user's --weights-sha256, or the digest the driver pinned)."""
    if expected is not None and actual != expected.strip().lower():
        raise WeightsError(f"sha256 mismatch for {uri}: expected {expected}, got {actual}")
    return actual


def file_sha256(path: str, expected: str | None = None, uri: str | None = None) -> str:
    """The sha256 of the local file `path`, checked against `expected` (named `uri` in errors)."""
    with open(path, "rb") as f:
        return check_sha256(stream_sha256(f)[0], expected, uri or path)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole file at `uri` (local path or fsspec URI); WeightsError when it is missing."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise WeightsError(f"weights not found: {uri}") from e


def read_checkpoint(uri: str, sha256: str | None = None, storage_options: dict | None = None) -> tuple[bytes, str]:
    """(the whole file at `uri`, its sha256), the digest checked against `sha256`;
    WeightsError when the file is missing or differs."""
    data = read_bytes(uri, storage_options)
    return data, check_sha256(stream_sha256(io.BytesIO(data))[0], sha256, uri)


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


Network = TypeVar("Network")


def random_network(model_name: str, make: Callable[[], Network]) -> Network:
    """`make()` under RANDOM_SEED, said loudly: random initialisation is legitimate (tests,
    benchmarks) but must never go unnoticed."""
    log.warning(
        "RANDOM WEIGHTS: model %r is randomly initialised (--weights random); "
        "its predictions are meaningless",
        model_name,
    )
    with seeded_random_init():
        return make()
