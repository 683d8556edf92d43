"""The inference actors' classes as the driver hands them to Ray Data: importable without torch.

Ray Data takes the actor's class from the driver, and pipeline/inference.py imports torch,
about 1.2 s of CPU. The driver would pay it before every run, on the cores where the actors
start, to plan work it never runs. This class imports the model code only in the actor.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from .model_spec import ModelSpec

log = logging.getLogger("rayseg.pipeline")


class ModelBuildError(RuntimeError):
    """The run's model cannot be built in its actors (a checkpoint of another architecture,
    a class count that disagrees with the categories, …): the run fails with this one
    message, before any image is marked failed."""

    def __init__(self, model: str, weights: str, reason: str):
        self.model, self.weights, self.reason = model, weights, reason
        super().__init__(f"model {model!r} cannot be built from weights {weights}: {reason}")

    def __reduce__(self):  # crosses from the actor to the driver with its fields
        return ModelBuildError, (self.model, self.weights, self.reason)


class SegmentImages:
    """Ray Data callable class of GPU actors: decoded rows → rows with packed masks for the
    encode stage (INFERENCE_SCHEMA). A `pipeline.inference.ImageSegmenter`, built in the
    actor and recording its images in hand (`pipeline/in_flight.py`); each call yields its
    tables.

    A model that cannot be built does not fail the actor's construction, which Ray retries
    and reports as tracebacks from every process on the way; the actor's first call raises
    ModelBuildError instead, which fails the run with its message alone.
    """

    def __init__(self, model: ModelSpec, error_tally=None, **options):
        from .in_flight import InFlightRecord
        from .inference import ImageSegmenter

        self.error_tally = error_tally
        self.failure: ModelBuildError | None = None
        try:
            self.segmenter = ImageSegmenter(
                model, self._masks_out(), in_flight=InFlightRecord.for_current_actor(), **self._stages(options)
            )
        except Exception as e:  # any builder's error: the run's to report, once
            self.failure = ModelBuildError(model.name, model.weights, str(e) or type(e).__name__)
            log.debug("building %s failed", model.name, exc_info=True)

    @staticmethod
    def _masks_out():
        from .inference import PackedMasks

        return PackedMasks()

    @staticmethod
    def _stages(options: dict) -> dict:
        """ImageSegmenter's keyword arguments from the actor's: with `gpu_decode`
        (`JpegDecoder`'s keyword arguments), the JPEGs the decode tasks left as bytes are
        decoded here, on the GPU."""
        gpu_decode = options.pop("gpu_decode", None)
        if gpu_decode is None:
            return options
        from .gpu_decode import JpegDecoder

        return {**options, "decode": JpegDecoder(**gpu_decode)}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        # Raised by the call itself, not by the iterator it returns: Ray Data reports
        # exceptions of the call as the user code's, in a line, and others with its own stack.
        if self.failure is not None:
            raise self.failure
        return self._reported(self.segmenter(batch))

    def _reported(self, tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """`tables`, each one's error rows told to the run's tally (`pipeline/progress.py`)."""
        from .progress import report_errors

        for table in tables:
            report_errors(table, self.error_tally)
            yield table


class SegmentImagesAndEncode(SegmentImages):
    """Ray Data callable class of CPU actors: rows → output rows (OUTPUT_SCHEMA), as one
    chain in the actor: decode (with `decode_options`, `decode_batch`'s keyword arguments,
    for {image_id, uri} rows: each model batch just before its forward pass), infer, and
    encode the masks where the model left them."""

    @staticmethod
    def _masks_out():
        from .inference import EncodedMasks

        return EncodedMasks()

    @staticmethod
    def _stages(options: dict) -> dict:
        from .decode import decode_batch

        decode_options = options.pop("decode_options", None)
        if decode_options is None:  # rows that arrive decoded
            return options
        return {**options, "decode": functools.partial(decode_batch, **decode_options)}


def model_build_error(error: BaseException) -> str | None:
    """The message of the ModelBuildError behind `error` as the driver receives it, or None.

    Ray Data wraps an exception of a call in a UserCodeException raised from it, and Ray
    sends that to the driver as a RayTaskError whose text holds the worker's traceback: the
    original exception object does not cross (a pickled exception drops its __cause__), so
    its message is read from that text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ModelBuildError):
            return str(ModelBuildError(error.model, error.weights, error.reason))
        found = re.search(rf"\.{ModelBuildError.__name__}: (.+?)(?:\n\s*\n|\Z)", str(error), re.DOTALL)
        if found:
            return found.group(1).strip()
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None
