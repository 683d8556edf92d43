"""The model registry: every model is listed with its builder, options and weights finder, and
a process imports only the model family it uses."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from rayseg.jobs.spec import parse_spec
from rayseg.models.registry import PIPELINE_ARGUMENTS, REGISTRY, model_options


def test_every_entry_resolves_its_builder_and_weights_finder():
    for entry in REGISTRY.values():
        assert callable(entry.build) and callable(entry.weights_file)
        assert entry.task in ("semantic", "instance", "panoptic", "promptable")
        assert "weights_sha256" not in model_options(entry.name)


def test_every_entry_declares_the_options_its_builder_takes_in_order():
    for name, entry in REGISTRY.items():
        parameters = inspect.signature(entry.build).parameters
        assert entry.options == tuple(p for p in parameters if p not in PIPELINE_ARGUMENTS), name


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
