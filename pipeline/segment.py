"""The pipeline as a Python API: a lazy `ray.data.Dataset` in, a lazy dataset of output rows out.

    ds = read_source("s3://bucket/images")                # {image_id, uri}
    rows = segment(ds, ModelSpec("unet", "weights/"), plan_resources(ray.cluster_resources()))
    summary = write_run(rows, "s3://bucket/out", run_id=..., run_info={...})

`segment` also takes a dataset of decoded images (`image` uint8 (H, W, 3), `image_id`,
optional `uri`), e.g. from `ray.data.read_images`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import replace

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from ..models.categories import Category, load_category_file
from ..models.checkpoint_checks import CheckpointInfo, safetensors_shapes
from ..models.checkpoint_files import CONFIG_FILE
from ..models.checkpoint_integrity import checkpoint_problem
from ..models.registry import check_options, check_score_threshold, get_entry
from ..models.text_prompts import TOKENIZER_FILE, byte_tokenizer, text_categories
from ..models.weights import RANDOM, WeightsError, check_sha256, stream_sha256
from .actor import SegmentImages, SegmentImagesAndEncode
from .decode import (
    DECODE_TASK_MEMORY,
    DEFAULT_MAX_PIXELS,
    EMPTY_IMAGE,
    MODEL_MAX_PIXELS,
    DecodeError,
    as_rgb,
    decode_images_in_task,
    object_array,
)
from .encode import encode_batch
from .model_spec import ModelSpec
from .resources import Resources
from .schema import STATUS_ERROR, STATUS_OK
from .sources import ROWS_PER_BLOCK, SourceError
from .storage import filesystem, full_uri


def pin_weights(spec: ModelSpec, storage_options: dict | None = None) -> ModelSpec:
    """`spec` with `weights_sha256` set to the checkpoint's digest, read once on the driver.

    Checks the checkpoint exists, is whole (`models/checkpoint_integrity.py`) and matches a
    given sha256 before any actor starts; every actor then verifies the same digest, so all
    of them load identical weights.
    """
    entry = get_entry(spec.name)
    check_options(spec.name, spec.options, spec.weights)
    check_score_threshold(spec.name, spec.score_threshold)
    categories = _file_categories(spec, storage_options)
    phrases = _phrase_categories(spec, categories)
    text = None if phrases is None else [category.name for category in phrases]
    if spec.weights == RANDOM:
        if not entry.random_weights:
            raise WeightsError(f"{spec.name} has no random weights (its weights: {entry.weights})")
        if entry.checkpoint_check is not None and text is not None:
            tokenizer = byte_tokenizer().to_str()  # the random models' own
            if problem := entry.checkpoint_check(CheckpointInfo(None, None, categories, text, tokenizer)):
                raise WeightsError(f"model {spec.name!r} cannot run weights {spec.weights}: {problem}")
        return spec
    uri = entry.weights_file(spec.weights, storage_options)
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            actual, head, size = stream_sha256(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise WeightsError(f"weights not found: {uri}") from None
    if problem := checkpoint_problem(path, head, size, lambda: fs.open(path, "rb")):
        raise WeightsError(f"weights unusable: {uri}: {problem}")
    config = None
    # A safetensors/bin checkpoint (ours, HF's) is read with the config.json beside it.
    if path.endswith((".safetensors", ".bin")):
        config = _read_config(fs, posixpath.join(posixpath.dirname(path), CONFIG_FILE), posixpath.basename(path))
    if entry.checkpoint_check is not None:
        shapes = safetensors_shapes(head) if path.endswith(".safetensors") else None
        tokenizer = None
        if text is not None:
            tokenizer = _read_text(fs, posixpath.join(posixpath.dirname(path), TOKENIZER_FILE))
        if problem := entry.checkpoint_check(CheckpointInfo(config, shapes, categories, text, tokenizer)):
            raise WeightsError(f"model {spec.name!r} cannot run weights {spec.weights}: {problem}")
    return replace(spec, weights_sha256=check_sha256(actual, spec.weights_sha256, uri))


def _file_categories(spec: ModelSpec, storage_options: dict | None) -> list[Category] | None:
    """The categories of the run's category file, None without one (ValueError naming it)."""
    if spec.options.get("category_file") is None:
        return None
    return load_category_file(spec.options["category_file"], storage_options)


def _phrase_categories(spec: ModelSpec, file_categories: list[Category] | None) -> list[Category] | None:
    """A text-prompted run's categories, one per phrase (ValueError: a phrase the category
    file lacks); None for a family that takes no text."""
    if "text" not in get_entry(spec.name).options.model_fields:
        return None
    return text_categories(spec.options.get("text"), file_categories)


def declared_categories(spec: ModelSpec, storage_options: dict | None = None) -> dict:
    """For a run's `_run.json`: a text-prompted run's categories, one per phrase, known on
    the driver ({"categories": [...]}, which `export dataset` lists whether found or not);
    {} for other families, whose categories their checkpoints hold."""
    phrases = _phrase_categories(spec, _file_categories(spec, storage_options))
    return {} if phrases is None else {"categories": [category.to_dict() for category in phrases]}


def _read_text(fs, path: str) -> str | None:
    """A checkpoint file's text; None when it has no such file."""
    try:
        with fs.open(path, "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def _read_config(fs, path: str, beside: str) -> dict:
    """The checkpoint's config.json; WeightsError when it is missing or no JSON object."""
    try:
        with fs.open(path, "rb") as f:
            config = json.loads(f.read())
    except FileNotFoundError:
        raise WeightsError(f"weights incomplete: {full_uri(fs, path)} is missing beside {beside}") from None
    except ValueError as e:
        raise WeightsError(f"weights unusable: {full_uri(fs, path)} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"weights unusable: {full_uri(fs, path)} is not a JSON object")
    return config


def _as_decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows that arrive already decoded: each image made uint8 (H, W, 3) as a decoded file
    would be (`decode.as_rgb`), size from it; an array that is no image is an error row."""
    images, errors = [], []
    for pixels in batch["image"]:
        try:
            images.append(as_rgb(pixels))
            errors.append(None)
        except DecodeError as e:
            images.append(EMPTY_IMAGE)
            errors.append(str(e))
    count = len(images)
    return {
        **batch,
        "image": object_array(images),
        "uri": batch.get("uri", np.full(count, None, dtype=object)),
        "height": np.array([image.shape[0] for image in images], dtype=np.int32),
        "width": np.array([image.shape[1] for image in images], dtype=np.int32),
        "status": np.array([STATUS_OK if error is None else STATUS_ERROR for error in errors], dtype=object),
        "error": np.array(errors, dtype=object),
    }


def _input_columns(dataset: ray.data.Dataset) -> set[str]:
    """The dataset's columns, checked: `image_id`, and `uri` or a decoded `image`.

    Ray knows most sources' columns without running anything; behind a map (e.g.
    `read_images` plus an `image_id`) it runs the first block to tell. An empty dataset
    has no columns to check.
    """
    schema = dataset.schema(fetch_if_missing=False) or dataset.schema()
    if schema is None:
        return set()
    columns = set(schema.names)
    if "image_id" not in columns or not columns & {"uri", "image"}:
        raise SourceError(
            f"segment() takes rows of image_id and uri, or image_id and a decoded image; "
            f"this dataset has {sorted(columns)}"
        )
    return columns


def segment(
    dataset: ray.data.Dataset,
    model: ModelSpec,
    resources: Resources,
    *,
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model_max_pixels: int = MODEL_MAX_PIXELS,
    decoded: bool | None = None,
    error_tally=None,
) -> ray.data.Dataset:
    """{image_id, uri} (or decoded `image`) rows → output rows (pipeline/schema.py), lazily.

    max_pixels: larger images are refused (error rows) from their headers.
    model_max_pixels: larger images are downscaled for the model; masks come back full size.
    decoded: whether rows already carry an `image`; by default taken from the dataset's
    columns, which are checked (SourceError).
    error_tally: an ErrorTally (`pipeline/progress.py`) the actors tell of error rows.

    Unless `model` is already pinned (`pin_weights`), checks its weights on the driver
    first (WeightsError), so a bad checkpoint fails before any cluster work.
    """
    if model.weights_sha256 is None:
        model = pin_weights(model, storage_options)
    if decoded is None:
        decoded = "image" in _input_columns(dataset)
    decode_options = {"storage_options": storage_options, "max_pixels": max_pixels}
    actors_decode = not decoded and resources.cpu_stages_in_actors
    # GPU actors decode the JPEGs, the decode tasks the rest (pipeline/gpu_decode.py).
    gpu_decode = not decoded and resources.gpu_decode
    if decoded:
        rows = dataset.map_batches(_as_decoded, num_cpus=resources.task_cpus, udf_modifying_row_count=False)
    elif actors_decode:
        rows = dataset
    else:
        rows = dataset.map_batches(
            decode_images_in_task,
            fn_kwargs={**decode_options, "jpegs_for_actor": gpu_decode},
            num_cpus=resources.task_cpus,
            # What a decode task holds at most: a batch of pixels and the files it came
            # from. Declaring it also keeps decode a stage of its own: Ray fuses a task
            # stage into the actor when their resource requests are equal.
            memory=DECODE_TASK_MEMORY,
            udf_modifying_row_count=False,
        )
    actor_options = {
        "storage_options": storage_options,
        "torch_threads": resources.torch_threads,
        "model_max_pixels": model_max_pixels,
        "batch_size": resources.batch_size,
        "error_tally": error_tally,
    }
    if actors_decode:
        actor_options["decode_options"] = decode_options
    if gpu_decode:
        actor_options["gpu_decode"] = {"max_pixels": max_pixels}
    inferred = rows.map_batches(
        # CPU actors are the whole chain (decode, infer, encode); GPU actors infer only.
        SegmentImagesAndEncode if resources.cpu_stages_in_actors else SegmentImages,
        fn_constructor_args=(model,),
        fn_constructor_kwargs=actor_options,
        compute=ActorPoolStrategy(
            min_size=resources.min_actors, max_size=resources.max_actors, initial_size=resources.initial_actors
        ),
        # CPU actors take whole blocks, which cost Ray one call and one output table each,
        # and batch them for the model themselves (the sources make blocks of a few hundred
        # rows). GPU actors take decoded pixels, one model batch at a time.
        batch_size=None if resources.cpu_stages_in_actors else resources.batch_size,
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
        udf_modifying_row_count=False,
    )
    if resources.cpu_stages_in_actors:
        return inferred
    return inferred.map_batches(
        encode_batch, batch_format="pyarrow", num_cpus=resources.task_cpus, udf_modifying_row_count=False
    )


def without_done(dataset: ray.data.Dataset, done_ids: ray.data.Dataset | None, partitions: int) -> ray.data.Dataset:
    """`dataset` minus the rows whose image_id is in `done_ids`: a distributed anti-join,
    so no process ever holds every done id."""
    if done_ids is None:
        return dataset
    return dataset.join(
        done_ids,
        join_type="left_anti",
        num_partitions=partitions,
        on=("image_id",),
        # The join's aggregators finish before inference starts; a quarter CPU each keeps
        # them schedulable next to a running actor pool on small machines.
        aggregator_ray_remote_args={"num_cpus": 0.25},
        # A join gives one block per partition (335k rows each for a million-row manifest
        # resumed on 2 CPUs): cut again into the sources' blocks, the actors take a block at
        # a time and the progress and the files advance with them.
    ).repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
