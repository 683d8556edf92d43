"""A run's progress while it runs: images done of N, rate, errors so far, ETA, and each
stage's rows and queue, logged every few seconds and kept for `_run.json`.

Ray Data's executor runs in the driver and keeps each operator's counters
(`op.metrics`, the queues of `OpState`); an `ExecutionCallback` on the run's dataset reads
them between scheduling steps, so the rows are counted without touching a row. Errors are
a column of the rows, which the driver never sees: the inference actors tell an
`ErrorTally` actor of each table that has error rows (none for a clean run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from .schema import STATUS_ERROR

log = logging.getLogger("rayseg.progress")

# A line every few seconds: often enough to watch, a few hundred lines for an hour's run.
INTERVAL_S = 5.0
# Samples kept for `_run.json`: past this, every other one is dropped and the spacing
# doubles, so a week-long run's record stays a few kB.
MAX_SAMPLES = 720
# The sink's operator, whose input rows are the rows done.
WRITE_OPERATOR = "Write"
# How often the watchers (a terminal's progress bar) hear of a run: a bar that moves.
WATCH_INTERVAL_S = 0.5


def ray_is_verbose() -> bool:
    """Whether Ray's own INFO lines (its plans, bars, notices) are wanted: when rayseg logs
    at debug (`rayseg -v`). Otherwise rayseg's progress says what they say."""
    return logging.getLogger("rayseg").isEnabledFor(logging.DEBUG)


@dataclass(frozen=True)
class Snapshot:
    """What a watcher is told of a run: rows done of `expected` (None when unknown), errors
    so far (None when nothing counts them), and whether the run has ended (`final`) or
    failed."""

    run: int  # the same number for every snapshot of one run
    done: int
    expected: int | None
    errors: int | None
    final: bool = False
    failed: bool = False


# Who else hears of every run in this process, besides the log: the CLI's progress bar in a
# terminal. A watcher's failure is logged at debug and never stops the run.
WATCHERS: list[Callable[[Snapshot], None]] = []


class ErrorTally:
    """Ray actor: error rows so far, as the inference actors report them."""

    def __init__(self) -> None:
        self.errors = 0

    def add(self, errors: int) -> None:
        self.errors += errors

    def count(self) -> int:
        return self.errors


def start_error_tally():
    """A fresh ErrorTally actor (no CPU: it only adds)."""
    return ray.remote(num_cpus=0)(ErrorTally).remote()


def report_errors(table: pa.Table, tally) -> None:
    """Tells `tally` (an ErrorTally handle, or None) of `table`'s error rows, if it has any."""
    if tally is None:
        return
    errors = pc.sum(pc.equal(table["status"], STATUS_ERROR)).as_py() or 0
    if errors:
        tally.add.remote(errors)


@dataclass
class Stage:
    """One operator's counters at an instant."""

    name: str
    rows: int  # out of the stage; into it for the sink, whose outputs are write statistics
    queued_blocks: int
    spilled_bytes: int


@dataclass
class RunProgress:
    """What the driver logs and records of a run while Ray executes it.

    expected: the rows this attempt makes, when known (a listing, a Parquet manifest's
    footer), else None; tally: the ErrorTally handle the actors report to, or None.
    samples: [seconds since start, rows done, errors] at each log line, thinned past
    MAX_SAMPLES.
    """

    expected: int | None = None
    tally: object | None = None
    interval_s: float = INTERVAL_S
    started: float = field(default_factory=time.monotonic)
    samples: list[list] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    errors: int | None = None
    _sample_every: int = 1
    _steps: int = 0
    _kept: list[int] = field(default_factory=list)  # the step of each sample
    _next: float = 0.0
    _next_watch: float = 0.0
    _pending: object | None = None
    _last: tuple[float, int] = (0.0, 0)

    def watch(self, dataset) -> None:
        """Makes the executor of `dataset` (the rows the sink writes) report to this, until
        `unwatch`."""
        _WATCHED[id(self)] = self
        # A class per run (Ray instantiates the classes it is given), naming the run by key
        # only: Ray ships the context to its workers, and this run's state stays here.
        callback = type("RunProgressCallback", (ProgressCallback,), {"key": id(self)})
        context = dataset.context
        # A new list: the one there may be shared with other datasets' contexts.
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, callback]

    def unwatch(self) -> None:
        _WATCHED.pop(id(self), None)

    def step(self, executor, final: bool = False, failed: bool = False) -> None:
        """Between two scheduling steps: every `interval_s`, and at the end, reads the
        counters and logs a line; every WATCH_INTERVAL_S tells the WATCHERS."""
        now = time.monotonic()
        line_due = final or now >= self._next
        watch_due = bool(WATCHERS) and (final or now >= self._next_watch)
        if not (line_due or watch_due):
            return
        topology = getattr(executor, "_topology", None) or {}
        self.stages = [_stage(op, state) for op, state in topology.items() if op.input_dependencies]  # not the input buffer
        done = sum(stage.rows for stage in self.stages if stage.name == WRITE_OPERATOR)
        self._read_errors(final)
        if watch_due:
            self._next_watch = now + WATCH_INTERVAL_S
            snapshot = Snapshot(id(self), done, self.expected, self.errors, final=final, failed=failed)
            for watcher in WATCHERS:
                watcher(snapshot)
        if line_due:
            self._next = now + self.interval_s
            seconds = now - self.started
            self._record([round(seconds, 1), done, self.errors], final)
            log.info("%s", self.line(seconds, done, now))
            self._last = (now, done)

    def _read_errors(self, final: bool) -> None:
        """The tally's count, without blocking the executor: the answer to the previous
        step's question (at the end, waited for)."""
        if self.tally is None:
            return
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=5.0 if final else 0)
            if ready:
                self.errors = ray.get(ready[0])
                self._pending = None
        if self._pending is None:
            self._pending = self.tally.count.remote()
        if final:
            self.errors = ray.get(self._pending, timeout=5.0)

    def _record(self, sample: list, final: bool = False) -> None:
        """Keeps the sample of every `_sample_every`-th step, and the last one."""
        step, self._steps = self._steps, self._steps + 1
        if step % self._sample_every and not final:
            return
        self.samples.append(sample)
        self._kept.append(step)
        if len(self.samples) > MAX_SAMPLES:
            self._sample_every *= 2
            kept = [(i, s) for i, s in zip(self._kept, self.samples) if i % self._sample_every == 0]
            self._kept, self.samples = [i for i, _ in kept], [s for _, s in kept]

    def line(self, seconds: float, done: int, now: float) -> str:
        """'1,234 of 10,000 images (12.3%) · 812/s · 0 errors · ETA 11s · stages: Read 1,536
        (2 queued), SegmentImagesAndEncode 1,234, Write 1,234': each stage's rows out (the
        sink's in) and blocks waiting for it."""
        then, before = self._last
        rate = (done - before) / (now - then) if then and now > then else (done / seconds if seconds else 0.0)
        parts = [f"{done:,} of {self.expected:,} images ({100 * done / max(self.expected, 1):.1f}%)" if self.expected else f"{done:,} images"]
        parts.append(f"{rate:,.0f}/s")
        if self.errors is not None:
            parts.append(f"{self.errors:,} errors")
        if self.expected and rate > 0 and done < self.expected:
            parts.append(f"ETA {_duration((self.expected - done) / rate)}")
        stages = ", ".join(
            f"{stage.name} {stage.rows:,}" + (f" ({stage.queued_blocks} queued)" if stage.queued_blocks else "")
            for stage in self.stages
        )
        return " · ".join(parts) + (f" · stages: {stages}" if stages else "")

    def record(self) -> dict:
        """For `_run.json`: the samples, and each stage's rows and spilled bytes."""
        return {
            "interval_s": self.interval_s * self._sample_every,
            "samples": self.samples,
            "stages": [
                {"name": stage.name, "rows": stage.rows, "spilled_bytes": stage.spilled_bytes} for stage in self.stages
            ],
            "spilled_bytes": sum(stage.spilled_bytes for stage in self.stages),
        }


def _stage(op, state) -> Stage:
    """An operator's counters from Ray Data's executor (its `op.metrics`, its OpState's queue)."""
    name = short_name(op.name)
    rows = op.metrics.num_row_inputs_received if name == WRITE_OPERATOR else op.metrics.rows_task_outputs_generated
    return Stage(name, rows, state.total_enqueued_input_blocks(), op.metrics.obj_store_mem_spilled)


# The runs being watched in this process, by key (`RunProgress.watch`).
_WATCHED: dict[int, RunProgress] = {}


class ProgressCallback(ExecutionCallback):
    """Ray Data's hook into its executor's loop, for the RunProgress of `key`."""

    key: int = 0

    def on_execution_step(self, executor) -> None:
        self._step(executor, final=False)

    def after_execution_succeeds(self, executor) -> None:
        self._step(executor, final=True)

    def after_execution_fails(self, executor, error: Exception) -> None:
        self._step(executor, final=True, failed=True)

    def _step(self, executor, final: bool, failed: bool = False) -> None:
        if (progress := _WATCHED.get(self.key)) is None:
            return
        try:
            progress.step(executor, final=final, failed=failed)
        except Exception:  # noqa: BLE001 - a progress line is never worth a run: the counts come from the files
            log.debug("progress step failed", exc_info=True)


def short_name(operator: str) -> str:
    """An operator's name as a line shows it: the first of its fused steps, without Ray's
    wrapping ('ReadFilesParquetV2->MapBatches(normalise_manifest)->…' → 'ReadFilesParquetV2',
    'MapBatches(SegmentImagesAndEncode)' → 'SegmentImagesAndEncode')."""
    first = operator.split("->")[0]
    if first.startswith("MapBatches(") and first.endswith(")"):
        first = first[len("MapBatches(") : -1]
    return first.split("[")[0]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
