"""A training run's progress, told on the driver: one line per epoch, and Ray's own lines
held to warnings unless rayseg logs at debug (`rayseg -v`).

The epoch lines are logged here, not printed on the workers: what a worker prints reaches
the driver through Ray's log forwarding, prefixed `(RayTrainWorker pid=…)`, on stdout
(Ray Train's print patch tees it to both streams), and not at all where Ray runs with
`log_to_driver=False`. Rank 0 hands each epoch's metrics to an `EpochLog` actor, which a
driver thread reads, as the segment path's `ErrorTally` is read.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from ..progress import ray_is_verbose

log = logging.getLogger("rayseg")

# How often the driver asks for new epochs: an epoch takes seconds at the least.
POLL_S = 1.0
# How long one ask may take before the line waits for the next (a busy or failing cluster).
ASK_TIMEOUT_S = 10.0


def percent(value: float | None) -> str:
    """A fraction (mIoU, pixel accuracy) as rayseg reports it everywhere: % with one decimal,
    as `rayseg evaluate` and its report (pipeline/evaluation/report.py) do; — when undefined."""
    return "—" if value is None else f"{100 * value:.1f}"


def epoch_line(metrics: dict, epochs: int) -> str:
    """`epoch k/N: loss L, val mIoU M%, S s` of one epoch's metrics (loop.py)."""
    miou = "—" if metrics["val_mIoU"] is None else f"{percent(metrics['val_mIoU'])}%"
    return f"epoch {metrics['epoch']}/{epochs}: loss {metrics['loss']:.4f}, val mIoU {miou}, {metrics['seconds']:.0f} s"


def ray_train_log_level() -> str:
    """Ray Train's console level (`ray.train.LoggingConfig`) on its controller and workers.

    At INFO a 2-epoch run logs 10 lines: the worker group's start (4), its process group and
    device (2), and each epoch's 'Checkpoint successfully created …' and 'Reporting training
    result …' (a logger this level misses: loop.py holds it).
    """
    return "INFO" if ray_is_verbose() else "WARNING"


@contextlib.contextmanager
def quiet_data_context():
    """Ray Data settings for the datasets created inside: a Dataset keeps a copy of the
    DataContext current when it is made (its SplitCoordinator runs with that copy), so they
    must be set before `from_items`, not before `fit`.

    Progress bars off: in Ray's SplitCoordinator actors they are tqdm bars redrawn line by
    line, about 440 of the 479 lines a 2-epoch run of 16 images wrote to stderr. Without -v
    also no 'Starting execution' / 'Execution plan' lines (6 in that run). The coordinators
    still warn, once each, that the bars are off.
    """
    import ray

    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = False
    context.print_on_execution_start = ray_is_verbose()
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


class EpochLog:
    """Ray actor: the metrics of each epoch, in the order rank 0 reports them."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.rows.append(metrics)

    def since(self, seen: int) -> list[dict]:
        return self.rows[seen:]


@contextlib.contextmanager
def epoch_progress(epochs: int):
    """Yields an `EpochLog` handle for the workers; logs `epoch_line` of each epoch as it
    arrives, and the rest once the block ends (before the caller's summary)."""
    import ray

    actor = ray.remote(num_cpus=0)(EpochLog).remote()
    stop = threading.Event()
    seen = 0

    def tell() -> None:
        nonlocal seen
        for metrics in ray.get(actor.since.remote(seen), timeout=ASK_TIMEOUT_S):
            log.info("%s", epoch_line(metrics, epochs))
            seen += 1

    def watch() -> None:
        while not stop.wait(POLL_S):
            try:
                tell()
            except Exception as e:  # a progress line is never worth a failed run
                log.debug("epoch progress: %s", e)
                return

    thread = threading.Thread(target=watch, name="rayseg-epoch-progress", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # as in watch(): the run's own error matters
            tell()
            ray.kill(actor)
