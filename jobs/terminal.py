"""What every command prints to the terminal: results on stdout, messages on stderr, a
progress bar in a terminal (a log line every few seconds otherwise), and how a command
fails."""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..pipeline import progress

# stderr keeps stdout for results; soft_wrap keeps paths and messages copy-pasteable.
console = Console(stderr=True, soft_wrap=True)
# A command's results (tables, paths, counts): what a script pipes on.
results = Console(soft_wrap=True)

# One line a message when stderr is a file or a pipe (a job's log, CI): no wrapping, no
# colour, a timestamp to read the log by.
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(message)s"
PLAIN_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def fail(message: str, code: int = 2) -> typer.Exit:
    """Prints `error: message` and returns the Exit to raise: 2 bad arguments, 1 job failure."""
    # Text, not markup: messages hold paths, ids and exception text, brackets included.
    console.print(Text.assemble(("error:", "bold red"), " ", message))
    return typer.Exit(code)


def configure_logging(verbose: bool) -> None:
    """rayseg's messages at INFO (DEBUG with -v) on stderr; in a terminal through Rich, with
    each run's progress as a bar instead of its log lines."""
    level = logging.DEBUG if verbose else logging.INFO
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_NotProgressLines())
        progress.WATCHERS[:] = [ProgressBar()]
    else:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT, PLAIN_DATE_FORMAT))
        progress.WATCHERS[:] = []
    # In place of the handler of an earlier call (a test runs many commands in one
    # process), beside any other (pytest's capture).
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "rayseg", False)]:
        root.removeHandler(old)
    handler.rayseg = True
    root.addHandler(handler)
    root.setLevel(level)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a test's runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _NotProgressLines(logging.Filter):
    """In a terminal the bar says what the progress lines say; the lines are for files and
    pipes (`_run.json` keeps the samples either way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != progress.log.name


class ProgressBar:
    """A progress watcher (pipeline/progress.py): one Rich bar a run, images done of N, rate,
    errors so far and time left; it ends with its run."""

    def __init__(self) -> None:
        self._bars: dict[int, tuple[Progress, int]] = {}
        # A run that stops before its end (Ctrl-C) leaves its bar live: stopped at exit, so
        # the terminal gets its cursor back.
        atexit.register(self.close)

    def close(self) -> None:
        for bar, _ in self._bars.values():
            bar.stop()
        self._bars.clear()

    def __call__(self, snapshot: progress.Snapshot) -> None:
        if snapshot.run not in self._bars:
            bar = Progress(
                TextColumn("images"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}/s"),
                TextColumn("{task.fields[errors]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            bar.start()
            self._bars[snapshot.run] = (bar, bar.add_task("images", total=snapshot.expected, rate="0", errors=""))
        bar, task = self._bars[snapshot.run]
        bar.update(task, completed=snapshot.done, errors=_errors(snapshot.errors))
        state = bar.tasks[0]
        # Rich's speed is of the last 30 s, once it has two updates; the run's mean before.
        speed = state.speed or (state.completed / state.elapsed if state.elapsed else 0.0)
        bar.update(task, rate=f"{speed:,.0f}")
        if snapshot.final:
            bar.stop()
            del self._bars[snapshot.run]


def _errors(errors: int | None) -> str:
    return "" if errors is None else f"{errors:,} errors"


# Lines that Ray's C++ core writes straight to this process's stderr, bypassing logging,
# which say nothing about the user's run. Each with its reason:
# - every Ray Data actor pool logs, at error level, that its actors' constructor arguments
#   are in the object store while they may restart (ray-project/ray#57733): Ray Data itself
#   passes them so, for every pool, and restarts work (tests/test_reliability.py).
NATIVE_NOISE = ("has constructor arguments in the object store and max_restarts > 0",)

# The filter: a child process that copies its stdin to its stderr (this process's real
# stderr), line by line, dropping lines that hold a NATIVE_NOISE text. A partial line is
# passed on after 50 ms of quiet (a prompt, a progress bar). Being a process, not a thread,
# it outlives a crash of this one and still passes on its last words.
_FILTER = r"""
import os, select, sys
drop = [text.encode() for text in sys.argv[1:]]
def write(data):
    while data:
        data = data[os.write(2, data):]
rest = b""
while True:
    if rest and not select.select([0], [], [], 0.05)[0]:
        write(rest)
        rest = b""
        continue
    data = os.read(0, 65536)
    if not data:
        break
    *lines, rest = (rest + data).split(b"\n")
    write(b"".join(line + b"\n" for line in lines if not any(text in line for text in drop)))
write(rest)
"""


def filter_native_stderr() -> None:
    """From now on, this process's stderr (file descriptor 2, which Ray's C++ core writes
    to) passes through the filter above; rayseg's own console keeps the real stderr, so a
    terminal stays a terminal for the progress bar. Once a process; the filter ends when
    this process does."""
    if _filtered or not _is_writable(2):
        return
    sys.stderr.flush()
    real = os.dup(2)
    child = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, *NATIVE_NOISE], stdin=subprocess.PIPE, stderr=real, close_fds=True)
    console.file = os.fdopen(os.dup(real), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()
    _filtered.append(child)

    def restore() -> None:
        # Last words first, then the real stderr back: the filter reads its end and exits.
        sys.stderr.flush()
        os.dup2(real, 2)
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass

    atexit.register(restore)


_filtered: list[subprocess.Popen] = []


def _is_writable(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
