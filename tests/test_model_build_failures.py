"""A model that cannot be built fails the run with one message naming the model, the
weights and the reason: on the driver (exit 2, before any cluster work) where the
checkpoint's config.json and safetensors header tell, else in the actors (exit 1), before
any image is marked failed."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.models.categories import SHAPES
from rayseg.models.registry import REGISTRY
from rayseg.models.unet import UNet, UNetConfig, save_unet
from rayseg.models.weights import WeightsError
from rayseg.pipeline.segment import ModelSpec, pin_weights

from .test_maskformer import checkpoints as maskformer_checkpoints  # noqa: F401 (a fixture)

UNET = REGISTRY["unet"].default_weights


def rayseg(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_a_checkpoint_of_another_family_is_refused_on_the_driver(maskformer_checkpoints):
    with pytest.raises(WeightsError, match="model 'maskformer' cannot run weights .*unet-shapes: it holds a None checkpoint, not 'maskformer'"):
        pin_weights(ModelSpec("maskformer", UNET))
    with pytest.raises(WeightsError, match="model 'mask2former' cannot run weights .*: it holds a 'maskformer' checkpoint, not 'mask2former'"):
        pin_weights(ModelSpec("mask2former", maskformer_checkpoints["maskformer"]))
    with pytest.raises(WeightsError, match="model 'unet' cannot run weights .*: its config.json is not a rayseg U-Net config .model_type 'maskformer'."):
        pin_weights(ModelSpec("unet", maskformer_checkpoints["maskformer"]))


def test_a_category_file_naming_labels_the_checkpoint_lacks_is_refused_on_the_driver(maskformer_checkpoints, tmp_path):
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"id": 0, "name": "a"}, {"id": 40, "name": "far"}]))
    spec = ModelSpec("maskformer", maskformer_checkpoints["maskformer"], options={"category_file": str(categories)})
    with pytest.raises(WeightsError, match=r"the category file names ids \[40\] that the checkpoint does not predict"):
        pin_weights(spec)


def test_a_unet_whose_head_disagrees_with_its_config_is_refused_on_the_driver(tmp_path):
    directory = tmp_path / "unet"
    save_unet(UNet(UNetConfig(width=4, depth=2)), str(directory))
    config = json.loads((directory / "config.json").read_text())
    config["categories"] = config["categories"][:3]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=f"its config lists 3 categories, its head predicts {len(SHAPES)} classes"):
        pin_weights(ModelSpec("unet", str(directory)))


def test_the_command_line_exits_2_with_the_reason_and_writes_nothing(shapes, tmp_path):
    output = tmp_path / "out"
    result = rayseg("segment", shapes.images_dir, output, "--model", "maskformer", "--weights", UNET)
    assert result.exit_code == 2
    assert "model 'maskformer' cannot run weights" in " ".join(result.output.split())
    assert not output.exists()


def test_a_model_that_fails_in_its_actors_fails_the_run_with_one_message_and_no_error_rows(ray_cluster, shapes, tmp_path):
    """A safetensors file is no torchvision .pth, which the driver cannot read without
    unpickling: the actors find out. The run fails once (exit 1), naming the model, the
    weights and the reason; no image is marked failed and nothing is committed."""
    weights = tmp_path / "not-a-pth.safetensors"
    shutil.copy(f"{UNET}/model.safetensors", weights)
    shutil.copy(f"{UNET}/config.json", tmp_path / "config.json")
    output = tmp_path / "out"
    result = rayseg("segment", shapes.images_dir, output, "--model", "fcn", "--weights", weights, "--limit", "2")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert f"run failed: model 'fcn' cannot be built from weights {weights}: {weights} is not a torch state dict" in message
    assert "Traceback" not in result.output and "RayTaskError" not in result.output
    assert not list(output.rglob("*.parquet")), "no row, error rows included, is staged or committed"


def test_an_outside_familys_build_error_is_reported_the_same_way(ray_cluster, shapes, tmp_path):
    weights = f"{UNET}/model.safetensors"
    result = rayseg("segment", shapes.images_dir, tmp_path / "out", "--model", "threshold", "--weights", weights, "--limit", "1")
    assert result.exit_code == 1
    assert "model 'threshold' cannot be built from weights" in " ".join(result.output.split())
    assert "the threshold model has no weights" in result.output
