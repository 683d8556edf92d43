"""Connecting to Ray: an existing cluster (--address / RAY_ADDRESS) or local Ray sized to this machine."""

from __future__ import annotations

import logging
import os
import socket
import time

import ray

log = logging.getLogger("rayseg")

# Set by Ray in the environment of a job's driver (the job's config, runtime env included).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# How long an address may take to accept a connection before it counts as unreachable.
REACH_TIMEOUT_S = 10.0


class ClusterError(ValueError):
    """A Ray address that cannot be reached."""


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fails fast (ClusterError) when `address` names a host and port that refuse or do not
    answer a connection: ray.init would retry for minutes without a word. Addresses that
    name no port ("auto") are left to ray.init."""
    host, separator, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not separator or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach Ray at {address}: {e}. Is the head node up, and is that its GCS port "
            "(6379 by default; ray:// addresses use the client port, 10001)?"
        ) from None


def connect(address: str | None = None) -> float:
    """Initialises Ray once per process; returns the seconds ray.init took.

    With no address (and no RAY_ADDRESS), starts a local Ray with this machine's CPUs and
    without the dashboard, which local runs don't need and which costs start-up time; its
    workers inherit this process's environment.
    """
    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and os.environ.get(JOB_CONFIG_ENV):
        # Running as a Ray job (`rayseg submit`): the job's runtime environment already
        # carries the storage settings to every worker.
        ray.init(address=address, log_to_driver=True)
    elif address:
        check_reachable(address)
        # Workers on other machines do not share our environment: storage endpoints and
        # credentials travel with the job, in its runtime environment (never logged).
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": storage_env()})
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    seconds = time.perf_counter() - started
    log.info("ray ready in %.1f s: %s", seconds, ray.cluster_resources())
    return seconds


# Environment variables the storage libraries read (s3fs/botocore, pyarrow, gcsfs, adlfs).
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_")


def storage_env(environ: dict | None = None) -> dict[str, str]:
    """The storage configuration in this process's environment, for the job's workers."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith(STORAGE_ENV_PREFIXES)}


def node_count() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def node_shapes() -> list[dict[str, float]]:
    """Each alive node's resources."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]
