"""The model registry: every model is listed with its builder, options and weights finder, and
a process imports only the model family it uses."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from rayseg.jobs.spec import parse_spec
import pytest

from rayseg.models.registry import OPTION_KINDS, PIPELINE_ARGUMENTS, REGISTRY, check_options, model_options
from rayseg.models.weights import RANDOM, WeightsError
from rayseg.pipeline.segment import ModelSpec, pin_weights


def test_every_entry_resolves_its_builder_and_weights_finder():
    for entry in REGISTRY.values():
        assert callable(entry.build) and callable(entry.weights_file)
        assert entry.task in ("semantic", "instance", "panoptic", "promptable")
        assert "weights_sha256" not in model_options(entry.name)


def test_every_entry_declares_the_options_its_builder_takes_in_order():
    for name, entry in REGISTRY.items():
        parameters = inspect.signature(entry.build).parameters
        assert entry.options == tuple(p for p in parameters if p not in PIPELINE_ARGUMENTS), name


def test_every_option_has_a_kind_that_its_builders_default_fits():
    for name, entry in REGISTRY.items():
        parameters = inspect.signature(entry.build).parameters
        for option in entry.options:
            default = parameters[option].default
            assert OPTION_KINDS[option].problem(default) is None, (name, option, default)


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("maskrcnn", {"max_detections": -1}, "option max_detections must be at least 1, got -1"),
        ("maskrcnn", {"mask_threshold": "abc", "min_size": 1.5}, "option mask_threshold must be a number, got 'abc'; option min_size must be an integer"),
        ("fcn", {"resize": True}, "option resize must be an integer, got True"),
        ("sam", {"box_nms_thresh": 2}, "option box_nms_thresh must be between 0 and 1, got 2"),
        ("deeplabv3", {"category_file": 3}, "option category_file must be a str, got 3"),
    ],
)
def test_option_values_are_checked_before_any_work(model, options, message):
    with pytest.raises(ValueError, match=f"model '{model}': {message}"):
        check_options(model, options)


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


def test_importing_the_registry_or_building_the_unet_imports_no_other_family():
    code = (
        "import sys; from rayseg.models.registry import build_model; "
        "print(sorted(m for m in ('transformers', 'torchvision', 'rayseg.models.sam') if m in sys.modules)); "
        "build_model('unet', 'random'); "
        "print(sorted(m for m in ('transformers', 'torchvision', 'rayseg.models.sam') if m in sys.modules))"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert lines[:2] == ["[]", "[]"]


def test_unet_weights_default_to_the_bundled_ones_and_other_models_need_them():
    spec = parse_spec({"input": "in/", "output": "out/", "model": {"name": "unet"}})
    assert spec.model.weights == REGISTRY["unet"].default_weights
    assert Path(spec.model.weights).parent == Path(__file__).resolve().parents[1] / "models" / "bundled"
    assert all(entry.default_weights is None for name, entry in REGISTRY.items() if name != "unet")


def test_models_command_lists_every_model_with_its_weights_as_written():
    from typer.testing import CliRunner

    from rayseg.jobs.cli import app

    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert all(name in text for name in REGISTRY)
    assert "[default: the bundled unet-shapes weights]" in text


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
