"""Connecting to Ray: an existing cluster (--address / RAY_ADDRESS) or local Ray sized to this machine."""

from __future__ import annotations

import logging
import os
import socket
import time

import ray

from ..pipeline.progress import ray_is_verbose
from .ray_data_console import LOGGING_CONFIG, LOGGING_CONFIG_ENV, NotProgressOff
from .terminal import filter_native_stderr

log = logging.getLogger("rayseg")

# Ray's loggers that a run quiets to their warnings unless -v: its own lines (the local
# instance started, each dataset's plan and "finished" line, its progress blocks) say what
# rayseg's progress says.
RAY_DATA_LOGGER = "ray.data"
# The new local instance's notice that token authentication is on, as it is by default:
# safe and nothing to act on, so shown only with -v.
RAY_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

# Set by Ray in the environment of a job's driver (the job's config, runtime env included).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# How long an address may take to accept a connection before it counts as unreachable.
REACH_TIMEOUT_S = 10.0


class ClusterError(ValueError):
    """A Ray address that cannot be reached."""


# What to check when an address does not answer: ray.init's, and the Jobs API's (submit).
GCS_HINT = "Is the head node up, and is that its GCS port (6379 by default; ray:// addresses use the client port, 10001)?"
JOBS_API_HINT = "Is the head node up, and is that its dashboard port (8265 by default)?"


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S, hint: str = GCS_HINT) -> None:
    """Fails fast (ClusterError) when `address` names a host and port that refuse or do not
    answer a connection: ray.init (or the Jobs API's client) would retry for minutes without
    a word. Addresses that name no port ("auto") are left to ray.init."""
    host, separator, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not separator or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach Ray at {address}: {e}. {hint}") from None


def connect(address: str | None = None, *, state_api: bool = False) -> float:
    """Initialises Ray once per process; returns the seconds ray.init took.

    With no address (and no RAY_ADDRESS), starts a local Ray with this machine's CPUs and
    without the dashboard, which local runs don't need and which costs start-up time; its
    workers inherit this process's environment. `state_api`: with the dashboard after all,
    which serves Ray's State API: Ray Train's placement-group cleaner asks it every second
    whether the run's controller lives, and without it logs "Failed to query Ray Train
    Controller actor state" each time, all run long (11 lines in a 20 s run), and never
    cleans up. It costs ray.init 0.6 s.
    """
    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    verbose = ray_is_verbose()
    if not verbose:
        quiet_ray()
    options = {"log_to_driver": True, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address and os.environ.get(JOB_CONFIG_ENV):
        # Running as a Ray job (`rayseg submit`): the job's runtime environment already
        # carries the storage settings to every worker.
        ray.init(address=address, **options)
    elif address:
        check_reachable(address)
        # Workers on other machines do not share our environment: storage endpoints and
        # credentials travel with the job, in its runtime environment (never logged).
        ray.init(address=address, runtime_env={"env_vars": storage_env()}, **options)
    else:
        if not verbose:
            # The processes of this Ray inherit it (Ray Train's dataset coordinators log
            # their plans and bars' warnings there); a user's own config is kept.
            os.environ.setdefault(LOGGING_CONFIG_ENV, str(LOGGING_CONFIG))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=state_api, **options)
    seconds = time.perf_counter() - started
    resources = ray.cluster_resources()
    log.info(
        "ray ready in %.1f s: %s, %g CPUs, %g GPUs",
        seconds, f"{node_count()} nodes at {address}" if address else "local", resources.get("CPU", 0), resources.get("GPU", 0),
    )  # fmt: skip
    log.debug("cluster resources: %s", resources)
    return seconds


def quiet_ray() -> None:
    """Ray's own console at its warnings, its progress bars off (rayseg shows its own), and
    the lines its C++ core prints that say nothing of the run filtered out (jobs/terminal.py).
    Ray's log files keep everything."""
    import ray.data

    filter_native_stderr()
    logging.getLogger(RAY_AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # As LOGGING_CONFIG sets it in Ray's processes: this process configured Ray Data's
    # logging when it imported ray.data.
    for handler in logging.getLogger(RAY_DATA_LOGGER).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(NotProgressOff())


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
