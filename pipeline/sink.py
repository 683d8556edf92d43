"""Sink: output rows → Parquet under OUTPUT, committed, then `_run.json` last.

Ray writes the run's files into OUTPUT/_staging/RUN_ID/ — invisible to pyarrow, pandas and
DuckDB readers of OUTPUT, which skip `_`-prefixed paths — and only when every file is
written are they moved up as OUTPUT/part-NNNNN.parquet and `_run.json` written. A run
that dies leaves no part files and no `_run.json`: readers trust OUTPUT only when
`_run.json` exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from .file_size import FILE_MIB
from .progress import RunProgress
from .repeated_ids import RepeatedIds, find_repeated_ids, id_hashes
from .schema import OUTPUT_SCHEMA, STATUS_OK
from .storage import arrow_filesystem, filesystem, full_uri, move, remove

log = logging.getLogger("rayseg.pipeline")

RUN_FILE = "_run.json"
STAGING_DIR = "_staging"
# What a run was started with (pipeline/sink.check_attempt), beside its staged files.
ATTEMPT_FILE = "_attempt.json"


class OutputError(ValueError):
    """An OUTPUT that cannot take this run, or that holds no committed run to read
    (pipeline/run_reader.py)."""


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable, and unique across concurrent runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class RunSummary:
    """What a committed run holds; also the `counts` and `timings` of `_run.json`."""

    run_id: str
    output: str
    images: int
    ok: int
    error: int
    segments: int
    files: int
    seconds: float
    # The reason of one error row, to show beside the count (None without errors).
    example_error: str | None = None
    # Image ids under more than one row (a streamed manifest's repeats; see repeated_ids.py).
    repeated_ids: RepeatedIds = RepeatedIds()
    # Rows an earlier attempt of the run staged, committed with this attempt's (resume).
    resumed: int = 0

    @property
    def images_per_second(self) -> float:
        """This attempt's rate: the rows it made over its seconds."""
        return (self.images - self.resumed) / self.seconds if self.seconds > 0 else 0.0


def check_output(output: str, storage_options: dict | None = None) -> None:
    """Refuses (OutputError) an OUTPUT that already holds results; unfinished runs' staging
    is fine."""
    fs, root = filesystem(output, storage_options)
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise OutputError(f"output exists and is not a directory: {output}")
    leftovers = [p for p in fs.ls(root, detail=False) if posixpath.basename(p.rstrip("/")) != STAGING_DIR]
    if leftovers:
        raise OutputError(f"output is not empty: {output} holds {posixpath.basename(leftovers[0])}; choose a new OUTPUT")


def check_attempt(output: str, run_id: str, attempt: dict, storage_options: dict | None = None) -> None:
    """On resume: refuses (OutputError) to finish run `run_id` with another input or model
    than its staged rows came from, naming what differs; `attempt` is what write_run
    recorded beside them (JSON values). Logs when nothing is staged to resume."""
    fs, root = filesystem(output, storage_options)
    staging = posixpath.join(root, STAGING_DIR, run_id)
    if not fs.exists(staging):
        log.warning("run %s has nothing staged in %s: running it from the start", run_id, output)
        return
    staged = read_attempt(output, run_id, storage_options)
    if staged is None:
        return  # the attempt died before it recorded itself: nothing of it is staged to mismatch
    attempt = json.loads(json.dumps(attempt))  # as it reads back: tuples become lists
    differ = [key for key in sorted(set(staged) | set(attempt)) if staged.get(key) != attempt.get(key)]
    if differ:
        raise OutputError(
            f"run {run_id} in {output} was started with another "
            + ", ".join(f"{key} ({staged.get(key)!r}, now {attempt.get(key)!r})" for key in differ)
            + "; resume it as it began, or start a new run"
        )


def write_run(
    dataset: ray.data.Dataset,
    output: str,
    *,
    run_id: str,
    run_info: dict,
    storage_options: dict | None = None,
    started: float | None = None,
    write_cpus: float = 1.0,
    file_mib: float = FILE_MIB,
    rows_per_file: int | None = None,
    resume: bool = False,
    attempt: dict | None = None,
    expected_rows: int | None = None,
    error_tally=None,
) -> RunSummary:
    """Executes `dataset` (output rows), commits its Parquet files, writes `_run.json`.

    run_info: what the run was (model, weights, spec); stored in `_run.json` as given.
    started: time.time() when the run began, for the timings (default: now).
    write_cpus: CPUs per write task.
    file_mib: each output file holds at least this many MiB of rows as they are in memory
    (the last file less); rows_per_file, when given, sizes files by rows instead.
    resume: keep what an earlier attempt of `run_id` staged (its rows must be absent from
    `dataset`: see `staged_image_ids`) and commit it together with the new rows.
    attempt: what makes the rows what they are (input, model, weights' sha256, options),
    recorded beside the staged files for `check_attempt` on a later resume.
    expected_rows: the run's rows, when known, for the progress lines (`pipeline/progress.py`);
    error_tally: the ErrorTally the inference actors report error rows to (`segment`'s).
    """
    started = time.time() if started is None else started
    fs, root = filesystem(output, storage_options)
    check_output(output, storage_options)
    staging = posixpath.join(root, STAGING_DIR, run_id)
    if fs.exists(staging) and not resume:
        remove(fs, staging)
    resumed = _rows(fs, staged_files(output, run_id, storage_options)) if resume else 0
    if attempt is not None and not fs.exists(posixpath.join(staging, ATTEMPT_FILE)):
        fs.makedirs(staging, exist_ok=True)
        with fs.open(posixpath.join(staging, ATTEMPT_FILE), "w") as f:
            json.dump(attempt, f, indent=2)
    # Ray starts a task's worker process only when the task is due, and the write tasks come
    # last: a run shorter than one file would wait ~1.5 s after its last rows for a process
    # to start and import Ray Data. This starts one now, beside the actors, for them.
    _start_writer.options(num_cpus=write_cpus).remote()
    progress = RunProgress(None if expected_rows is None else expected_rows - resumed, error_tally)
    progress.watch(dataset)
    try:
        dataset.write_parquet(
            staging,
            filesystem=arrow_filesystem(fs),
            schema=OUTPUT_SCHEMA,
            **({"min_rows_per_file": rows_per_file} if rows_per_file else {"min_bytes_per_file": max(1, int(file_mib * 2**20))}),
            ray_remote_args={"num_cpus": write_cpus},
        )
    finally:
        progress.unwatch()
    # Ray's workers wrote these files; listings this process cached before are stale.
    fs.invalidate_cache(root)
    staged = sorted(p for p in fs.find(staging) if p.endswith(".parquet"))
    if not staged:
        # An empty input still commits one file: readers see the schema and no rows, not nothing.
        staged = [posixpath.join(staging, "empty.parquet")]
        fs.makedirs(staging, exist_ok=True)
        with fs.open(staged[0], "wb") as f:
            pq.write_table(OUTPUT_SCHEMA.empty_table(), f)
    # Another run into the same OUTPUT may have committed while this one ran: its files stay
    # whole, and this run's rows stay staged.
    fs.invalidate_cache(root)
    try:
        check_output(output, storage_options)
    except OutputError as e:
        raise OutputError(f"{e}: another run committed there while this one ran; its rows stay staged in {full_uri(fs, staging)}") from None
    committed = [posixpath.join(root, f"part-{index:05d}.parquet") for index, _ in enumerate(staged)]
    for source, target in zip(staged, committed):
        move(fs, source, target)
    # Only this run's staging goes: another run's, beside it, is that run's to resume.
    # (Object stores have no directories: once its files moved, the prefix is gone.)
    if fs.exists(staging):
        remove(fs, staging)
    staging_root = posixpath.join(root, STAGING_DIR)
    if fs.exists(staging_root) and not fs.ls(staging_root, detail=False):
        fs.rmdir(staging_root)
    summary = dataclasses.replace(_count(fs, committed, run_id, full_uri(fs, root), time.time() - started), resumed=resumed)
    record = {
        "run_id": run_id,
        "status": "complete",
        **run_info,
        "counts": {
            **{k: getattr(summary, k) for k in ("images", "ok", "error", "segments", "files")},
            "repeated_image_ids": summary.repeated_ids.ids,
            "resumed": summary.resumed,
        },
        "timings": {
            "started": _iso(started),
            "finished": _iso(started + summary.seconds),
            "seconds": round(summary.seconds, 3),
            "images_per_second": round(summary.images_per_second, 3),
        },
        "files": [posixpath.basename(p) for p in committed],
        "progress": progress.record(),
    }
    with fs.open(posixpath.join(root, RUN_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return summary


@ray.remote
def _start_writer() -> None:
    """Imports what a Parquet write task runs, in a worker process Ray keeps for the next tasks."""
    import pyarrow.parquet  # noqa: F401
    import ray.data  # noqa: F401


def read_run(output: str, storage_options: dict | None = None) -> dict:
    """The `_run.json` of a committed run; OutputError if OUTPUT holds no committed run."""
    fs, root = filesystem(output, storage_options)
    path = posixpath.join(root, RUN_FILE)
    if not fs.exists(path):
        raise OutputError(f"no committed run in {output} ({RUN_FILE} missing)")
    with fs.open(path, "r") as f:
        return json.load(f)


def staged_image_ids(output: str, run_id: str, storage_options: dict | None = None) -> ray.data.Dataset | None:
    """The image ids an interrupted attempt of `run_id` already staged, as a lazy dataset.

    Files a killed writer left unreadable (no Parquet footer) are deleted first: their rows
    are simply processed again. The ids stay in the cluster — they are never collected
    into this process — so resuming costs no driver memory however much was done.
    """
    fs, _ = filesystem(output, storage_options)
    # A file without rows has no ids to give, and Ray reads it as a block without columns.
    complete = [path for path in staged_files(output, run_id, storage_options) if _rows(fs, [path])]
    if not complete:
        return None
    # A quarter CPU: the manifest's reader holds one for the whole run, and on a 2-CPU
    # machine a read of 1 CPU waited 401 s for it to finish (BENCHMARKS.md, issue 25).
    return ray.data.read_parquet(complete, filesystem=arrow_filesystem(fs), num_cpus=0.25).select_columns(
        ["image_id"]
    )


def staged_files(output: str, run_id: str, storage_options: dict | None = None) -> list[str]:
    """The complete Parquet files an interrupted attempt of `run_id` staged (paths within
    OUTPUT's filesystem), after deleting the torn ones a killed writer left (no footer):
    their rows are simply processed again."""
    fs, root = filesystem(output, storage_options)
    staging = posixpath.join(root, STAGING_DIR, run_id)
    if not fs.exists(staging):
        return []
    fs.invalidate_cache(staging)
    complete = []
    for path in sorted(p for p in fs.find(staging) if p.endswith(".parquet")):
        try:
            with fs.open(path, "rb") as f:
                pq.read_metadata(f)
            complete.append(path)
        except Exception:  # noqa: BLE001 - a torn file: drop it, its rows are redone
            log.warning("removing incomplete staged file %s", full_uri(fs, path))
            remove(fs, path)
    return complete


def read_attempt(output: str, run_id: str, storage_options: dict | None = None) -> dict | None:
    """What an interrupted attempt of `run_id` was started with (`write_run`'s `attempt`), or
    None if it recorded nothing."""
    fs, root = filesystem(output, storage_options)
    record = posixpath.join(root, STAGING_DIR, run_id, ATTEMPT_FILE)
    if not fs.exists(record):
        return None
    with fs.open(record, "r") as f:
        return json.load(f)


def committed_files(output: str, storage_options: dict | None = None) -> list[str]:
    """URIs of the Parquet files of the committed run in OUTPUT, as its `_run.json` lists them.

    Readers that go through this never see a run that is still committing or died.
    """
    fs, root = filesystem(output, storage_options)
    return [full_uri(fs, posixpath.join(root, name)) for name in read_run(output, storage_options)["files"]]


def _rows(fs, files: list[str]) -> int:
    """Rows of Parquet `files`, from their footers."""
    total = 0
    for path in files:
        with fs.open(path, "rb") as f:
            total += pq.read_metadata(f).num_rows
    return total


COUNT_COLUMNS = ["image_id", "status", "error", "segments.list.element.category_id"]
COUNT_BATCH_ROWS = 65_536


def _count(fs, files: list[str], run_id: str, output: str, seconds: float) -> RunSummary:
    """Counts read back from the committed files: image ids, the status column and one leaf
    of segments."""
    ok = error = segments = 0
    example = None
    hashes = []
    for path in files:
        file_hashes = []
        with fs.open(path, "rb") as f:
            # A batch at a time: a file holds FILE_MIB of rows, whose columns read whole
            # grew the driver with the file (+120 MiB at a million rows, BENCHMARKS.md).
            for table in pq.ParquetFile(f).iter_batches(batch_size=COUNT_BATCH_ROWS, columns=COUNT_COLUMNS):
                file_hashes.append(id_hashes(table["image_id"]))
                rows_ok = pc.sum(pc.equal(table["status"], STATUS_OK)).as_py() or 0
                ok += rows_ok
                error += table.num_rows - rows_ok
                segments += pc.sum(pc.list_value_length(table["segments"])).as_py() or 0
                reasons = pc.drop_null(table["error"])
                if example is None and len(reasons):
                    example = reasons[0].as_py()
        hashes.append(np.concatenate(file_hashes) if file_hashes else np.empty(0, np.uint64))
    return RunSummary(
        run_id, output, ok + error, ok, error, segments, len(files), seconds, example, find_repeated_ids(fs, files, hashes)
    )


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
