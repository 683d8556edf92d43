"""GPU JPEG decode (`--gpu-decode`, pipeline/gpu_decode.py) against the CPU decode: the same
rows, pixels within nvJPEG's rounding, and whether it is faster (benchmarks/gpu_check.sh).

    .venv/bin/python -m benchmarks.gpu_decode_parity [--images 64] [--size 768x1024]
        [--report FILE.md] [--device cuda|cpu]

1. rows: tests/test_gpu_decode.py's mixed files (RGB, grey, EXIF-rotated and CMYK JPEGs, a
   corrupt and a truncated JPEG, a PNG, a missing file) through the decode task with the
   switch on and the actor's JpegDecoder, against the CPU decode (`decode_batch`): status,
   error and size equal (gated), pixels' max difference reported.
2. pixels: --images photo-like JPEGs (gradients and noise, quality 90) of --size: max, mean
   and 99.9th percentile of |GPU − CPU| per pixel; gated on the mean ≤ 1 (nvJPEG and
   libjpeg-turbo round their IDCT and chroma upsampling differently: ±1–2 levels, more on
   a few edge pixels).
3. speed: the CPU decode (`decode_image`: PIL, EXIF, RGB) in one process, and the same × the
   cores left to decode tasks (all but one per GPU actor: the decode stage's ceiling here),
   against JpegDecoder on batches of the GPU actors' batch size (16), host copy included.
   Reported, not gated.

`--device cpu` decodes the "GPU" side with torchvision's CPU decoder: a check of this
module. Writes FILE.md and FILE.json; exits 1 when a gate is missed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rayseg.pipeline.decode import decode_batch, decode_image, decode_images

BATCH = 16  # the GPU actors' batch size (pipeline/resources.py)
MEAN_DIFF_GATE = 1.0


def photo_like(count: int, height: int, width: int) -> list[bytes]:
    """JPEG files (quality 90) of smooth gradients with noise: detail for the decoders to differ in."""
    rng = np.random.default_rng(25)
    y, x = np.mgrid[0:height, 0:width]
    files = []
    for index in range(count):
        base = np.stack([(x + 7 * index) % 256, (y * 255) // max(1, height - 1), (x + y + index) % 256], axis=2)
        pixels = np.clip(base + rng.integers(-24, 25, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def rows_check(decoder, workdir: Path) -> dict:
    """The mixed files through the switch's path against the CPU decode's rows."""
    from tests.test_gpu_decode import FILES

    workdir.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (workdir / name).write_bytes(data)
    names = [*FILES, "missing.jpg"]
    batch = {"image_id": np.array(names, dtype=object), "uri": np.array([str(workdir / n) for n in names], dtype=object)}
    (left,) = decode_images(batch, jpegs_for_actor=True)
    got, want = decoder(left), decode_batch(batch)
    same = all(list(got[key]) == list(want[key]) for key in ("status", "error", "height", "width"))
    diffs = [
        int(np.abs(a.astype(int) - b.astype(int)).max(initial=0)) for a, b in zip(got["image"], want["image"]) if a.shape == b.shape
    ]
    return {"rows": len(names), "same_status_error_size": same, "max_pixel_diff": max(diffs, default=0)}


def pixels_check(files: list[bytes], device: str) -> dict:
    from rayseg.pipeline.gpu_decode import decode_jpegs

    diffs = []
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        for got, data in zip(decode_jpegs(chunk, device), chunk):
            diffs.append(np.abs(got.astype(np.int16) - decode_image(data).astype(np.int16)).ravel())
    every = np.concatenate(diffs)
    return {"max": int(every.max()), "mean": float(every.mean()), "p999": float(np.percentile(every, 99.9))}


def speed(files: list[bytes], decoder, height: int, width: int) -> dict:
    """Images/s of the CPU decode (one process, and × the decode tasks' cores) and of the GPU decoder."""
    started = time.perf_counter()
    for data in files:
        decode_image(data)
    cpu_rate = len(files) / (time.perf_counter() - started)
    decoder.decode(files[:BATCH], [(height, width)] * min(BATCH, len(files)))  # warm-up: nvJPEG's handles, CUDA context
    started = time.perf_counter()
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        decoder.decode(chunk, [(height, width)] * len(chunk))
    gpu_rate = len(files) / (time.perf_counter() - started)
    task_cores = max(1, (os.cpu_count() or 1) - 1)
    return {
        "cpu_one_process": cpu_rate,
        "decode_task_cores": task_cores,
        "cpu_decode_tasks": cpu_rate * task_cores,
        "gpu": gpu_rate,
        "gpu_faster_than_decode_tasks": gpu_rate > cpu_rate * task_cores,
    }


def markdown(result: dict) -> str:
    rows, pixels, rates = result["rows"], result["pixels"], result["speed"]
    height, width = result["size"]
    return "\n".join(
        [
            f"Decoder: {result['decoder']}; {result['images']} photo-like {height}×{width} JPEGs, batches of {BATCH}.",
            "",
            "| check | value | gate |",
            "|---|---|---|",
            f"| mixed files ({rows['rows']}): status, error, size equal to the CPU decode | {rows['same_status_error_size']} "
            f"(max pixel diff {rows['max_pixel_diff']}) | {'passed' if rows['same_status_error_size'] else '**failed**'} |",
            f"| \\|GPU − CPU\\| per pixel: mean / 99.9th pct / max | {pixels['mean']:.3f} / {pixels['p999']:.0f} / {pixels['max']} "
            f"| mean ≤ {MEAN_DIFF_GATE:g}: {'passed' if pixels['mean'] <= MEAN_DIFF_GATE else '**failed**'} |",
            f"| CPU decode, one process | {rates['cpu_one_process']:.1f} images/s | – |",
            f"| CPU decode tasks ({rates['decode_task_cores']} cores) | {rates['cpu_decode_tasks']:.1f} images/s | – |",
            f"| GPU decode (JpegDecoder, host copy included) | {rates['gpu']:.1f} images/s | "
            f"faster than the decode tasks: {'yes' if rates['gpu_faster_than_decode_tasks'] else 'no'} |",
        ]
    ) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", default="768x1024", help="HxW of the timed JPEGs")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("build/gpu_check/decode"))
    parser.add_argument("--report", type=Path, default=Path("build/gpu_check/decode.md"))
    args = parser.parse_args()
    height, width = (int(side) for side in args.size.lower().split("x"))
    import torch

    from rayseg.pipeline.gpu_decode import JpegDecoder

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device")
    decoder = JpegDecoder()
    decoder.device = args.device  # "cpu": torchvision's CPU decoder stands in for nvJPEG
    files = photo_like(args.images, height, width)
    result = {
        "decoder": "nvJPEG (torchvision decode_jpeg on cuda)" if args.device == "cuda" else "torchvision decode_jpeg on the CPU (self-check)",
        "images": args.images,
        "size": (height, width),
        "rows": rows_check(decoder, args.workdir),
        "pixels": pixels_check(files, args.device),
        "speed": speed(files, decoder, height, width),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(result))
    args.report.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(markdown(result), file=sys.stderr)
    return 0 if result["rows"]["same_status_error_size"] and result["pixels"]["mean"] <= MEAN_DIFF_GATE else 1


if __name__ == "__main__":
    sys.exit(main())
