"""Loading weights: checkpoints round-trip exactly, hashes are enforced, bad files are refused,
random init is loud, the registry builds protocol-conforming models, and nothing is unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pathlib
import pickle

import numpy as np
import pytest
import torch

from rayseg.models.base import SegmentationModel
from rayseg.models.categories import SHAPES, Category
from rayseg.models.registry import REGISTRY, build_model, get_entry
from rayseg.models.unet import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    UNet,
    UNetConfig,
    UNetSegmenter,
    load_unet,
    save_unet,
    unet_weights_file,
)
from rayseg.models.weights import WeightsError


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from threads, and idle threads spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_tiny_unet(seed: int = 0, width: int = 4, depth: int = 2) -> UNet:
    """A tiny U-Net whose batch-norm statistics are not the defaults, so buffers must round-trip too."""
    torch.manual_seed(seed)
    network = UNet(UNetConfig(categories=list(SHAPES), width=width, depth=depth))
    network.train()
    with torch.no_grad():
        network(torch.randn(2, 3, 8, 8) * 3 + 1)
    return network.eval()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype, key
        assert torch.equal(state_a[key], state_b[key]), key


def assert_same_outputs(a: UNet, b: UNet) -> None:
    x = torch.randn(2, 3, 11, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture
def checkpoint(tmp_path):
    """(network, checkpoint directory, sha256 returned by save_unet)."""
    network = trained_tiny_unet()
    directory = tmp_path / "ckpt"
    digest = save_unet(network, str(directory))
    return network, directory, digest


# --- round trip ------------------------------------------------------------------------------


def test_save_writes_a_config_and_a_safetensors_file(checkpoint):
    network, directory, _ = checkpoint
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert UNetConfig.from_json((directory / CONFIG_FILE).read_text()) == network.config


@pytest.mark.parametrize("form", ["directory", "directory/", "safetensors file", "file:// uri", "file:// uri file"])
def test_a_saved_checkpoint_loads_back_identically(checkpoint, form):
    network, directory, saved_digest = checkpoint
    weights = {
        "directory": str(directory),
        "directory/": str(directory) + "/",
        "safetensors file": str(directory / WEIGHTS_FILE),
        "file:// uri": directory.as_uri(),
        "file:// uri file": (directory / WEIGHTS_FILE).as_uri(),
    }[form]
    loaded, digest = load_unet(weights)
    assert not loaded.training
    assert loaded.config == network.config
    assert_same_state(loaded, network)
    assert_same_outputs(loaded, network)
    expected = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert digest == expected == saved_digest


def test_batch_norm_statistics_are_part_of_the_checkpoint(checkpoint):
    _, directory, _ = checkpoint
    loaded, _ = load_unet(str(directory))
    fresh = UNet(loaded.config)
    assert not torch.equal(loaded.stem[1].running_mean, fresh.stem[1].running_mean)


def test_weights_file_of_a_checkpoint_is_its_safetensors():
    assert unet_weights_file("/ckpt") == "/ckpt/model.safetensors"
    assert unet_weights_file("/ckpt/") == "/ckpt/model.safetensors"
    assert unet_weights_file("s3://bucket/run/") == "s3://bucket/run/model.safetensors"
    assert unet_weights_file("/ckpt/best.safetensors") == "/ckpt/best.safetensors"


# --- sha256 ----------------------------------------------------------------------------------


def test_the_right_sha256_loads(checkpoint):
    network, directory, digest = checkpoint
    loaded, returned = load_unet(str(directory), sha256=digest)
    assert returned == digest
    assert_same_state(loaded, network)


def test_sha256_is_compared_case_and_whitespace_insensitively(checkpoint):
    _, directory, digest = checkpoint
    _, returned = load_unet(str(directory), sha256=f"  {digest.upper()}\n")
    assert returned == digest


@pytest.mark.parametrize("wrong", ["0" * 64, "deadbeef", "<flip>"])
def test_a_wrong_sha256_is_refused(checkpoint, wrong):
    _, directory, digest = checkpoint
    if wrong == "<flip>":  # off by one hex digit
        wrong = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    with pytest.raises(WeightsError, match="sha256"):
        load_unet(str(directory), sha256=wrong)


def test_a_tampered_weights_file_fails_its_recorded_sha256(checkpoint):
    _, directory, digest = checkpoint
    path = directory / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the last tensor's data: still valid safetensors
    path.write_bytes(bytes(data))
    load_unet(str(directory))  # no digest given: loads (the file is still well-formed)
    with pytest.raises(WeightsError, match="sha256"):
        load_unet(str(directory), sha256=digest)


# --- refusals --------------------------------------------------------------------------------


def test_a_missing_checkpoint_directory_is_a_weights_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(WeightsError, match="no-such-checkpoint"):
        load_unet(str(missing))


def test_a_missing_weights_file_is_a_weights_error_naming_it(checkpoint):
    _, directory, _ = checkpoint
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError) as error:
        load_unet(str(directory))
    assert str(directory / WEIGHTS_FILE) in str(error.value)


def test_a_missing_config_is_a_weights_error_naming_it(checkpoint):
    _, directory, _ = checkpoint
    (directory / CONFIG_FILE).unlink()
    with pytest.raises(WeightsError) as error:
        load_unet(str(directory / WEIGHTS_FILE))
    assert str(directory / CONFIG_FILE) in str(error.value)


@pytest.mark.parametrize(
    "edit",
    [
        {"width": 8},
        {"depth": 3},
        {"categories": [{"id": 1, "name": "only"}]},
        {"categories": [{"id": i, "name": f"c{i}"} for i in range(1, 7)]},
    ],
    ids=["wider", "deeper", "fewer classes", "more classes"],
)
def test_weights_that_do_not_match_their_config_are_refused(checkpoint, edit):
    _, directory, _ = checkpoint
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(edit)
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="does not match"):
        load_unet(str(directory))


def test_a_config_of_another_architecture_is_refused(checkpoint):
    _, directory, _ = checkpoint
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["architecture"] = "mask2former"
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(WeightsError):
        load_unet(str(directory))


def test_a_truncated_weights_file_is_a_weights_error(checkpoint):
    _, directory, _ = checkpoint
    path = directory / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_unet(str(directory))


class _Tripwire:
    """Unpickling this creates `marker`: proof that the loader executed pickled code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_posing_as_safetensors_is_refused_without_being_executed(checkpoint, tmp_path, writer):
    _, directory, _ = checkpoint
    marker = tmp_path / "pickle-was-executed"
    payload = {"stem.0.weight": torch.zeros(4, 3, 3, 3), "evil": _Tripwire(marker)}
    buffer = io.BytesIO()
    if writer == "torch.save":
        torch.save(payload, buffer)
    else:
        pickle.dump(payload, buffer)
    (directory / WEIGHTS_FILE).write_bytes(buffer.getvalue())
    # The payload really is armed: a naive unpickler runs it.
    buffer.seek(0)
    torch.load(buffer, weights_only=False) if writer == "torch.save" else pickle.load(buffer)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        load_unet(str(directory))
    assert not marker.exists()


# --- random weights --------------------------------------------------------------------------


def test_random_weights_are_logged_loudly_and_have_no_sha256(caplog):
    with caplog.at_level(logging.WARNING, logger="rayseg.models"):
        network, digest = load_unet("random")
    assert digest is None
    assert isinstance(network, UNet) and not network.training
    warnings = [r for r in caplog.records if r.name == "rayseg.models" and r.levelno == logging.WARNING]
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in warnings)


def test_random_weights_predict_the_shapes_categories():
    network, _ = load_unet("random")
    assert network.config.categories == SHAPES


def test_a_real_checkpoint_does_not_warn_about_random_weights(checkpoint, caplog):
    _, directory, _ = checkpoint
    with caplog.at_level(logging.WARNING, logger="rayseg.models"):
        load_unet(str(directory))
    assert not any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)


# --- registry --------------------------------------------------------------------------------


def test_registry_has_the_unet_as_a_semantic_model():
    assert "unet" in REGISTRY
    entry = get_entry("unet")
    assert entry is REGISTRY["unet"]
    assert entry.name == "unet"
    assert entry.task == "semantic"
    assert entry.weights_file("/ckpt") == "/ckpt/model.safetensors"


def test_an_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="nope") as error:
        get_entry("nope")
    for name in REGISTRY:
        assert name in str(error.value)


def test_building_with_random_weights_gives_a_segmentation_model(caplog):
    with caplog.at_level(logging.WARNING, logger="rayseg.models"):
        model = build_model("unet", "random")
    assert isinstance(model, SegmentationModel)
    assert model.name == "unet"
    assert model.task == "semantic"
    assert model.categories == SHAPES
    assert model.weights_sha256 is None
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)
    image = np.random.default_rng(0).integers(0, 256, (9, 5, 3), dtype=np.uint8)
    (segments,) = model.postprocess(model.forward(model.preprocess([image])), [(9, 5)])
    assert segments and all(s.mask.shape == (9, 5) for s in segments)


def test_building_from_a_checkpoint_predicts_exactly_what_the_saved_network_did(checkpoint):
    network, directory, digest = checkpoint
    model = build_model("unet", str(directory), weights_sha256=digest, device="cpu")
    assert isinstance(model, SegmentationModel)
    assert model.weights_sha256 == digest
    reference = UNetSegmenter(network)

    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(12, 9, 3), (5, 16, 3), (12, 9, 3)]]
    sizes = [image.shape[:2] for image in images]
    got = model.postprocess(model.forward(model.preprocess(images)), sizes)
    want = reference.postprocess(reference.forward(reference.preprocess(images)), sizes)
    assert len(got) == len(want) == len(images)
    for got_segments, want_segments in zip(got, want):
        assert [s.category_id for s in got_segments] == [s.category_id for s in want_segments]
        for g, w in zip(got_segments, want_segments):
            np.testing.assert_array_equal(g.mask, w.mask)
            assert g.score == w.score


def test_building_with_a_wrong_sha256_is_refused(checkpoint):
    _, directory, _ = checkpoint
    with pytest.raises(WeightsError, match="sha256"):
        build_model("unet", str(directory), weights_sha256="f" * 64)


def test_build_options_reach_the_model(checkpoint):
    _, directory, _ = checkpoint
    model = build_model("unet", str(directory), score_threshold=0.75)
    assert model.score_threshold == 0.75
    assert model.weights == str(directory)


def test_categories_come_from_the_checkpoint_config(tmp_path):
    torch.manual_seed(0)
    categories = [Category(10, "road", False), Category(20, "car", True)]
    save_unet(UNet(UNetConfig(categories=categories, width=4, depth=2)), str(tmp_path / "c"))
    model = build_model("unet", str(tmp_path / "c"))
    assert model.categories == categories
