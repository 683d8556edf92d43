"""The benchmark harness: the model's bare forward, a hand-written loop and rayseg, back to back.

    make bench                      # = .venv/bin/python -m benchmarks.harness
    .venv/bin/python -m benchmarks.harness [--models unet,maskrcnn,sam,trivial] [--images 500]
        [--startup-images 16] [--workdir build/bench] [--report build/bench/report.md]
        [--unet-weights DIR] [--device cpu|cuda]

For each model, on the same generated images (`rayseg fixtures`, made once per size and
count) and the same weights, the phases run one after the other, each in a fresh process
(benchmarks/harness_phases.py says exactly what each does and how it is measured), each
twice: over the first --startup-images images (short) and over all --images (full):

1. ceiling — `model.forward` over images decoded and preprocessed beforehand, one process;
2. parallel — the same bare forward in one single-threaded process per core (a reference:
   rayseg's CPU actors are data parallel, which one process cannot be);
3. baseline — one process: PIL decode → model → pycocotools RLE → pyarrow Parquet, what a
   user writes instead of rayseg (for the trivial model also over multiprocessing.Pool(2));
4. rayseg — `rayseg segment` on a local Ray started as the CLI starts it (ray.init reported
   apart, and not measured).

Reported per phase: the steady state — the full run minus the short one: (N − n) images
over the difference in wall time, and the difference in CPU-seconds (user + sys of every
process of the phase, Ray's included) per image — and the fixed start-up: the short run's
wall time minus its n images at the steady rate (for rayseg without ray.init, which is
reported apart); the full run's wall time, overall images/s and CPU-s/image, peak PSS of
the process tree and first output; then rayseg/ceiling and rayseg/baseline, and the goals on
this 2-core CPU machine (steady state, ≥ 500 images): throughput ≥ 0.90× the ceiling's,
CPU-seconds per image ≤ 1.10× the ceiling's, fixed start-up ≤ 3 s, and with the trivial model
throughput ≥ 1.3× the single-process loop. Every phase uses the pipeline's batch size on this
machine (`plan_resources`); the single-process phases run torch on every core, as torch does
by default, and rayseg its own plan. On a host shared with other
work, run it as `OMP_WAIT_POLICY=PASSIVE …` (benchmarks/maskrcnn_overhead.py says why); the
report records the setting.

With --device cuda (benchmarks/gpu_check.sh) the single-process phases run the model on the
GPU and rayseg its GPU actors (the cluster has the GPU); `parallel`, a reference for CPU
actors, is left out.

Models (on the CPU unless --device cuda):
- unet: the trained shapes U-Net — the registry's bundled weights, or --unet-weights DIR
  (config.json + model.safetensors) — on 128×128 images; copied into the workdir first so
  every phase loads the same file.
- maskrcnn: torchvision's maskrcnn_resnet50_fpn with random weights *calibrated to detect*
  (benchmarks/maskrcnn_overhead.py; no trained Mask R-CNN can be obtained on this machine),
  on 240×320 images run at their own size (min_size 240, max_size 320).
- sam: the tiny random SAM config, widened so masks vary (benchmarks/sam_overhead.py), on
  256×256 images, automatic mode with 8×8 points and permissive filters (so masks survive).
- trivial: three channel thresholds (the `threshold` model of tests/example_family, an outside model
  family that `make install` installs), 128×128 images.

Writes REPORT (Markdown) and REPORT with .json (everything measured); each phase's log and
output under WORKDIR/runs/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.registry import REGISTRY
from rayseg.models.unet import CONFIG_FILE, WEIGHTS_FILE
from rayseg.pipeline.resources import plan_resources

from .common import machine
from .harness_phases import INFERENCE_OPERATOR, PhaseConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURE_SEED = 10
MODEL_PHASES = ("ceiling", "parallel", "baseline", "rayseg")
SAM_POINTS = 8

# Goals on this 2-core CPU machine, steady state, at least GOAL_IMAGES images.
GOAL_IMAGES = 500
THROUGHPUT_VS_CEILING = 0.90
CPU_VS_CEILING = 1.10
TRIVIAL_THROUGHPUT_VS_BASELINE = 1.3
STARTUP_S = 3.0


@dataclass(frozen=True)
class BenchModel:
    """A model as the harness runs it: fixture size (H, W), rayseg name, weights, options."""

    key: str
    registry_name: str
    size: tuple[int, int]
    weights: str
    options: dict
    phases: tuple[str, ...]
    about: str


def fixtures(workdir: Path, size: tuple[int, int], images: int) -> Path:
    """WORKDIR/fixtures-HxW-N/images, generated once."""
    directory = workdir / f"fixtures-{size[0]}x{size[1]}-{images}"
    if len(list((directory / "images").glob("*.png"))) != images:
        make_fixtures(directory, images=images, size=size, seed=FIXTURE_SEED)
    return directory / "images"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unet_model(workdir: Path, weights: Path | None) -> BenchModel:
    source = weights or Path(REGISTRY["unet"].default_weights)
    if not (source / WEIGHTS_FILE).is_file():
        raise SystemExit(
            f"no trained U-Net at {source} (the bundled weights are not installed yet): give --unet-weights DIR "
            f"(a directory with {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    snapshot = workdir / "unet-weights"
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # a training run may still be rewriting the source
        shutil.copyfile(source / name, snapshot / name)
    config = json.loads((snapshot / CONFIG_FILE).read_text())
    about = (
        f"trained U-Net from {source} (width {config['width']}, depth {config['depth']}, "
        f"{len(config['categories'])} classes; model.safetensors sha256 {sha256_of(snapshot / WEIGHTS_FILE)[:16]}…)"
    )
    return BenchModel("unet", "unet", (128, 128), str(snapshot), {}, MODEL_PHASES, about)


def maskrcnn_model(workdir: Path) -> BenchModel:
    from .maskrcnn_overhead import calibrated_checkpoint, load_images

    height, width = size = (240, 320)
    calibration = load_images(fixtures(workdir, size, 6))
    checkpoint = calibrated_checkpoint(workdir, calibration, min_size=height, max_size=width)
    about = (
        "torchvision maskrcnn_resnet50_fpn, random weights calibrated to detect (no trained Mask R-CNN can be "
        f"obtained here; benchmarks/maskrcnn_overhead.py), run at the images' own size (min_size {height}, max_size {width})"
    )
    options = {"min_size": height, "max_size": width}
    return BenchModel("maskrcnn", "maskrcnn", size, str(checkpoint), options, MODEL_PHASES, about)


def sam_model(workdir: Path) -> BenchModel:
    from .sam_overhead import PERMISSIVE, checkpoint

    about = (
        "the tiny random SAM config widened so masks vary (benchmarks/sam_overhead.py), automatic mode, "
        f"{SAM_POINTS}×{SAM_POINTS} points, permissive filters"
    )
    options = {"points_per_side": SAM_POINTS, **PERMISSIVE}
    return BenchModel("sam", "sam", (256, 256), str(checkpoint(workdir)), options, MODEL_PHASES, about)


def trivial_model() -> BenchModel:
    about = "three channel thresholds (> 127), no torch in the forward (tests/example_family)"
    return BenchModel("trivial", "threshold", (128, 128), "random", {}, ("ceiling", "baseline", "pool", "rayseg"), about)


def run_phase(config: PhaseConfig, run_dir: Path) -> dict:
    """Runs one phase in a fresh process; its log is kept beside its result."""
    run_dir.mkdir(parents=True)
    config_path, result_path, log_path = run_dir / "config.json", run_dir / "result.json", run_dir / "log.txt"
    config_path.write_text(json.dumps(asdict(config), indent=2))
    # Ray's workers import the benchmarks' modules (stage_clock.py) from the repository root.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.harness_phases", str(config_path), str(result_path)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if process.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{config.model} {config.phase} failed (exit {process.returncode}), {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def steady_state(short: dict, full: dict) -> dict:
    """What the full run added over the short one: images/s and CPU-s per image, and the
    fixed start-up (the short run's wall time minus its images at that rate)."""
    images = full["images"] - short["images"]
    seconds = full["wall_s"] - short["wall_s"]
    rate = images / seconds if images > 0 and seconds > 0 else None  # None: noise swamped the difference
    return {
        "steady_images_per_s": rate,
        "steady_cpu_s_per_image": (full["cpu_s"] - short["cpu_s"]) / images if images > 0 else None,
        "fixed_startup_s": None if rate is None else short["wall_s"] - short["images"] / rate,
    }


def assess(model: BenchModel, phases: dict[str, dict]) -> dict:
    """The ratios rayseg/ceiling and rayseg/baseline (steady state) and each goal's verdict."""
    rayseg, ceiling, baseline = (phases[name]["steady"] for name in ("rayseg", "ceiling", "baseline"))
    ratios = {
        "throughput_vs_ceiling": ratio(rayseg["steady_images_per_s"], ceiling["steady_images_per_s"]),
        "cpu_vs_ceiling": ratio(rayseg["steady_cpu_s_per_image"], ceiling["steady_cpu_s_per_image"]),
        "throughput_vs_baseline": ratio(rayseg["steady_images_per_s"], baseline["steady_images_per_s"]),
        "cpu_vs_baseline": ratio(rayseg["steady_cpu_s_per_image"], baseline["steady_cpu_s_per_image"]),
    }
    if "parallel" in phases:
        ratios["throughput_vs_parallel"] = ratio(rayseg["steady_images_per_s"], phases["parallel"]["steady"]["steady_images_per_s"])
    if "pool" in phases:
        ratios["pool_throughput_vs_baseline"] = ratio(phases["pool"]["steady"]["steady_images_per_s"], baseline["steady_images_per_s"])
    if model.key == "trivial":
        goals = [("throughput ≥ 1.3× the single-process loop", ratios["throughput_vs_baseline"], TRIVIAL_THROUGHPUT_VS_BASELINE, ">=")]
    else:
        goals = [
            ("throughput ≥ 0.90× the ceiling", ratios["throughput_vs_ceiling"], THROUGHPUT_VS_CEILING, ">="),
            ("CPU-s/image ≤ 1.10× the ceiling", ratios["cpu_vs_ceiling"], CPU_VS_CEILING, "<="),
        ]
    goals.append(("fixed start-up (without ray.init) ≤ 3 s", rayseg["fixed_startup_s"], STARTUP_S, "<="))
    verdicts = [
        {
            "goal": name,
            "value": value,
            "target": target,
            "met": None if value is None else (value >= target if sense == ">=" else value <= target),
        }
        for name, value, target, sense in goals
    ]
    return {"ratios": ratios, "goals": verdicts}


# --- the report --------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _met(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def _operator_check(rayseg: dict) -> str:
    """The full run's inference rate between its first and last output, and over its second
    half of outputs (the pool grown, the start behind it); and how the two runs' starts
    differed: a difference in start-up is charged to the steady state."""
    short, full = rayseg["short"], rayseg["full"]
    stage = next((stage for name, stage in full["stages"].items() if INFERENCE_OPERATOR in name), None)
    if stage is None or stage["last_output"] <= stage["first_output"]:
        return "no inference output to time."
    rate = (stage["rows"] - full["first_rows"]) / (stage["last_output"] - stage["first_output"])
    half_time, half_rows = next((at, rows) for at, rows in stage["timeline"] if rows >= stage["rows"] / 2)
    second_half = (
        f", {(stage['rows'] - half_rows) / (stage['last_output'] - half_time):.2f} images/s over its second half"
        if stage["last_output"] > half_time
        else ""
    )
    return (
        f"the full run's inference stage put out {rate:.2f} images/s between its first and last output{second_half}; "
        f"first output {short['first_output_s']:.2f} s (short run) and {full['first_output_s']:.2f} s (full run), "
        f"after the last {short['tail_s']:.2f} s and {full['tail_s']:.2f} s."
    )


def markdown(report: dict) -> str:
    lines = [
        "# rayseg benchmark: bare forward vs hand-written loop vs rayseg",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; device {report['device']}; OMP_WAIT_POLICY {report['omp_wait_policy']}; "
        f"load average {', '.join(f'{x:.1f}' for x in report['load_average_start'])} at start, "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_end'])} at end  ",
        f"Started {report['started']}, git {report['git']}; {report['images']} images per model (short runs: "
        f"{report['startup_images']}); "
        f"batch size {report['batch_size']} (the pipeline's default here); {report['torch_threads']} torch threads in the "
        "single-process phases (torch's default: every core), one per process in `parallel`, the pipeline's plan in rayseg.",
        "",
    ]
    if report["images"] < GOAL_IMAGES:
        lines += [f"**{report['images']} images is below the goals' {GOAL_IMAGES}: the verdicts are indicative only.**", ""]
    lines += ["## Goals", "", "| model | goal | value | verdict |", "|---|---|---|---|"]
    for key, result in report["models"].items():
        for goal in result["assessment"]["goals"]:
            lines.append(f"| {key} | {goal['goal']} | {_f(goal['value'])} | {_met(goal['met'])} |")
    for key, result in report["models"].items():
        phases = result["phases"]
        height, width = result["size"]
        lines += [
            "",
            f"## {key}",
            "",
            f"{result['about']}; {height}×{width} images.",
            "",
            "| phase | images/s (steady) | CPU-s/image (steady) | fixed start-up s | full run: wall s | images/s | CPU-s/image | first output s | peak PSS MiB | segments |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, phase in phases.items():
            steady, full = phase["steady"], phase["full"]
            lines.append(
                f"| {name} | {_f(steady['steady_images_per_s'])} | {_f(steady['steady_cpu_s_per_image'], 4)} | "
                f"{_f(steady['fixed_startup_s'])} | {_f(full['wall_s'])} | {_f(full['images_per_s'])} | "
                f"{_f(full['cpu_s_per_image'], 4)} | {_f(full['first_output_s'])} | {full['peak_pss_mib']:.0f} | {full.get('segments', '–')} |"
            )
        ratios = result["assessment"]["ratios"]
        rayseg = phases["rayseg"]["full"]
        lines += [
            "",
            f"rayseg/ceiling: throughput ×{_f(ratios['throughput_vs_ceiling'], 3)}, CPU-s/image ×{_f(ratios['cpu_vs_ceiling'], 3)}; "
            f"rayseg/baseline: throughput ×{_f(ratios['throughput_vs_baseline'], 3)}, CPU-s/image ×{_f(ratios['cpu_vs_baseline'], 3)}"
            + (f"; rayseg/parallel forward throughput ×{_f(ratios['throughput_vs_parallel'], 3)}" if "parallel" in phases else "")
            + (f"; Pool({phases['pool']['full']['processes']})/baseline throughput ×{_f(ratios['pool_throughput_vs_baseline'], 3)}" if "pool" in phases else "")
            + f". ray.init {rayseg['ray_init_s']:.2f} s (not in rayseg's numbers); up to {rayseg['actors']} actor(s) × "
            f"{rayseg['cpus_per_actor']:g} CPU × {rayseg['actor_threads']} torch thread(s), tasks {rayseg['task_cpus']:g} CPU; after the last inference output "
            f"{rayseg['tail_s']:.2f} s to the committed run.",
            "",
            f"Cross-check of rayseg's steady state, which assumes both runs start alike: {_operator_check(phases['rayseg'])}",
            "",
            "rayseg, where the CPU went (full run, CPU-s): "
            + ", ".join(f"{name} {cpu:.2f}" for name, cpu in sorted(rayseg["by_process_cpu_s"].items(), key=lambda kv: -kv[1]) if cpu >= 0.01),
            "",
            "| rayseg stage (Ray Data operator) | first output s | last output s | rows | in steps |",
            "|---|---|---|---|---|",
        ]
        for name, stage in rayseg["stages"].items():
            lines.append(f"| {name} | {stage['first_output']:.2f} | {stage['last_output']:.2f} | {stage['rows']} | {stage['steps']} |")
    return "\n".join(lines) + "\n"


def git_revision() -> str:
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,maskrcnn,sam,trivial", help="comma-separated: unet, maskrcnn, sam, trivial")
    parser.add_argument("--images", type=int, default=GOAL_IMAGES)
    parser.add_argument(
        "--startup-images", type=int, default=16, help="images of the short runs the steady state is measured against"
    )
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--report", type=Path, default=Path("build/bench/report.md"))
    parser.add_argument("--unet-weights", type=Path, help="trained U-Net directory (default: the bundled weights)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the bare forward and loops run")
    args = parser.parse_args()
    if not 1 <= args.startup_images < args.images:
        parser.error("need 1 ≤ --startup-images < --images")
    keys = [key.strip() for key in args.models.split(",") if key.strip()]
    unknown = sorted(set(keys) - {"unet", "maskrcnn", "sam", "trivial"})
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The batch size of the actors rayseg will run: GPU actors' with --device cuda.
    planned = plan_resources({"CPU": float(os.cpu_count()), **({"GPU": 1.0} if args.device == "cuda" else {})})
    threads = torch.get_num_threads()
    builders = {
        "unet": lambda: unet_model(workdir, args.unet_weights),
        "maskrcnn": lambda: maskrcnn_model(workdir),
        "sam": lambda: sam_model(workdir),
        "trivial": trivial_model,
    }
    runs = workdir / "runs" / time.strftime("%Y%m%dT%H%M%S")
    report = {
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.harness", *sys.argv[1:]]),
        "machine": machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": git_revision(),
        "load_average_start": os.getloadavg(),
        "images": args.images,
        "startup_images": args.startup_images,
        "batch_size": planned.batch_size,
        "torch_threads": threads,
        "device": args.device,
        "models": {},
    }
    for key in keys:
        model = builders[key]()
        images_dir = fixtures(workdir, model.size, args.images)
        base = PhaseConfig(
            model=key, phase="", registry_name=model.registry_name, weights=model.weights, images_dir=str(images_dir),
            images=0, output="", batch_size=planned.batch_size, torch_threads=threads, options=model.options,
            device=args.device,
        )  # fmt: skip
        phases = {}
        for phase in model.phases:
            if phase == "parallel" and args.device == "cuda":
                continue
            runs_of_phase = {}
            for length, images in (("short", args.startup_images), ("full", args.images)):
                run_dir = runs / f"{key}-{phase}-{length}"
                print(f"{key}: {phase}, {images} images …", file=sys.stderr, flush=True)
                config = replace(base, phase=phase, images=images, output=str(run_dir / "output"))
                runs_of_phase[length] = run_phase(config, run_dir)
            phases[phase] = {**runs_of_phase, "steady": steady_state(runs_of_phase["short"], runs_of_phase["full"])}
            steady = phases[phase]["steady"]
            print(
                f"{key}: {phase}: {_f(steady['steady_images_per_s'])} images/s, {_f(steady['steady_cpu_s_per_image'], 4)} "
                f"CPU-s/image (steady), fixed start-up {_f(steady['fixed_startup_s'])} s",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        report["models"][key] = {"about": model.about, "size": model.size, "phases": phases, "assessment": assess(model, phases)}
    report["load_average_end"] = os.getloadavg()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(report))
    args.report.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    print(f"report: {args.report} and {args.report.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
