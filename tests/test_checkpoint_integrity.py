"""A checkpoint file that is not whole is found on the driver, without loading it
(models/checkpoint_integrity.py)."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from rayseg.models.checkpoint_integrity import checkpoint_problem

STATE = {"conv.weight": torch.ones(4, 3, 3, 3), "conv.bias": torch.zeros(4), "steps": torch.tensor([7])}


def problem(name: str, data: bytes) -> str | None:
    return checkpoint_problem(name, data[:64], len(data), lambda: io.BytesIO(data))


def torch_saved(**options) -> bytes:
    buffer = io.BytesIO()
    torch.save(STATE, buffer, **options)
    return buffer.getvalue()


def test_whole_checkpoints_pass():
    assert problem("model.safetensors", safetensors_bytes(STATE)) is None
    assert problem("fcn.pth", torch_saved()) is None
    assert problem("pytorch_model.bin", torch_saved()) is None


def test_a_header_longer_than_the_bytes_given_is_read_again():
    data = safetensors_bytes(STATE)
    assert checkpoint_problem("model.safetensors", data[:10], len(data), lambda: io.BytesIO(data)) is None


@pytest.mark.parametrize("keep", [0, 7, 20, -1, -100])
def test_a_truncated_safetensors_file_is_found(keep):
    data = safetensors_bytes(STATE)
    assert problem("model.safetensors", data[:keep]) is not None


def test_a_safetensors_file_with_bytes_beyond_its_tensors_is_found():
    assert "describes" in problem("model.safetensors", safetensors_bytes(STATE) + b"\0" * 16)


def test_a_safetensors_header_whose_ranges_do_not_fit_their_shapes_is_found():
    data = safetensors_bytes(STATE)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["conv.bias"]["shape"] = [5]
    edited = json.dumps(header).encode()
    assert "tensor 'conv.bias'" in problem("model.safetensors", struct.pack("<Q", len(edited)) + edited + data[8 + length :])


def test_something_else_named_safetensors_is_found():
    assert "not a safetensors file" in problem("model.safetensors", b"\x80\x04" + b"pickle" * 20)


@pytest.mark.parametrize("keep", [-1, -30, 100])
def test_a_truncated_torch_save_archive_is_found(keep):
    assert "torch.save archive" in problem("fcn.pth", torch_saved()[:keep])


def test_torch_s_legacy_format_is_left_to_its_loader():
    assert problem("old.pth", torch_saved(_use_new_zipfile_serialization=False)) is None
