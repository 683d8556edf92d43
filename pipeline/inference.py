"""Infer: the model run as a Ray Data actor pool, built once per actor.

Per model batch: model.preprocess → model.forward → model.postprocess (Segments whose masks
stay where the model made them), then the masks leave by one of two stages (`MasksOut`):
`PackedMasks`, bit-packed on the model's device for the encode stage after the actor
(GPU actors: pycocotools encoding is CPU work, not the accelerator's), or `EncodedMasks`,
RLE-encoded in the actor itself (CPU actors, which are that CPU stage: their masks are
never packed). A CPU actor also decodes its rows first (`ImageSegmenter`'s `decode`), one
model batch at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import ray
import torch
from PIL import Image

from ..models.base import Prompts, SegmentationModel
from ..models.registry import build_model
from ..models.segments import METADATA_FIELDS, Segments
from .decode import MODEL_MAX_PIXELS
from .device_masks import full_size_masks, masks_to_wire
from .encode import (
    NO_MASKS_ENCODED,
    encode_masks,
    fortran_masks,
    joined_encodings,
    output_table,
    segment_structs,
)
from .in_flight import Deaths, InFlightRecord
from .masks import masks_per_chunk
from .model_spec import ModelSpec
from .prompts import PROMPT_COLUMNS, PROMPT_ERROR
from .schema import INFERENCE_SCHEMA, OUTPUT_SCHEMA, STATUS_ERROR, STATUS_OK

log = logging.getLogger("rayseg.pipeline")

def prompts_of(batch: dict[str, np.ndarray], rows: list[int]) -> list[Prompts | None] | None:
    """The box prompts of `rows`, when the dataset carries prompt columns; else None.

    prompt_boxes: per row a list of [x0, y0, x1, y1]; a row without prompts has none.
    """
    if PROMPT_COLUMNS[0] not in batch:
        return None
    prompts: list[Prompts | None] = []
    for row in rows:
        boxes = batch["prompt_boxes"][row]
        if boxes is None or len(boxes) == 0:
            prompts.append(None)
            continue
        prompts.append(
            Prompts(
                boxes=np.asarray([np.asarray(box, dtype=np.float32) for box in boxes], dtype=np.float32).reshape(-1, 4),
                category_ids=np.asarray(batch["prompt_category_ids"][row], dtype=np.int32),
                annotation_ids=np.asarray(batch["prompt_annotation_ids"][row], dtype=np.int64),
            )
        )
    return prompts


# Rows an actor accumulates before it hands them on as one table. The table is made
# contiguous first: Ray serialises a table of many small chunks (one per model batch) into
# the object store ~25× slower than the same rows in one chunk.
ROWS_PER_OUTPUT = 256


# Models pad their input to a multiple of their stride (the U-Net's 2**depth, a detector's
# 32), and padding multiplies a very thin image: 1 × 5,000,000 pixels would become
# 32 × 5,000,000. So the padded size is held to twice the pixel budget as well, which leaves
# ordinary images alone.
PAD_MULTIPLE = 32


def _padded_pixels(height: int, width: int) -> int:
    return -(-height // PAD_MULTIPLE) * PAD_MULTIPLE * (-(-width // PAD_MULTIPLE) * PAD_MULTIPLE)


def fit_for_model(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """`image` (uint8 (H, W, 3)) itself when small enough, else a copy resized, keeping its
    aspect ratio as far as one-pixel sides allow, to at most `max_pixels` pixels and at most
    twice that once padded to a multiple of PAD_MULTIPLE."""

    def fits(height: int, width: int) -> bool:
        return height * width <= max_pixels and _padded_pixels(height, width) <= 2 * max_pixels

    height, width = image.shape[:2]
    if fits(height, width):
        return image
    scale = min(1.0, (max_pixels / (height * width)) ** 0.5)
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    while not fits(size[1], size[0]) and size != (1, 1):
        scale *= 0.95
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def scale_prompts(prompts: Prompts | None, image: np.ndarray, shown: np.ndarray) -> Prompts | None:
    """Box prompts in `image` pixels → the same boxes in the pixels of its downscaled `shown`."""
    if prompts is None or shown is image:
        return prompts
    factors = np.array([shown.shape[1] / image.shape[1], shown.shape[0] / image.shape[0]] * 2, dtype=np.float32)
    return dataclasses.replace(prompts, boxes=prompts.boxes * factors)


def scale_boxes(segments: Segments, image: np.ndarray, shown: np.ndarray) -> Segments:
    """Segments with boxes in the pixels of `shown` (`image` downscaled) → boxes in `image` pixels."""
    if shown is image:
        return segments
    return segments.with_scaled_boxes(image.shape[1] / shown.shape[1], image.shape[0] / shown.shape[0])


def select_device() -> torch.device:
    """CUDA when this process has a GPU, else the CPU, loudly when Ray gave this process
    GPUs that torch cannot use (a driver older than torch's CUDA build, say): the pool would
    otherwise run on CPUs with its GPUs idle, and nobody would know."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if ray.is_initialized() and ray.get_gpu_ids():
        log.warning(
            "this actor holds GPU %s but torch %s (CUDA %s) sees no CUDA device: running on the CPU. "
            "Check the node's NVIDIA driver against torch's CUDA version.",
            ray.get_gpu_ids(), torch.__version__, torch.version.cuda,
        )  # fmt: skip
    return torch.device("cpu")


class PackedMasks:
    """Masks leave as `pack_masks` bytes (packed on the model's device when they are there),
    in rows for the encode stage (INFERENCE_SCHEMA)."""

    schema = INFERENCE_SCHEMA
    none = b""

    def chunk(self, masks: torch.Tensor) -> bytes:
        return masks_to_wire(masks)

    def join(self, parts: list[bytes]) -> bytes:
        return b"".join(parts)

    def table(self, image_columns: dict, results: list[tuple[dict, bytes]]) -> pa.Table:
        return pa.table(
            {
                **image_columns,
                **{name: [metadata[name] for metadata, _ in results] for name in METADATA_FIELDS},
                "masks": [packed for _, packed in results],
            },
            schema=INFERENCE_SCHEMA,
        )


class EncodedMasks:
    """Masks leave as COCO RLE, encoded where the model left them, in output rows (OUTPUT_SCHEMA)."""

    schema = OUTPUT_SCHEMA
    none = NO_MASKS_ENCODED

    def chunk(self, masks: torch.Tensor) -> tuple:
        return encode_masks(fortran_masks(masks.cpu().numpy()))

    def join(self, parts: list[tuple]) -> tuple:
        return joined_encodings(parts)

    def table(self, image_columns: dict, results: list[tuple[dict, tuple]]) -> pa.Table:
        return output_table(image_columns, [segment_structs(metadata, encoded) for metadata, encoded in results])


MasksOut = PackedMasks | EncodedMasks


class ImageSegmenter:
    """An inference actor's work (`pipeline/actor.py` builds it in the actor): decoded rows
    (or, with `decode`, {image_id, uri} rows) → tables of `masks_out.schema`, each up to
    ROWS_PER_OUTPUT rows.

    A call takes any number of rows and puts them through the model `batch_size` at a time,
    decoding each model batch just before its forward pass: a call over a whole block of
    {image_id, uri} rows holds only one model batch of pixels. A model batch that fails is
    retried one image at a time, so one bad image costs only its own row (status "error"),
    never its neighbours'.
    """

    def __init__(
        self,
        model: ModelSpec,
        masks_out: MasksOut,
        *,
        decode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        storage_options: dict | None = None,
        torch_threads: int | None = None,
        model_max_pixels: int = MODEL_MAX_PIXELS,
        batch_size: int | None = None,
        in_flight: InFlightRecord | None = None,
    ):
        """masks_out: how masks leave (`PackedMasks` or `EncodedMasks`), and so the rows' schema.
        decode: the stage before the model for rows that arrive undecoded ({image_id, uri}):
        `decode_batch` with its options, run on each model batch just before its forward pass.
        batch_size: images per forward pass (default: a call's rows all at once).
        in_flight: where the images in hand are recorded, so that one which kills the process
        is found and given up on (`pipeline/in_flight.py`); None: not recorded."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = select_device()
        self.model: SegmentationModel = build_model(
            model.name,
            model.weights,
            weights_sha256=model.weights_sha256,
            device=str(self.device),
            storage_options=storage_options,
            score_threshold=model.score_threshold,
            **model.options,
        )
        self.labels = {category.id: category.name for category in self.model.categories}
        self.masks_out = masks_out
        self.decode = decode
        self.model_max_pixels = model_max_pixels
        self.batch_size = batch_size
        self.in_flight = in_flight
        log.info("built %s on %s", model.name, self.device)

    def _masks_out(self, masks: torch.Tensor | np.ndarray, size: tuple[int, int]) -> bytes | tuple:
        """bool (N, h, w) masks as the model left them (a tensor on its device, or a host
        array) → what leaves this actor for them at the image's full `size` (H, W), by
        `masks_out`. Brought to full size `masks_per_chunk` at a time, so that their memory
        stays bounded."""
        masks = torch.from_numpy(masks) if isinstance(masks, np.ndarray) else masks
        step = masks_per_chunk(*size)
        chunks = [masks[first : first + step] for first in range(0, masks.shape[0], step)] or [masks]
        parts = []
        for chunk in chunks:
            if tuple(chunk.shape[1:]) != tuple(size):
                chunk = full_size_masks(chunk, size)
            parts.append(self.masks_out.chunk(chunk))
        return self.masks_out.join(parts)

    @torch.inference_mode()
    def _segment(self, images: list[np.ndarray], prompts: list[Prompts | None] | None) -> list[tuple[dict, bytes | tuple]]:
        """Per image: its segments' metadata (`Segments.metadata`) and `_masks_out` of their
        masks at the image's full size."""
        shown = [fit_for_model(image, self.model_max_pixels) for image in images]
        if prompts is not None:
            prompts = [scale_prompts(p, image, small) for p, image, small in zip(prompts, images, shown)]
        sizes = [image.shape[:2] for image in shown]
        batch = self.model.preprocess(shown) if prompts is None else self.model.preprocess(shown, prompts=prompts)
        results = self.model.postprocess(self.model.forward(batch), sizes)
        return [
            (scale_boxes(segments, image, small).metadata(self.labels), self._masks_out(segments.masks, image.shape[:2]))
            for segments, image, small in zip(results, images, shown)
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        count = len(batch["image_id"])
        step = self.batch_size or count
        done: list[pa.Table] = []
        done_rows = 0
        for start in range(0, count, step):
            done.append(self._held_batch({key: values[start : start + step] for key, values in batch.items()}))
            done_rows += done[-1].num_rows
            if done_rows >= ROWS_PER_OUTPUT:
                yield pa.concat_tables(done).combine_chunks()
                done, done_rows = [], 0
        if done:
            yield pa.concat_tables(done).combine_chunks()

    def _held_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """`_model_batch`, with its images recorded as in hand (`pipeline/in_flight.py`) while
        it runs. Images a dead process had in hand go through one at a time, each recorded
        alone, and those that killed it too often become error rows without another try."""
        if self.in_flight is None:
            return self._model_batch(batch)
        image_ids = [str(x) for x in batch["image_id"]]
        if not self.in_flight.suspects(image_ids):
            self.in_flight.hold(image_ids)
            table = self._model_batch(batch)
            self.in_flight.release(image_ids)
            return table
        tables = []
        for index, image_id in enumerate(image_ids):
            row = {key: values[index : index + 1] for key, values in batch.items()}
            if deaths := self.in_flight.given_up(image_id):
                tables.append(self._given_up_row(row, deaths))
            else:
                self.in_flight.hold([image_id])
                tables.append(self._model_batch(row))
            self.in_flight.release([image_id])
        return pa.concat_tables(tables).combine_chunks()

    def _given_up_row(self, row: dict[str, np.ndarray], deaths: Deaths) -> pa.Table:
        """The error row of an image that killed its actor's process `deaths.alone` times."""
        reason = InFlightRecord.given_up_reason(deaths)
        log.error("giving up on %s: %s", row["image_id"][0], reason)
        # Not decoded here: its size is known only if it arrived decoded.
        sizes = {key: row[key] if key in row else np.zeros(1, dtype=np.int32) for key in ("width", "height")}
        return self._table(self._image_columns({**row, **sizes}, [STATUS_ERROR], [reason]), [self._no_masks])

    def _model_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """One model batch of rows → their table."""
        if self.decode is not None:
            batch = self.decode(batch)
        count = len(batch["image_id"])
        statuses = list(batch["status"])
        # An all-null string column reaches numpy as floats (NaN): keep only real reasons.
        errors = [error if isinstance(error, str) else None for error in batch["error"]]
        # Malformed prompts (pipeline/prompts.py) make their image an error row, not a crash.
        for index, reason in enumerate(batch.get(PROMPT_ERROR, ())):
            if isinstance(reason, str) and statuses[index] == STATUS_OK:
                statuses[index], errors[index] = STATUS_ERROR, f"bad prompts: {reason}"
        results: list[tuple[dict, bytes | tuple]] = [self._no_masks] * count
        ready = [i for i in range(count) if statuses[i] == STATUS_OK]
        images = [batch["image"][i] for i in ready]
        prompts = prompts_of(batch, ready)
        try:
            for index, result in zip(ready, self._segment(images, prompts)):
                results[index] = result
        except Exception:  # noqa: BLE001 - isolate the failing image(s), below
            log.warning("batch of %d failed; retrying its images one by one", len(ready), exc_info=True)
            for position, (index, image) in enumerate(zip(ready, images)):
                try:
                    results[index] = self._segment([image], None if prompts is None else [prompts[position]])[0]
                except Exception as e:  # noqa: BLE001 - becomes this image's error row
                    statuses[index] = STATUS_ERROR
                    errors[index] = f"inference failed: {type(e).__name__}: {e}"
                    log.warning("inference failed on %s:\n%s", batch["uri"][index], traceback.format_exc())
        return self._table(self._image_columns(batch, statuses, errors), results)

    @property
    def _no_masks(self) -> tuple[dict, bytes | tuple]:
        """An image's result when it has no segments (or no result: an error row)."""
        return {name: [] for name in METADATA_FIELDS}, self.masks_out.none

    def _table(self, image_columns: dict, results: list[tuple[dict, bytes | tuple]]) -> pa.Table:
        """Rows of `_image_columns` and per-image results, in `masks_out`'s schema."""
        return self.masks_out.table(image_columns, results)

    def _image_columns(self, batch: dict[str, np.ndarray], statuses: list[str], errors: list[str | None]) -> dict:
        """The image_id, uri, width, height, status, error and model columns of a batch's rows."""
        return {
            "image_id": [str(x) for x in batch["image_id"]],
            "uri": [x if isinstance(x, str) else None for x in batch["uri"]],
            "width": batch["width"],
            "height": batch["height"],
            "status": statuses,
            "error": errors,
            "model": [self.model.name] * len(statuses),
        }
