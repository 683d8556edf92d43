"""`--gpu-decode`: the switch from the command line to the plan, the JPEGs a decode task
leaves to the GPU actor, and the actor's decode giving the rows the CPU decode gives —
without CUDA (the fallback), with nvJPEG stood in by torchvision's CPU decoder, and (where
there is CUDA) with nvJPEG itself."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rayseg.jobs import runner
from rayseg.jobs.cli import app
from rayseg.jobs.spec import ResourcesSection, parse_spec
from rayseg.pipeline import gpu_decode
from rayseg.pipeline.decode import (
    JPEG_COLUMN,
    decode_batch,
    decode_images,
    gpu_decodable_size,
)
from rayseg.pipeline.gpu_decode import JpegDecoder, decode_jpegs
from rayseg.pipeline.resources import plan_resources


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def pixels(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): smooth gradients plus noise, so that JPEG keeps detail to differ in."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=2)
    return np.clip(base + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)


def corrupt_jpeg() -> bytes:
    """A JPEG whose header reads (so it is left to the actor) but whose scan is garbage
    between its start and its end-of-image marker: the CPU decode refuses it."""
    data = encoded(Image.fromarray(pixels(48, 64, 9)), "JPEG", quality=90)
    scan = data.index(b"\xff\xda") + 14
    return data[:scan] + bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)) + b"\xff\xd9"


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return encoded(Image.fromarray(pixels(30, 50, 3)), "JPEG", exif=exif, quality=95)


FILES = {
    "rgb.jpg": encoded(Image.fromarray(pixels(48, 64, 1)), "JPEG", quality=90),
    "grey.jpg": encoded(Image.fromarray(pixels(40, 24, 2)[:, :, 0]), "JPEG", quality=90),
    "rotated.jpg": rotated_jpeg(),
    "cmyk.jpg": encoded(Image.fromarray(pixels(20, 20, 4)).convert("CMYK"), "JPEG"),
    "corrupt.jpg": corrupt_jpeg(),
    "truncated.jpg": encoded(Image.fromarray(pixels(48, 64, 5)), "JPEG")[:400],
    "shapes.png": encoded(Image.fromarray(pixels(32, 32, 6)), "PNG"),
}
LEFT_TO_THE_GPU = ["rgb.jpg", "grey.jpg", "corrupt.jpg"]


@pytest.fixture
def mixed(tmp_path) -> dict[str, np.ndarray]:
    """{image_id, uri} rows over FILES and a file that is not there."""
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    names = [*FILES, "missing.jpg"]
    return {
        "image_id": np.array(names, dtype=object),
        "uri": np.array([str(tmp_path / name) for name in names], dtype=object),
    }


def left_to_the_actor(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the decode tasks hand a GPU actor with the switch on: one batch of rows."""
    (rows,) = decode_images(batch, jpegs_for_actor=True)
    return rows


def assert_same_rows(got: dict[str, np.ndarray], want: dict[str, np.ndarray], pixel_tolerance: int = 0) -> None:
    for key in ("image_id", "uri", "status", "error", "height", "width"):
        assert list(got[key]) == list(want[key]), key
    for name, image, expected in zip(want["image_id"], got["image"], want["image"]):
        assert image.shape == expected.shape and image.dtype == np.uint8, name
        assert np.abs(image.astype(int) - expected.astype(int)).max(initial=0) <= pixel_tolerance, name


# --- which files the decode task leaves to the actor --------------------------------------------


def test_only_whole_upright_rgb_or_grey_jpegs_within_the_limit_are_left_to_the_gpu():
    sizes = {name: gpu_decodable_size(data) for name, data in FILES.items()}
    assert sizes == {
        "rgb.jpg": (48, 64), "grey.jpg": (40, 24), "rotated.jpg": None, "cmyk.jpg": None,
        "corrupt.jpg": (48, 64), "truncated.jpg": None, "shapes.png": None,
    }  # fmt: skip
    assert gpu_decodable_size(FILES["rgb.jpg"], max_pixels=48 * 64 - 1) is None  # the CPU decode refuses it
    assert gpu_decodable_size(FILES["rgb.jpg"] + b"\0" * 10) == (48, 64)  # padding after the end marker
    assert gpu_decodable_size(FileNotFoundError("gone")) is None


def test_with_the_switch_on_the_decode_task_passes_jpeg_bytes_and_header_sizes(mixed):
    rows = left_to_the_actor(mixed)
    names = list(rows["image_id"])
    for name, data, image, height, width in zip(names, rows[JPEG_COLUMN], rows["image"], rows["height"], rows["width"]):
        if name in LEFT_TO_THE_GPU:
            assert data == FILES[name] and image.shape == (0, 0, 3), name
            assert (height, width) == gpu_decodable_size(FILES[name])
        else:
            assert data == b"", name
    assert list(rows["status"]) == ["ok", "ok", "ok", "ok", "ok", "error", "ok", "error"]


def test_with_the_switch_off_the_decode_task_adds_no_jpeg_column(mixed):
    (rows,) = decode_images(mixed)
    assert JPEG_COLUMN not in rows
    assert all(image.size for image, status in zip(rows["image"], rows["status"]) if status == "ok")


# --- the actor's decode ----------------------------------------------------------------------


def test_without_cuda_the_actor_decodes_the_jpegs_on_the_cpu_into_the_cpu_decodes_rows(mixed, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_gpu(files, device):
        raise AssertionError("GPU decode attempted without CUDA")

    monkeypatch.setattr(gpu_decode, "decode_jpegs", no_gpu)
    with caplog.at_level("WARNING", logger="rayseg.pipeline"):
        decoder = JpegDecoder()
    assert "sees no CUDA device" in caplog.text
    assert_same_rows(decoder(left_to_the_actor(mixed)), decode_batch(mixed))


def test_with_cuda_the_batch_goes_to_the_gpu_and_a_file_it_refuses_falls_back_alone(mixed, monkeypatch):
    """nvJPEG stood in by torchvision's CPU decoder, which refuses the corrupt file as nvJPEG
    would: the batch fails, each file is retried alone, the corrupt one on the CPU."""
    calls = []

    def stand_in(files, device):
        calls.append((device, list(files)))
        return decode_jpegs(files, "cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode, "decode_jpegs", stand_in)
    got = JpegDecoder()(left_to_the_actor(mixed))
    batch = [FILES[name] for name in LEFT_TO_THE_GPU]
    assert calls == [("cuda", batch)] + [("cuda", [file]) for file in batch]
    # libjpeg-turbo behind both PIL and torchvision: the same pixels
    assert_same_rows(got, decode_batch(mixed))


def test_a_gpu_image_of_another_size_than_its_header_is_decoded_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode, "decode_jpegs", lambda files, device: [np.zeros((1, 1, 3), np.uint8)] * len(files))
    [(image, error)] = JpegDecoder().decode([FILES["rgb.jpg"]], [(48, 64)])
    assert error is None and image.shape == (48, 64, 3) and image.any()


def test_torchvisions_batched_decode_gives_hwc_uint8_rgb_as_the_cpu_decode_does():
    images = decode_jpegs([FILES["rgb.jpg"], FILES["grey.jpg"]], "cpu")
    assert [image.shape for image in images] == [(48, 64, 3), (40, 24, 3)]
    assert all(image.dtype == np.uint8 and image.flags.c_contiguous for image in images)
    grey = images[1]
    assert (grey[:, :, 0] == grey[:, :, 1]).all() and (grey[:, :, 1] == grey[:, :, 2]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs CUDA")
def test_nvjpeg_decodes_within_two_levels_of_the_cpu_decode(mixed):
    decoder = JpegDecoder()
    assert decoder.device == "cuda"
    assert_same_rows(decoder(left_to_the_actor(mixed)), decode_batch(mixed), pixel_tolerance=2)


# --- the switch, from the command line to the plan ---------------------------------------------


def test_the_switch_is_off_by_default_and_ignored_without_gpus():
    assert ResourcesSection().gpu_decode is False
    assert plan_resources({"CPU": 8.0, "GPU": 1.0}).gpu_decode is False
    assert plan_resources({"CPU": 8.0, "GPU": 1.0}, gpu_decode=True).gpu_decode is True
    assert plan_resources({"CPU": 8.0}, gpu_decode=True).gpu_decode is False  # CPU actors decode their own rows
    assert plan_resources({"CPU": 8.0, "GPU": 1.0}, gpus_per_actor=0, gpu_decode=True).gpu_decode is False


def test_the_spec_and_the_command_line_flag_reach_the_plan(monkeypatch, tmp_path):
    spec = parse_spec({"kind": "segment", "input": "in", "output": "out", "model": {"name": "unet"},
                       "resources": {"gpu_decode": True}}, source="test")  # fmt: skip
    assert spec.resources.gpu_decode is True
    seen = []

    def stop(spec, **_):
        seen.append(spec)
        raise RuntimeError("stopped before any cluster work")

    monkeypatch.setattr("rayseg.jobs.cli.run_segment_spec", stop)
    for flags in ([], ["--gpu-decode"]):
        CliRunner().invoke(app, ["segment", str(tmp_path), str(tmp_path / "out"), "--model", "unet", *flags])
    assert [s.resources.gpu_decode for s in seen] == [False, True]
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    monkeypatch.setattr(runner.cluster, "node_count", lambda: 1)
    monkeypatch.setattr(runner.cluster, "node_shapes", lambda: [{"CPU": 8.0, "GPU": 1.0}])
    assert [runner.plan_on_cluster(s.resources, "unet").gpu_decode for s in seen] == [False, True]


# --- end to end, on a cluster that declares a GPU torch cannot use -------------------------------

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys, ray
    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sources import read_source

    images, ray_dir = sys.argv[1:3]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=ray_dir)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = plan_resources(ray.cluster_resources(), gpu_decode=True)
    runs = {}
    for name, resources in (("gpu_decode", plan), ("cpu_decode", dataclasses.replace(plan, gpu_decode=False))):
        rows = segment(read_source(images), ModelSpec("unet"), resources).take_all()
        runs[name] = sorted((r["image_id"], r["status"], r["error"], r["width"], r["height"], json.dumps(r["segments"]))
                            for r in rows)
    print(json.dumps({"planned": plan.gpu_decode, "runs": runs}))
    """
)


@pytest.mark.slow
def test_through_ray_the_switch_gives_the_rows_of_the_cpu_decode_when_the_actor_has_no_cuda(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, data in FILES.items():
        (images / name).write_bytes(data)
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(images), ray_dir], capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["planned"] is True
    runs = report["runs"]
    assert [row[1] for row in runs["cpu_decode"]].count("error") == 2  # the corrupt and the truncated JPEG
    assert runs["gpu_decode"] == runs["cpu_decode"]
    assert "sees no CUDA device: it decodes its JPEGs on the CPU" in done.stderr, "the fallback is said"
