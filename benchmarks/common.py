"""Shared helpers for the benchmarks: process-tree memory and CPU sampling, test data."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.unet import UNet, UNetConfig, save_unet


def machine() -> str:
    return f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants: shared pages (Ray's
    object store) counted once in total, not once per process that maps them."""
    total = 0
    for process in tree(root):
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakSampler(threading.Thread):
    """Samples tree_pss(pid) every `interval` seconds; `.peak` holds the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_pss(self.root))
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


class TreeAndDriverSampler(threading.Thread):
    """Peak PSS of a process tree and of its root alone, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.tree_peak = self.driver_peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            total = 0
            for process in tree(self.root):
                try:
                    pss = process.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += pss
                if process.pid == self.root.pid:
                    self.driver_peak = max(self.driver_peak, pss)
            self.tree_peak = max(self.tree_peak, total)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


ProcessKey = tuple[int, float]  # (pid, create time): pids are reused, this pair is not


@dataclass
class Mark:
    """The tree's state at one instant: perf_counter time, each process's CPU-seconds so far,
    and the sampler thread's own CPU-seconds so far."""

    time: float
    cpu: dict[ProcessKey, float]
    sampler_cpu: float


@dataclass
class TreeMeasurement:
    """What a ProcessTreeSampler saw between start() and stop().

    cpu_s: user + sys of every process of the tree (the sampler's own thread excluded);
    by_process: the same split by process kind (driver, ray::SegmentImages, raylet, …);
    peak_pss_bytes: the largest tree PSS sampled; marks: the instants `mark` recorded.
    """

    cpu_s: float
    by_process: dict[str, float]
    sampler_cpu_s: float
    peak_pss_bytes: int
    marks: dict[str, Mark] = field(default_factory=dict)

    def window_cpu(self, first: str, last: str) -> float:
        """CPU-seconds of the tree between two marks (the sampler's own excluded); a process
        that started in between counts from 0, one that ended counts to its last sample."""
        a, b = self.marks[first], self.marks[last]
        return sum(cpu - a.cpu.get(key, 0.0) for key, cpu in b.cpu.items()) - (b.sampler_cpu - a.sampler_cpu)


class ProcessTreeSampler:
    """CPU-seconds (user + sys) and peak PSS of this process and all its descendants (for a
    local Ray: GCS, raylet, agents, workers and actors), sampled from /proc by one thread.

    A process's CPU is its last sample minus its sample at start() (0 if it started later),
    so one that exits loses at most `interval` of CPU. The sampler thread's own CPU — reading
    /proc, smaps for PSS — is measured and subtracted. `mark(name)` (from any thread) records
    the tree's CPU at that instant, so a window between two marks can be measured.
    """

    def __init__(self, interval: float = 0.25, memory_interval: float = 1.0):
        self.root = psutil.Process()
        self.interval = interval
        self.memory_interval = memory_interval
        self._lock = threading.Lock()
        self._first: dict[ProcessKey, float] = {}
        self._last: dict[ProcessKey, float] = {}
        self._names: dict[ProcessKey, str] = {}
        self._marks: dict[str, Mark] = {}
        self._sampler_cpu = 0.0
        self._peak_pss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> float:
        """Reads every process's CPU-seconds into `_last`; returns their total."""
        seen: dict[ProcessKey, tuple[float, str]] = {}
        for process in tree(self.root):
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
                    # Read every time: Ray's workers retitle themselves (ray::IDLE → ray::SegmentImages).
                    seen[key] = (times.user + times.system, process_name(process.cmdline()) or process.name())
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        with self._lock:
            for key, (cpu, name) in seen.items():
                self._last[key] = cpu
                self._names[key] = name
        return sum(cpu for cpu, _ in seen.values())

    def wait_idle(self, rate: float = 0.05, settle: float = 2.0, timeout: float = 60.0) -> None:
        """Returns once the tree has used < `rate` CPU-seconds per second for `settle` seconds
        (e.g. a freshly started Ray has settled), or after `timeout`."""
        deadline, quiet, previous = time.time() + timeout, 0.0, self._sample()
        while time.time() < deadline and quiet < settle:
            time.sleep(0.5)
            current = self._sample()
            quiet = quiet + 0.5 if current - previous < rate * 0.5 else 0.0
            previous = current

    def start(self) -> None:
        with self._lock:
            self._last.clear()
        self._sample()
        with self._lock:
            self._first = dict(self._last)
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        next_memory = 0.0
        while not self._stop.wait(self.interval):
            self._sample()
            if time.monotonic() >= next_memory:
                self._peak_pss = max(self._peak_pss, tree_pss(self.root))
                next_memory = time.monotonic() + self.memory_interval
            self._sampler_cpu = time.thread_time() - started
        self._sample()
        self._sampler_cpu = time.thread_time() - started

    def mark(self, name: str) -> Mark:
        """Records the tree's CPU now under `name` and returns it; the first call with a name
        wins (later ones return the recorded mark)."""
        now = time.perf_counter()
        self._sample()
        with self._lock:
            if name not in self._marks:
                self._marks[name] = Mark(now, {k: v - self._first.get(k, 0.0) for k, v in self._last.items()}, self._sampler_cpu)
            return self._marks[name]

    def stop(self) -> TreeMeasurement:
        self._stop.set()
        self._thread.join()
        self._peak_pss = max(self._peak_pss, tree_pss(self.root))
        per_process = {key: cpu - self._first.get(key, 0.0) for key, cpu in self._last.items()}
        groups: dict[str, float] = {}
        for key, cpu in per_process.items():
            name = "driver (this process)" if key[0] == self.root.pid else process_group(self._names.get(key, "?"))
            groups[name] = groups.get(name, 0.0) + cpu
        groups["driver (this process)"] = groups.get("driver (this process)", 0.0) - self._sampler_cpu
        return TreeMeasurement(
            cpu_s=sum(per_process.values()) - self._sampler_cpu,
            by_process=groups,
            sampler_cpu_s=self._sampler_cpu,
            peak_pss_bytes=self._peak_pss,
            marks=dict(self._marks),
        )


def process_name(cmdline: list[str]) -> str:
    """argv[0], or for a python process the script or module it runs."""
    if not cmdline:
        return ""
    if os.path.basename(cmdline[0]).startswith("python"):
        for arg in cmdline[1:]:
            if not arg.startswith("-"):
                return "python " + os.path.basename(arg)
    return cmdline[0]


def process_group(name: str) -> str:
    """Ray names its worker processes after what they run (ray::SegmentImages, ray::IDLE, …)."""
    if name.startswith("ray::"):
        return name.split("(")[0].split()[0]
    if name.startswith("python "):
        return name
    return os.path.basename(name.split()[0]) if name else "?"


def run_measured(command: list[str], interval: float = 0.5) -> tuple[float, int, str]:
    """Runs `command`; returns (wall seconds, peak PSS bytes of its process tree, output)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakSampler(process.pid, interval)
    sampler.start()
    output, _ = process.communicate()
    peak = sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return time.perf_counter() - started, peak, output


def tiny_unet(directory: Path) -> Path:
    """A small U-Net checkpoint whose predictions vary (so masks are not trivially empty)."""
    torch.manual_seed(0)
    network = UNet(UNetConfig(width=4, depth=2))
    with torch.no_grad():
        network.head.weight.mul_(100)
    save_unet(network, str(directory))
    return directory


def repeated_manifest(images_dir: Path, rows: int, path: Path) -> Path:
    """A Parquet manifest of `rows` rows cycling over the images in `images_dir`, unique ids."""
    files = sorted(str(p) for p in images_dir.glob("*.png"))
    uris = [files[i % len(files)] for i in range(rows)]
    pq.write_table(pa.table({"image_id": [f"img{i:07d}" for i in range(rows)], "uri": uris}), path)
    return path


def small_images(directory: Path, count: int, size: int) -> Path:
    return make_fixtures(directory, images=count, size=(size, size), seed=3).images_dir


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))
