"""Reading image bytes by URI inside Ray: Ray Data's `download` expression vs our fsspec map.

Both read the same objects from a real S3 API (moto's server, its own process, on
127.0.0.1). Run: .venv/bin/python -m benchmarks.read_bytes [--objects 1000]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.expressions import download

from rayseg.pipeline.decode import _read_all

from .common import machine, small_images


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def fsspec_bytes(batch: dict, storage_options: dict) -> dict:
    contents = _read_all(list(batch["uri"]), storage_options)
    return {"uri": batch["uri"], "bytes": [contents[u] for u in batch["uri"]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=1000)
    args = parser.parse_args()
    server, endpoint = start_s3()
    try:
        work = Path(tempfile.mkdtemp(prefix="rayseg-bench-"))
        images = sorted(small_images(work, 200, 64).glob("*.png"))
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
        client.create_bucket(Bucket="bench")
        uris = []
        for index in range(args.objects):
            key = f"images/{index:06d}.png"
            client.upload_file(str(images[index % len(images)]), "bench", key)
            uris.append(f"s3://bench/{key}")
        ray.init(include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        table = pa.table({"uri": uris})
        blocks = [table.slice(i, 256) for i in range(0, len(uris), 256)]
        arrow_s3 = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="k", secret_key="s", region="us-east-1")
        options = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        results = {"download_expression": [], "fsspec_map": []}
        for _ in range(2):
            started = time.perf_counter()
            got = ray.data.from_arrow(blocks).with_column("bytes", download("uri", filesystem=arrow_s3)).materialize()
            results["download_expression"].append(round(time.perf_counter() - started, 2))
            assert got.count() == args.objects
            started = time.perf_counter()
            got = ray.data.from_arrow(blocks).map_batches(fsspec_bytes, fn_kwargs={"storage_options": options}, num_cpus=0.25).materialize()
            results["fsspec_map"].append(round(time.perf_counter() - started, 2))
            assert got.count() == args.objects
        ray.shutdown()
        print(json.dumps({"machine": machine(), "objects": args.objects, "seconds": results}, indent=2))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
