"""The bad-input and fault matrix: every input gets exactly one row, a failure never costs
other images' work, and the job exits 0 with the failures counted.

Run alone with `pytest -m reliability`.
"""

from __future__ import annotations

import collections
import http.client
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
from PIL import Image, PngImagePlugin
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.segments import Segments
from rayseg.pipeline import inference
from rayseg.pipeline.in_flight import MAX_DEATHS_ALONE, InFlightRecord
from rayseg.pipeline.inference import ImageSegmenter, PackedMasks
from rayseg.pipeline.resources import plan_resources
from rayseg.pipeline.segment import ModelSpec, segment
from rayseg.pipeline.sink import RUN_FILE, write_run
from rayseg.pipeline.sources import read_source

from .conftest import BUCKET
from .poison_run import POISON

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ray_cluster")]

runner = CliRunner()


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height but carries no pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def rotated_jpeg() -> bytes:
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: stored 60 wide, shown 20 wide
    return encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)


RGB = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
GOOD_JPEG = encoded(Image.fromarray(RGB), "JPEG")

# name → (file bytes, expected status, expected (height, width) or error text)
MATRIX = {
    "zero-byte.png": (b"", "error", "empty file"),
    "truncated.jpg": (GOOD_JPEG[: len(GOOD_JPEG) // 2], "error", "not a decodable image"),
    "text.jpg": (b"just some notes, not a picture\n", "error", "not a decodable image"),
    "html-error-page.png": (b"<html><body><h1>503 Service Unavailable</h1></body></html>", "error", "not a decodable image"),
    "decompression-bomb.png": (png_header_only(30000, 30000), "error", "image too large"),
    "sixteen-bit.png": (encoded(Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16))), "ok", (12, 16)),
    "cmyk.jpg": (encoded(Image.new("CMYK", (30, 20), (0, 128, 255, 0)), "JPEG"), "ok", (20, 30)),
    "rgba.png": (encoded(Image.new("RGBA", (25, 15), (10, 20, 30, 0))), "ok", (15, 25)),
    "palette.png": (encoded(Image.new("RGB", (22, 11), "red").convert("P")), "ok", (11, 22)),
    "grayscale.png": (encoded(Image.new("L", (17, 13), 90)), "ok", (13, 17)),
    "exif-rotated.jpg": (rotated_jpeg(), "ok", (60, 20)),
    "one-pixel.png": (encoded(Image.new("RGB", (1, 1), "white")), "ok", (1, 1)),
    "good.jpg": (GOOD_JPEG, "ok", (40, 50)),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-inputs")
    for name, (data, _, _) in MATRIX.items():
        (directory / name).write_bytes(data)
    # A file name that is not UTF-8 (a Latin-1 'é' byte), as old archives carry.
    with open(os.path.join(os.fsencode(directory), b"caf\xe9.png"), "wb") as f:
        f.write(encoded(Image.new("RGB", (8, 8))))
    return directory


def test_every_bad_input_gets_its_own_row_and_the_job_exits_0(bad_inputs, tmp_path):
    output = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(bad_inputs), str(output), "--model", "unet", "--weights", "random"])
    assert result.exit_code == 0, result.output
    rows = {row["image_id"]: row for row in pq.read_table(output).to_pylist()}
    assert len(rows) == len(MATRIX) + 1
    for name, (_, status, expected) in MATRIX.items():
        row = rows[name]
        assert row["status"] == status, (name, row["error"])
        if status == "ok":
            assert (row["height"], row["width"]) == expected, name
            for seg in row["segments"]:
                assert mask_utils.decode({"size": [row["height"], row["width"]], "counts": seg["rle"]}).shape == expected
        else:
            assert expected in row["error"], (name, row["error"])
            assert row["segments"] == []
    (odd,) = [row for image_id, row in rows.items() if image_id.startswith("caf")]
    assert odd["status"] == "error" and "not valid UTF-8" in odd["error"] and "\\xe9" in odd["image_id"]
    run = json.loads((output / RUN_FILE).read_text())
    errors = sum(status == "error" for _, status, _ in MATRIX.values()) + 1
    assert run["counts"]["error"] == errors and run["counts"]["ok"] == len(MATRIX) + 1 - errors
    assert f"│ error    │ {errors} (e.g. " in result.output, "the count shows one of the reasons"


def test_manifest_rows_each_give_a_row_and_repeated_ids_are_reported(shapes, tmp_path, caplog):
    import logging

    image, other = str(shapes.images_dir / "000001.png"), str(shapes.images_dir / "000002.png")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_id": ["first", "again", "first"], "uri": [image, image, other]}), manifest)
    logger = logging.getLogger("rayseg")
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops propagation to the root
    try:
        result = runner.invoke(app, ["segment", str(manifest), str(tmp_path / "out"), "--model", "unet", "--weights", "random"])
    finally:
        logger.removeHandler(caplog.handler)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted((r["image_id"], r["uri"]) for r in rows) == [("again", image), ("first", image), ("first", other)]
    assert all(r["status"] == "ok" for r in rows)
    assert json.loads((tmp_path / "out" / RUN_FILE).read_text())["counts"]["repeated_image_ids"] == 1
    assert "repeated image ids: 1 (e.g. 'first')" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: permissions cannot be denied to it")
def test_an_unreadable_file_is_an_error_row(shapes, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes((shapes.images_dir / "000000.png").read_bytes())
    locked = images / "locked.png"
    locked.write_bytes((shapes.images_dir / "000001.png").read_bytes())
    locked.chmod(0)
    result = runner.invoke(app, ["segment", str(images), str(tmp_path / "out"), "--model", "unet", "--weights", "random"])
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert result.exit_code == 0 and rows["ok.png"]["status"] == "ok"
    assert rows["locked.png"]["status"] == "error" and "PermissionError" in rows["locked.png"]["error"]


def test_a_very_large_image_is_shown_downscaled_to_the_model_and_masked_at_full_size(tmp_path):
    big = np.zeros((1200, 1500, 3), dtype=np.uint8)
    big[:, 750:] = 255  # two halves
    items = [{"image_id": "big", "image": big}, {"image_id": "small", "image": big[:60, 700:800].copy()}]
    rows = segment(
        ray.data.from_items(items), ModelSpec("unet"), plan_resources(ray.cluster_resources()), model_max_pixels=100_000
    )
    by_id = {r["image_id"]: r for r in rows.take_all()}
    assert (by_id["big"]["height"], by_id["big"]["width"]) == (1200, 1500)
    union = np.zeros((1200, 1500), dtype=np.uint8)
    for seg in by_id["big"]["segments"]:
        union += mask_utils.decode({"size": [1200, 1500], "counts": seg["rle"]})
    assert (union == 1).all(), "full-size masks that still partition the image"


class FailsOnMarkedImages:
    """A model that raises whenever a batch contains an image whose first pixel is 13."""

    name, task, categories = "fails", "semantic", []

    def preprocess(self, images):
        if any(image[0, 0, 0] == 13 for image in images):
            raise RuntimeError("cannot handle this image")
        return images

    def forward(self, batch):
        return batch

    def postprocess(self, raw, sizes):
        return [Segments.of(np.ones((1, *size), dtype=bool), [1], [1.0]) for size in sizes]


def decoded_rows(first_pixels: list[int]) -> dict[str, np.ndarray]:
    """Decoded 4×5 rows as Ray Data hands them to the actor, one per first-pixel value."""
    count = len(first_pixels)
    images = np.empty(count, dtype=object)
    images[:] = [np.full((4, 5, 3), value, dtype=np.uint8) for value in first_pixels]
    return {
        "image_id": np.array([f"img{i}" for i in range(count)], dtype=object),
        "uri": np.array([None] * count, dtype=object),
        "image": images,
        "height": np.array([4] * count, dtype=np.int32),
        "width": np.array([5] * count, dtype=np.int32),
        "status": np.array(["ok"] * count, dtype=object),
        "error": np.array([None] * count, dtype=object),
    }


def actor_with(model, **kwargs) -> ImageSegmenter:
    actor = ImageSegmenter(ModelSpec("unet"), PackedMasks(), torch_threads=1, **kwargs)
    actor.model = model
    actor.labels = {1: "thing"}
    return actor


def test_a_model_that_raises_on_one_image_costs_only_that_images_row():
    out = pa.concat_tables(actor_with(FailsOnMarkedImages())(decoded_rows([1, 13, 2, 3]))).to_pylist()
    assert [row["status"] for row in out] == ["ok", "error", "ok", "ok"]
    assert out[1]["error"] == "inference failed: RuntimeError: cannot handle this image"
    assert [row["category_ids"] for row in out] == [[1], [], [1], [1]]


class RecordsBatches(FailsOnMarkedImages):
    """FailsOnMarkedImages that remembers how many images each batch it was given held."""

    def __init__(self):
        self.batches = []

    def preprocess(self, images):
        self.batches.append(len(images))
        return super().preprocess(images)


def test_a_call_runs_the_model_a_batch_at_a_time_and_hands_on_contiguous_tables(monkeypatch):
    monkeypatch.setattr(inference, "ROWS_PER_OUTPUT", 4)
    model = RecordsBatches()
    tables = list(actor_with(model, batch_size=3)(decoded_rows([1, 2, 13, 4, 5, 6, 7])))
    assert model.batches == [3, 1, 1, 1, 3, 1], "batches of 3; the failing one retried image by image"
    assert [table.num_rows for table in tables] == [6, 1], "handed on once 4 rows are ready, and the rest at the end"
    assert all(column.num_chunks == 1 for table in tables for column in table.columns)
    out = pa.concat_tables(tables).to_pylist()
    assert [row["image_id"] for row in out] == [f"img{i}" for i in range(7)]
    assert [row["status"] for row in out] == ["ok", "ok", "error", "ok", "ok", "ok", "ok"]


def test_images_a_dead_process_held_go_through_alone_and_one_that_keeps_killing_it_is_an_error_row(monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "ROWS_PER_OUTPUT", 4)
    record = str(tmp_path / "actor.json")
    # Earlier processes of this actor died holding img0–img2, then holding img1 alone, twice.
    for in_hand in [["img0", "img1", "img2"]] + [["img1"]] * MAX_DEATHS_ALONE:
        InFlightRecord.load(record).hold(in_hand)
    model = RecordsBatches()
    tables = list(actor_with(model, batch_size=3, in_flight=InFlightRecord.load(record))(decoded_rows([1, 2, 3, 4, 5, 6])))
    assert model.batches == [1, 1, 3], "img0 and img2 alone, img1 not tried again, the next batch whole"
    out = pa.concat_tables(tables).to_pylist()
    assert [row["status"] for row in out] == ["ok", "error", "ok", "ok", "ok", "ok"]
    assert out[1]["error"].startswith(f"the worker process died {MAX_DEATHS_ALONE} times while working on this image alone")
    assert (out[1]["width"], out[1]["height"]) == (5, 4)
    plain = list(actor_with(RecordsBatches(), batch_size=3)(decoded_rows([1, 2, 3, 4, 5, 6])))
    assert [t.num_rows for t in tables] == [t.num_rows for t in plain], (
        "the same tables as a first attempt: Ray keeps the outputs a dead attempt already handed on"
    )
    assert not InFlightRecord.load(record).deaths, "every image finished, so none is remembered"


def inference_actor_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "MapBatches(SegmentImages" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_an_inference_actor_killed_mid_run_costs_nothing(tmp_path):
    images = make_fixtures(tmp_path / "fixtures", images=60, size=(96, 96), seed=9).images_dir
    killed = threading.Event()

    def kill_one_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed.is_set():
            actors = inference_actor_processes()
            if actors and (tmp_path / "out" / "_staging").exists():
                actors[0].kill()  # SIGKILL
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    plan = plan_resources(ray.cluster_resources(), batch_size=2)
    rows = segment(read_source(str(images)), ModelSpec("unet"), plan)
    summary = write_run(rows, str(tmp_path / "out"), run_id="kill", run_info={}, write_cpus=plan.task_cpus, rows_per_file=4)
    killer.join()
    assert killed.is_set(), "the actor was never killed: the test proved nothing"
    ids = [r["image_id"] for r in pq.read_table(tmp_path / "out").to_pylist()]
    assert sorted(ids) == sorted(p.name for p in images.glob("*.png")), "every input exactly once"
    assert summary.ok == 60


def test_a_worker_node_removed_mid_run_costs_nothing(tmp_path):
    """Two nodes of 1 CPU; the worker node, hosting an inference actor, is killed mid-run
    and a new node joins, as an autoscaler's would.

    Ray retries the lost node's tasks, restarts its actor elsewhere and rebuilds the blocks
    its object store held (tests/node_loss_run.py runs it in a cluster of its own).
    """
    images = make_fixtures(tmp_path / "fixtures", images=48, size=(64, 64), seed=5).images_dir
    output = tmp_path / "out"
    summary = run_in_own_ray("rayseg.tests.node_loss_run", str(images), str(output), log=tmp_path / "stderr", timeout=240)
    assert summary["error"] is None, summary
    assert summary["removed"], "the worker node never hosted an inference actor: the test proved nothing"
    assert summary["files_staged_before"] < summary["files_staged_total"], "the node was removed after the work was done"
    rows = pq.read_table(output).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(p.name for p in images.glob("*.png")), "every input exactly once"
    assert all(r["status"] == "ok" for r in rows)
    counts = json.loads((output / RUN_FILE).read_text())["counts"]
    assert (counts["images"], counts["ok"]) == (48, 48)


@pytest.mark.parametrize("decoded_in", ["actors", "tasks"])
def test_an_image_that_kills_its_process_every_time_becomes_an_error_row_instead_of_stalling_the_run(tmp_path, decoded_in):
    """Ray restarts a dead actor or task and retries it without end: without the in-flight
    record (pipeline/in_flight.py) this run never finishes (tests/poison_run.py). CPU
    clusters decode in the inference actors; GPU clusters (one faked here) in tasks."""
    images = make_fixtures(tmp_path / "fixtures", images=10, size=(64, 64), seed=4).images_dir
    poison = PngImagePlugin.PngInfo()
    poison.add_text("note", POISON.decode())
    Image.open(next(images.glob("*.png"))).save(images / "poison.png", pnginfo=poison)
    output = tmp_path / "out"
    gpus = "1" if decoded_in == "tasks" else "0"
    summary = run_in_own_ray("rayseg.tests.poison_run", str(images), str(output), gpus, log=tmp_path / "stderr", timeout=240)
    assert summary["error"] is None, summary
    rows = {r["image_id"]: r for r in pq.read_table(output).to_pylist()}
    assert sorted(rows) == sorted(p.name for p in images.glob("*.png")), "every input exactly once"
    assert rows.pop("poison.png")["error"].startswith("the worker process died 2 times while working on this image alone")
    assert all(r["status"] == "ok" for r in rows.values()), "the images beside it are segmented"


def run_in_own_ray(module: str, *args: str, log: Path, timeout: float) -> dict:
    """Runs `python -m module args` — a script that starts its own Ray cluster — and returns
    the JSON it prints last; its stderr goes to `log`.

    A process holds one Ray, and this session already runs one. RAY_TMPDIR is private and
    short (Unix socket paths under it must fit 107 bytes), so the cluster's address file
    lands there, where no other `ray.init()` on the machine looks. The script leads its own
    process group: on a timeout the whole group — driver, raylets, workers — is killed.
    """
    ray_tmpdir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, "RAY_TMPDIR": ray_tmpdir},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, _ = process.communicate(timeout=timeout)
            ending = f"exited with {process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, _ = process.communicate()
            ending = f"killed after {timeout} s"
        finally:
            shutil.rmtree(ray_tmpdir, ignore_errors=True)
    if process.returncode != 0:
        # Raylets' periodic state dumps drown everything else.
        lines = [line for line in log.read_text().splitlines() if "[state-dump]" not in line]
        pytest.fail(f"{module} {ending}:\n{stdout}\n" + "\n".join(lines[-150:]))
    return json.loads(stdout.strip().splitlines()[-1])


# Hop-by-hop headers: they describe one connection, so the proxy never passes them on.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
S3_ERRORS = [(503, "SlowDown", "Please reduce your request rate."), (500, "InternalError", "We encountered an internal error. Please try again.")]


class FlakyS3Proxy(ThreadingHTTPServer):
    """An HTTP proxy in front of an S3 server that fails the first attempt of every object
    read, listing and write — alternately 503 SlowDown and 500 InternalError, with S3's XML
    error body — and passes every other request through unchanged.

    `injected` counts the failures by kind: "read" (GET of an object), "list" (GET of a
    bucket) and "write" (PUT: uploads, parts, server-side copies).
    """

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _FlakyS3Handler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.injected: collections.Counter[str] = collections.Counter()
        self._attempted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def fault_for(self, method: str, path: str) -> tuple[str, tuple[int, str, str]] | None:
        """(kind, (status, code, message)) when this request is to fail, else None."""
        if method not in ("GET", "PUT"):
            return None
        bucket_and_key = urllib.parse.urlsplit(path).path.lstrip("/")
        kind = "write" if method == "PUT" else "read" if "/" in bucket_and_key.rstrip("/") else "list"
        with self._lock:
            if (method, path) in self._attempted:
                return None
            self._attempted.add((method, path))
            self.injected[kind] += 1
            return kind, S3_ERRORS[sum(self.injected.values()) % 2]


class _FlakyS3Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: FlakyS3Proxy

    def log_message(self, format, *args):  # one line per request otherwise
        pass

    def do_GET(self):
        body = self._request_body()
        fault = self.server.fault_for(self.command, self.path)
        if fault is not None:
            _, (status, code, message) = fault
            error = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>flaky-proxy</RequestId></Error>"
            ).encode()
            self._respond(status, [("Content-Type", "application/xml")], error)
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body:
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            content = response.read()
            passed = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"date", "server"}]
            self._respond(response.status, passed, content)
        finally:
            upstream.close()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _respond(self, status: int, headers: list[tuple[str, str]], content: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() != "content-length" or self.command == "HEAD":
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)


@pytest.fixture
def flaky_s3(s3_endpoint):
    proxy = FlakyS3Proxy(s3_endpoint)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_object_storage_errors_on_reads_listings_and_writes_are_retried(shapes, flaky_s3):
    """Every object read, listing and write first fails (503 SlowDown or 500 InternalError);
    the storage client's retries (pipeline/storage.py) absorb them all."""
    key_prefix = f"flaky-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{BUCKET}/{key_prefix}"
    client = boto3.client("s3")  # straight to the S3 server, not through the proxy
    names = sorted(p.name for p in shapes.images_dir.glob("*.png"))
    for name in names:
        client.upload_file(str(shapes.images_dir / name), BUCKET, f"{key_prefix}/images/{name}")
    result = runner.invoke(
        app,
        ["segment", f"{prefix}/images", f"{prefix}/out", "--model", "unet", "--weights", "random",
         "--storage-option", f"endpoint_url={flaky_s3.url}"],
    )
    assert result.exit_code == 0, result.output
    assert flaky_s3.injected["read"] >= len(names), "every image's first read failed"
    assert flaky_s3.injected["list"] > 0 and flaky_s3.injected["write"] > 0, flaky_s3.injected
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # straight to the S3 server
    files = sorted(p for p in fs.find(f"{prefix}/out") if p.endswith(".parquet"))
    rows = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in files).to_pylist()
    assert sorted(r["image_id"] for r in rows) == names, "every input exactly once"
    assert [r["status"] for r in rows] == ["ok"] * len(names), [r["error"] for r in rows if r["error"]]
    run = json.loads(fs.cat(f"{prefix}/out/{RUN_FILE}"))
    assert run["counts"]["ok"] == len(names) and run["files"] == [p.rsplit("/", 1)[1] for p in files]
