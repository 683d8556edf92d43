"""The model registry: every family is listed with its builder, options class and weights
finder; outside families register through an entry point; an option value the driver
accepts is one the builder accepts; a process imports only the model family it uses."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.jobs.spec import SpecError, parse_spec
from rayseg.models.options import ModelOptions
from rayseg.models.registry import OURS, REGISTRY, check_options, get_entry
from rayseg.models.weights import RANDOM, WeightsError
from rayseg.pipeline.segment import ModelSpec, pin_weights

from .test_oneformer import checkpoint as oneformer_checkpoint  # noqa: F401 (a fixture)


def test_every_entry_names_an_options_class_a_weights_finder_and_a_builder_that_imports():
    import importlib

    for entry in REGISTRY.values():
        module, _, function = entry.builder.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), entry.name
        assert issubclass(entry.options, ModelOptions) and callable(entry.weights_file), entry.name
        assert entry.task in ("semantic", "instance", "panoptic", "promptable")
        assert "weights_sha256" not in entry.options.model_fields


def _bounds(field) -> dict:
    return {key: getattr(c, key) for c in field.metadata for key in ("ge", "le", "lt") if hasattr(c, key)}


def _candidates(field) -> list:
    """The values an option's own definition accepts at its edges: each choice, None where
    it may be None, its bounds (just below an open one), its default."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    choices = [v for a in [annotation, *args] if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
    values = [field.default, *choices, *([None] if optional else [])]
    kind = next((a for a in [annotation, *args] if a in (int, float)), None)
    bounds = _bounds(field)
    if kind is not None:
        # Far values where a side is unbounded: what the driver lets through there too.
        values += [bounds.get("ge", -1000), bounds.get("le", bounds.get("lt", 1000 + (kind is int)) - (kind is int or 1e-6 if "lt" in bounds else 0))]
    return [kind(v) if kind is not None and v is not None else v for v in values]


def edge_option_sets(options: type[ModelOptions]) -> list[dict]:
    """Option sets at the edges of what `options` defines: every option at its first edge,
    every option at its last, and each other edge value of each option alone. Options that
    name files (category files) are left at their defaults: their values are checked by
    reading the file (tests of each family). A text-prompted family's phrases are its input,
    given in every set (tests/test_text_prompts.py checks their values)."""
    fields = {name: f for name, f in options.model_fields.items() if "file" not in name and name not in ("categories", "text")}
    candidates = {name: _candidates(f) for name, f in fields.items()}
    sets = [{name: values[1 if len(values) > 1 else 0] for name, values in candidates.items()},
            {name: values[-1] for name, values in candidates.items()}]  # fmt: skip
    sets += [{name: value} for name, values in candidates.items() for value in values[1:-1]]
    phrases = {"text": ["circle"]} if "text" in options.model_fields else {}
    return [{**phrases, **options_set} for options_set in sets]


def _weights(name: str, oneformer: Path) -> str:
    return str(oneformer) if not get_entry(name).random_weights else RANDOM


@pytest.mark.parametrize("name", [entry.name for entry in OURS] + ["threshold"])
def test_every_option_value_the_driver_accepts_the_builder_accepts(name, oneformer_checkpoint):
    entry = get_entry(name)
    weights = _weights(name, oneformer_checkpoint)
    accepted = 0
    for options in edge_option_sets(entry.options):
        try:
            check_options(name, options, weights)
        except ValueError:
            continue  # the driver refuses the combination: nothing reaches a builder
        entry.build(weights, device="cpu", **options)  # raises if the builder disagrees
        accepted += 1
    assert accepted >= 2, f"{name}: the edge sets should mostly be accepted"


def test_sam_thresholds_outside_0_to_1_are_refused_on_the_driver_not_in_every_actor():
    """They passed the driver's check, then every actor raised (exit 1 after Ray started)."""
    for option in ("pred_iou_thresh", "stability_score_thresh"):
        with pytest.raises(ValueError, match=f"model 'sam': option {option} must be between 0 and 1, got 1.5"):
            check_options("sam", {option: 1.5})
    result = CliRunner().invoke(
        app, ["segment", "in/", "out/", "--model", "sam", "--weights", "random", "--model-option", "pred_iou_thresh=1.5"]
    )
    assert result.exit_code == 2, result.output
    assert "pred_iou_thresh must be between 0 and 1, got 1.5" in result.output


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("maskrcnn", {"max_detections": -1}, "option max_detections must be at least 1, got -1"),
        ("maskrcnn", {"mask_threshold": "abc", "min_size": 1.5}, "option mask_threshold must be a number, got 'abc'; option min_size must be an integer"),
        ("maskrcnn", {"mask_threshold": 1.0}, "option mask_threshold must be at least 0 and below 1, got 1.0"),
        ("maskrcnn", {"min_size": 900, "max_size": 800}, "need min_size ≤ max_size, got min_size=900, max_size=800"),
        ("fcn", {"resize": True}, "option resize must be an integer, got True"),
        ("sam", {"box_nms_thresh": 2}, "option box_nms_thresh must be between 0 and 1, got 2"),
        ("sam", {"model_type": "vit_x"}, "option model_type must be one of vit_b, vit_l, vit_h, got 'vit_x'"),
        ("sam", {"categories": ["a"], "category_file": "c.json"}, "give categories or category_file, not both"),
        ("sam", {"crops_n_layers": 1, "points_per_side": 2, "crop_n_points_downscale_factor": 4}, "leaves no points"),
        ("deeplabv3", {"category_file": 3}, "option category_file must be a string, got 3"),
        ("unet", {"task": "panoptic"}, "option task must be one of semantic, instance, got 'panoptic'"),
        ("maskformer", {"amp_dtype": "fp8"}, "option amp_dtype must be one of auto, fp16, bf16, none, got 'fp8'"),
        ("unet", {"max_detections": 5}, "does not take option.s. max_detections; it takes: amp_dtype, task, min_area"),
    ],
)
def test_option_values_are_checked_before_any_work(model, options, message):
    with pytest.raises(ValueError, match=f"model '{model}'.*{message}"):
        check_options(model, options)


def test_options_that_depend_on_the_weights_format_are_checked_with_the_weights():
    check_options("sam", {"model_type": "vit_b"}, "s3://b/sam_vit_b.pth")
    with pytest.raises(ValueError, match="model_type and vit_num_heads apply to segment-anything .pth checkpoints"):
        check_options("sam", {"model_type": "vit_b"}, "s3://b/sam-hf-directory")
    with pytest.raises(SpecError, match="model_type and vit_num_heads apply"):
        parse_spec({"input": "in/", "output": "out/", "model": {"name": "sam", "weights": "/hf/sam", "options": {"vit_num_heads": 2}}})


def test_good_and_null_option_values_pass():
    check_options("sam", {"points_per_side": 4, "pred_iou_thresh": 1, "model_type": None, "vit_num_heads": 2})
    check_options("fcn", {"resize": None, "category_file": "voc.json"})


def test_a_category_file_and_random_weights_are_checked_on_the_driver(tmp_path):
    with pytest.raises(ValueError, match=f"category file not found: {tmp_path / 'none.json'}"):
        pin_weights(ModelSpec("fcn", RANDOM, options={"category_file": str(tmp_path / "none.json")}))
    (tmp_path / "bad.json").write_text('{"categories": [{"name": "x"}]}')
    with pytest.raises(ValueError, match="category file .*bad.json: category entry 0 must be a name or a dict"):
        pin_weights(ModelSpec("fcn", RANDOM, options={"category_file": str(tmp_path / "bad.json")}))
    with pytest.raises(WeightsError, match="oneformer has no random weights"):
        pin_weights(ModelSpec("oneformer", RANDOM))


def test_an_outside_family_is_found_through_its_entry_point_and_runs_like_ours():
    """tests/example_family is installed as its own distribution (`make install`); its
    pyproject.toml names `threshold_family:ENTRY` in the `rayseg.models` group."""
    import importlib.metadata

    import numpy as np

    points = importlib.metadata.entry_points(group="rayseg.models")
    assert "threshold_family:ENTRY" in [point.value for point in points]
    entry = get_entry("threshold")
    assert entry not in OURS and entry.builder == "threshold_family.model:build_threshold"
    with pytest.raises(ValueError, match="model 'threshold': option level must be between 0 and 254, got 255"):
        check_options("threshold", {"level": 255})
    model = entry.build(RANDOM, level=200)
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[0, 0] = (201, 200, 255)
    (segments,) = model.postprocess(model.forward(model.preprocess([image])), [(2, 3)])
    assert [(s.category_id, int(s.mask.sum())) for s in segments] == [(1, 1), (2, 0), (3, 1)]


def test_a_broken_outside_family_is_left_out_with_a_warning_naming_it(tmp_path):
    """A plug-in that does not import never hides the other models."""
    info = tmp_path / "broken_family-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[rayseg.models]\nbroken = broken_family_missing:ENTRY\n")
    code = (
        "import logging; logging.basicConfig(); from rayseg.models.registry import REGISTRY; "
        "print(sorted(REGISTRY))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert "'broken' (broken_family_missing:ENTRY) does not load" in run.stderr
    assert "unet" in run.stdout and "threshold" in run.stdout and "broken" not in run.stdout


def test_importing_the_registry_or_building_the_unet_imports_no_other_family():
    code = (
        "import sys; from rayseg.models.registry import REGISTRY, build_model; "
        "print(sorted(m for m in ('transformers', 'torchvision', 'rayseg.models.sam', 'torch') if m in sys.modules)); "
        "sorted(REGISTRY); "
        "print(sorted(m for m in ('transformers', 'torchvision', 'rayseg.models.sam', 'torch') if m in sys.modules)); "
        "build_model('unet', 'random'); "
        "print(sorted(m for m in ('transformers', 'torchvision', 'rayseg.models.sam') if m in sys.modules))"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert lines[:3] == ["[]", "[]", "[]"], "outside families' registrations import no torch either"


def test_unet_weights_default_to_the_bundled_ones_and_other_models_need_them():
    spec = parse_spec({"input": "in/", "output": "out/", "model": {"name": "unet"}})
    assert spec.model.weights == REGISTRY["unet"].default_weights
    assert Path(spec.model.weights).parent == Path(__file__).resolve().parents[1] / "models" / "bundled"
    assert all(entry.default_weights is None for name, entry in REGISTRY.items() if name != "unet")


def test_models_command_lists_every_model_with_its_weights_within_80_columns_uncut():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in result.stdout, max(lines, key=len)
    text = " ".join(result.stdout.split())
    assert all(f"│ {name} " in result.stdout for name in REGISTRY)
    assert "[default: the bundled" in text and "unet-shapes weights]" in text  # wrapped in its cell
    assert "options, scores and thresholds of one model: rayseg models NAME" in text


@pytest.mark.parametrize("name", ["unet", "maskrcnn"])
def test_random_weights_are_the_same_in_every_process_and_leave_its_random_state_alone(name):
    import torch

    from rayseg.models.registry import build_model

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = build_model(name, RANDOM).network.state_dict()
    assert torch.equal(torch.rand(3), expected), "the caller's random sequence goes on as if nothing was built"
    second = build_model(name, RANDOM).network.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name", [entry.name for entry in OURS] + ["threshold"])
def test_rayseg_models_name_lists_every_option_with_its_values_and_meaning_within_80_columns(name):
    result = CliRunner().invoke(app, ["models", name], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    entry = get_entry(name)
    for option, field in entry.options.model_fields.items():
        assert any(line.startswith(f"  {option}: ") and f"default {field.default}" in line for line in lines), option
    assert lines[0] == f"{name}: {entry.task}"


def test_an_unknown_model_or_option_suggests_the_closest_name():
    result = CliRunner().invoke(app, ["models", "unett"])
    assert result.exit_code == 2 and "unknown model 'unett' (did you mean unet?)" in result.output
    with pytest.raises(ValueError, match=r"points_per_sid \(did you mean points_per_side\?\)"):
        check_options("sam", {"points_per_sid": 3})
    result = CliRunner().invoke(app, ["segment", "in/", "out/", "--model", "maskrcn"])
    assert result.exit_code == 2 and "did you mean maskrcnn?" in result.output
