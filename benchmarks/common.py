"""Shared helpers for the benchmarks: process-tree memory and CPU sampling, test data."""

from __future__ import annotations

import os
import subprocess
import threading
import time
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
