"""transformers checkpoint directories, read offline from a local path or any fsspec URI.

A directory holds config.json, model.safetensors (or pytorch_model.bin, which transformers
reads with `weights_only=True`) and the processor's settings. A remote directory's
top-level files are copied to a local temp dir first; models are then built with
`from_pretrained(local_files_only=True)`, so nothing is ever fetched from a hub. Shared by
the transformers families (models/sam.py, models/maskformer.py, models/oneformer.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .checkpoint_files import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE
from .weights import WeightsError, file_sha256

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


@dataclass(frozen=True)
class HFCheckpoint:
    """An opened checkpoint directory: `local` holds its files, `uri` is where they came
    from (named in errors), `config` its config.json, `digest` its weights file's sha256."""

    local: str
    uri: str
    config: dict
    digest: str

    def has(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.local, name))


def checkpoint_directory(weights: str) -> str:
    """The directory of `weights`: itself, or the directory of a weights file named in it."""
    base = weights.rstrip("/")
    return posixpath.dirname(base) if base.endswith((".safetensors", ".bin")) else base


@contextlib.contextmanager
def open_checkpoint(
    weights: str, model_types: tuple[str, ...], sha256: str | None = None, storage_options: dict | None = None
) -> Iterator[HFCheckpoint]:
    """The checkpoint directory of `weights`, local for the duration: its config.json's
    model_type one of `model_types` and its weights file's digest equal to `sha256` (when
    given), else a WeightsError naming the directory."""
    directory = checkpoint_directory(weights)
    with _local_directory(directory, storage_options) as local:
        config = _read_config(local, directory, model_types)
        yield HFCheckpoint(local, directory, config, _weights_digest(local, directory, sha256))


@contextlib.contextmanager
def _local_directory(uri: str, storage_options: dict | None) -> Iterator[str]:
    """A local directory with the files of checkpoint directory `uri`: the directory itself
    when local, else a temp copy of its top-level files."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(root):
            raise WeightsError(f"weights not found: {uri} is not a checkpoint directory")
        yield root
        return
    try:
        entries = fs.ls(root.rstrip("/"), detail=True)
    except FileNotFoundError:
        raise WeightsError(f"weights not found: {uri}") from None
    with tempfile.TemporaryDirectory(prefix="rayseg-hf-") as local:
        for entry in entries:
            if entry.get("type") == "file":
                name = posixpath.basename(entry["name"].rstrip("/"))
                # get_file takes the path as written; get() would read "[", "*", "?" as a glob.
                fs.get_file(entry["name"], os.path.join(local, name))
        yield local


def _read_config(directory: str, uri: str, model_types: tuple[str, ...]) -> dict:
    config = read_json(directory, uri, CONFIG_FILE)
    if config is None:
        raise WeightsError(f"{uri} is not a checkpoint directory: {CONFIG_FILE} not found")
    if config.get("model_type") not in model_types:
        raise WeightsError(
            f"{uri} holds a {config.get('model_type')!r} checkpoint, not {' or '.join(map(repr, model_types))} "
            f"({CONFIG_FILE} model_type)"
        )
    return config


def read_json(directory: str, uri: str, name: str) -> dict | None:
    """The JSON file `name` of the local checkpoint directory, None when it has none."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise WeightsError(f"{uri}: {name} is not valid JSON: {e}") from e


def _weights_digest(directory: str, uri: str, sha256: str | None) -> str:
    """The sha256 of the directory's weights file (checked against `sha256`)."""
    for name in (SAFETENSORS_FILE, BIN_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return file_sha256(path, sha256, posixpath.join(uri, name))
    raise WeightsError(f"{uri} is not a checkpoint directory: {SAFETENSORS_FILE} (or {BIN_FILE}) not found")


def load_pretrained(cls, checkpoint: HFCheckpoint, tied_keys: tuple[str, ...] = ()):
    """`cls.from_pretrained` of the checkpoint, offline, float32, in eval mode; weights that
    are missing (other than `tied_keys`, stored once and shared) or mismatched are an error."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing keys are ours to report, below
    try:
        network, info = cls.from_pretrained(checkpoint.local, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise WeightsError(f"{checkpoint.uri}: cannot load the checkpoint: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [key for key in info.get("missing_keys", []) if not key.endswith(tied_keys)]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise WeightsError(f"{checkpoint.uri} does not match its config: missing {missing[:5]}, mismatched {mismatched[:5]}")
    return network.float().eval()


def load_with_processor(
    network_cls, processor_cls, weights: str, model_types: tuple[str, ...], sha256: str | None, storage_options: dict | None
) -> tuple[Any, Any, dict, str]:
    """(network, image processor, config.json, weights digest) of a checkpoint directory that
    must hold its processor's settings (`load_pretrained`, `processor_cls.from_pretrained`)."""
    with open_checkpoint(weights, model_types, sha256, storage_options) as checkpoint:
        required_processor_settings(checkpoint)  # present and readable, else a WeightsError naming it
        try:
            processor = processor_cls.from_pretrained(checkpoint.local, local_files_only=True)
        except (OSError, TypeError, ValueError) as e:
            raise WeightsError(f"{checkpoint.uri}: cannot build {processor_cls.__name__} from its settings: {e}") from e
        network = load_pretrained(network_cls, checkpoint)
    return network, processor, checkpoint.config, checkpoint.digest


def processor_settings(checkpoint: HFCheckpoint) -> dict | None:
    """The image processor's settings: preprocessor_config.json, or processor_config.json's
    `image_processor` (what newer transformers save) with the whole file as `_processor`;
    None when the directory has neither."""
    data = read_json(checkpoint.local, checkpoint.uri, PREPROCESSOR_FILE)
    if data is not None:
        return data
    data = read_json(checkpoint.local, checkpoint.uri, PROCESSOR_FILE)
    if data is None:
        return None
    if "image_processor" not in data:
        raise WeightsError(f"{checkpoint.uri}: {PROCESSOR_FILE} has no image_processor")
    return {**data["image_processor"], "_processor": data}


def required_processor_settings(checkpoint: HFCheckpoint) -> dict:
    """`processor_settings`, which this family cannot do without."""
    settings = processor_settings(checkpoint)
    if settings is None:
        raise WeightsError(
            f"{checkpoint.uri} is not a complete checkpoint directory: {PREPROCESSOR_FILE} (or {PROCESSOR_FILE}) "
            "not found — the image processor's settings are needed to preprocess images as the model was trained"
        )
    return settings


# Keys of a processor's saved settings that are not arguments of its constructor.
_NOT_PROCESSOR_ARGUMENTS = {"image_processor_type", "processor_class", "_processor", "metadata", "repo_path", "class_info_file"}


def processor_arguments(settings: dict) -> dict:
    """The processor's saved settings as its constructor's keyword arguments."""
    return {k: v for k, v in settings.items() if k not in _NOT_PROCESSOR_ARGUMENTS}
