"""Every registered model family on CUDA against the same model on the CPU (benchmarks/gpu_check.sh).

    .venv/bin/python -m benchmarks.gpu_parity --list            # the families, no torch imported
    .venv/bin/python -m benchmarks.gpu_parity [--families unet,sam] [--workdir DIR] [--report FILE.md]
        [--device cuda|cpu]

Each family is built from the same weights — random ones (seeded, as the tests build them:
tiny configs where the family has them), the bundled U-Net, a tiny OneFormer checkpoint made
as tests/test_oneformer.py makes it — and run on the same small shapes images on the CPU in
float32 and on --device in float32 (amp_dtype none, TF32 off), float16 and bfloat16.

Per image, each CPU segment is matched to the device's segment of its category with the
highest mask IoU. Gate (float32 only): as many segments on both, every one matched with IoU
≥ 0.99 and its score within 1e-3. float16/bfloat16 differences are reported, not gated:
reduced precision moves masks' edges and scores by design. `--device cpu` runs the CPU
against itself: a check of this module, not of a GPU.

Writes FILE.md (a Markdown section for the GPU check's report) and FILE.json; exits 1 when
a family misses the float32 gate or fails to run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

IOU_GATE = 0.99
SCORE_GATE = 1e-3
IMAGES = 2
IMAGE_SIZE = (64, 64)
# Permissive filters, as tests/test_gpu_path.py runs SAM: random masks survive to be compared.
SAM_PERMISSIVE = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# Per family: weights ("random", "bundled" or "tiny-checkpoint") and options, as the tests run them.
CASES: dict[str, tuple[str, dict]] = {
    "unet": ("bundled", {}),
    "fcn": ("random", {}),
    "deeplabv3": ("random", {}),
    "maskrcnn": ("random", {"min_size": 64, "max_size": 64, "max_detections": 10}),
    "maskrcnn_v2": ("random", {"min_size": 64, "max_size": 64, "max_detections": 10}),
    "sam": ("random", SAM_PERMISSIVE),
    "sam2": ("random", SAM_PERMISSIVE),
    # Semantic: one segment per class present, so random queries still give masks to compare.
    "maskformer": ("random", {"task": "semantic"}),
    "mask2former": ("random", {"task": "semantic"}),
    "sam3": ("random", {"text": ["circle"]}),
    "grounded-sam": ("random", {"text": ["circle"]}),
    "eomt": ("random", {}),
    "oneformer": ("tiny-checkpoint", {"task": "semantic"}),
}
# Segments kept down to score 0, as the tests keep them: random weights score low, and
# without segments there is nothing to compare.
SCORE_THRESHOLDS = dict.fromkeys(["maskrcnn", "maskrcnn_v2", "maskformer", "mask2former", "sam3", "eomt", "oneformer"], 0.0)
PRECISIONS = ("fp32", "fp16", "bf16")
AMP = {"fp32": "none", "fp16": "fp16", "bf16": "bf16"}


def families() -> list[str]:
    """Every registered family (ours and the installed outside ones), torch-free."""
    from rayseg.models.registry import REGISTRY

    return list(REGISTRY)


def tiny_oneformer(directory: Path) -> str:
    """A tiny random OneFormer checkpoint directory, made as tests/test_oneformer.py makes it."""
    import string

    import torch
    from transformers import (
        CLIPTokenizer,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
    )

    from tests.test_oneformer import CLASS_INFO, SEQ, tiny_config

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase:
            vocab[char + suffix] = len(vocab)
    (directory / "class_info.json").write_text(json.dumps(CLASS_INFO))
    image_processor = OneFormerImageProcessor(
        class_info_file="class_info.json", repo_path=str(directory), num_text=2, size={"shortest_edge": 64, "longest_edge": 128}
    )
    processor = OneFormerProcessor(
        image_processor=image_processor, tokenizer=CLIPTokenizer(vocab=vocab, merges=[]), max_seq_length=SEQ, task_seq_length=SEQ
    )
    torch.manual_seed(0)
    OneFormerForUniversalSegmentation(tiny_config()).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def weights_of(name: str, workdir: Path) -> tuple[str, dict]:
    """(weights, options) for family `name`; an outside family runs on random weights."""
    from rayseg.models.registry import get_entry

    kind, options = CASES.get(name, ("random", {}))
    if kind == "bundled":
        return get_entry(name).default_weights, options
    if kind == "tiny-checkpoint":
        return tiny_oneformer(workdir / name), options
    return "random", options


def shapes_images(workdir: Path) -> list[np.ndarray]:
    """IMAGES shapes fixtures, uint8 (H, W, 3)."""
    from rayseg.jobs.fixtures import make_fixtures
    from rayseg.pipeline.decode import decode_image

    made = make_fixtures(workdir / "fixtures", images=IMAGES, size=IMAGE_SIZE, seed=25)
    return [decode_image(path.read_bytes()) for path in sorted(Path(made.images_dir).glob("*.png"))]


def segments_of(name: str, weights: str, options: dict, device: str, amp: str, images: list[np.ndarray]) -> list:
    """The model's Segments per image, masks on the host."""
    import torch

    from rayseg.models.registry import build_model

    model = build_model(
        name, weights, device=device, score_threshold=SCORE_THRESHOLDS.get(name), **{**options, "amp_dtype": amp}
    )
    with torch.inference_mode():
        results = model.postprocess(model.forward(model.preprocess(images)), [image.shape[:2] for image in images])
    return [segments.on_host() for segments in results]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(want: list, got: list) -> dict:
    """CPU segments (`want`) against the device's (`got`), image by image: each CPU segment,
    best score first, matched to the unmatched device segment of its category with the
    highest mask IoU."""
    counts = {"cpu_segments": 0, "device_segments": 0, "matched": 0}
    ious, score_diffs = [], []
    for expected, actual in zip(want, got):
        counts["cpu_segments"] += len(expected)
        counts["device_segments"] += len(actual)
        free = set(range(len(actual)))
        for index in np.argsort(-np.asarray(expected.scores), kind="stable"):
            candidates = [j for j in free if actual.category_ids[j] == expected.category_ids[index]]
            if not candidates:
                continue
            overlaps = [iou(expected.masks[index], actual.masks[j]) for j in candidates]
            best = candidates[int(np.argmax(overlaps))]
            free.discard(best)
            counts["matched"] += 1
            ious.append(max(overlaps))
            score_diffs.append(abs(float(expected.scores[index]) - float(actual.scores[best])))
    return {
        **counts,
        "min_iou": min(ious) if ious else None,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "max_score_diff": max(score_diffs) if score_diffs else None,
    }


def gate(result: dict) -> bool:
    """The float32 gate: the same segments, masks IoU ≥ IOU_GATE, scores within SCORE_GATE."""
    same = result["cpu_segments"] == result["device_segments"] == result["matched"]
    return same and (result["matched"] == 0 or (result["min_iou"] >= IOU_GATE and result["max_score_diff"] <= SCORE_GATE))


def check_family(name: str, workdir: Path, device: str, images: list[np.ndarray]) -> dict:
    """One family: CPU float32 against --device in each precision; errors recorded, not raised."""
    started = time.perf_counter()
    try:
        weights, options = weights_of(name, workdir)
        reference = segments_of(name, weights, options, "cpu", "none", images)
    except Exception as e:  # noqa: BLE001 - a family that cannot run on the CPU is reported as such
        return {"family": name, "error": f"CPU run failed: {type(e).__name__}: {e}", "seconds": time.perf_counter() - started}
    result = {"family": name, "weights": weights, "options": options, "precisions": {}}
    for precision in PRECISIONS:
        try:
            result["precisions"][precision] = compare(reference, segments_of(name, weights, options, device, AMP[precision], images))
        except Exception as e:  # noqa: BLE001 - e.g. an op without a bfloat16 kernel: this precision's error
            result["precisions"][precision] = {"error": f"{type(e).__name__}: {e}"}
    fp32 = result["precisions"]["fp32"]
    result["passed"] = "error" not in fp32 and gate(fp32)
    result["seconds"] = time.perf_counter() - started
    return result


def _f(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: list[dict], device: str) -> str:
    lines = [
        f"CPU float32 against {device} (float32 with TF32 off; float16, bfloat16 reported only) on {IMAGES} "
        f"{IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} shapes images. Gate: the same segments, masks IoU ≥ {IOU_GATE}, "
        f"scores within {SCORE_GATE:g}.",
        "",
        "| family | precision | CPU segments | device segments | matched | min IoU | mean IoU | max score diff | gate | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['family']} | – | – | – | – | – | – | – | **failed**: {result['error'][:200]} | {result['seconds']:.1f} |")
            continue
        for precision, row in result["precisions"].items():
            if precision == "fp32":
                verdict = "passed" if result["passed"] else "**failed**"
                verdict += "" if row.get("cpu_segments") else " (no segments: nothing compared)"
            else:
                verdict = "reported"
            if "error" in row:
                lines.append(f"| {result['family']} | {precision} | – | – | – | – | – | – | error: {row['error'][:200]} | |")
                continue
            lines.append(
                f"| {result['family']} | {precision} | {row['cpu_segments']} | {row['device_segments']} | {row['matched']} | "
                f"{_f(row['min_iou'])} | {_f(row['mean_iou'])} | {_f(row['max_score_diff'], 6)} | {verdict} | "
                + (f"{result['seconds']:.1f} |" if precision == "fp32" else " |")
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the registered families and exit")
    parser.add_argument("--families", help="comma-separated (default: every registered family)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("build/gpu_check/parity"))
    parser.add_argument("--report", type=Path, default=Path("build/gpu_check/parity.md"))
    args = parser.parse_args()
    if args.list:
        print("\n".join(families()))
        return 0
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device")
        # float32 means float32: cuDNN would otherwise run convolutions in TF32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    names = [name.strip() for name in args.families.split(",")] if args.families else families()
    args.workdir.mkdir(parents=True, exist_ok=True)
    images = shapes_images(args.workdir)
    results = []
    for name in names:
        results.append(check_family(name, args.workdir, args.device, images))
        print(f"{name}: {'passed' if results[-1].get('passed') else 'FAILED'} ({results[-1]['seconds']:.1f} s)", file=sys.stderr, flush=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(results, args.device))
    args.report.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(result.get("passed") for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
