"""The inference actors' class as the driver hands it to Ray Data: importable without torch.

Ray Data takes the actor's class from the driver, and pipeline/inference.py imports torch,
about 1.2 s of CPU. The driver would pay it before every run, on the cores where the actors
start, to plan work it never runs. This class imports the model code only in the actor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

log = logging.getLogger("rayseg.pipeline")

# Images beyond this many pixels are shown to the model downscaled (aspect kept) and their
# masks scaled back to full size: models work at far lower resolutions, and a forward pass
# at tens of megapixels would exhaust an accelerator's (or a CPU worker's) memory.
MODEL_MAX_PIXELS = 4 * 1024 * 1024


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
    """Ray Data callable class: a `pipeline.inference.ImageSegmenter`, built in the actor
    from the same arguments and recording its images in hand (`pipeline/in_flight.py`);
    each call yields its tables.

    A model that cannot be built does not fail the actor's construction, which Ray retries
    and reports as tracebacks from every process on the way; the actor's first call raises
    ModelBuildError instead, which fails the run with its message alone.
    """

    def __init__(self, model_name: str, weights: str, **kwargs):
        from .in_flight import InFlightRecord
        from .inference import ImageSegmenter

        self.failure: ModelBuildError | None = None
        try:
            self.segmenter = ImageSegmenter(model_name, weights, in_flight=InFlightRecord.for_current_actor(), **kwargs)
        except Exception as e:  # any builder's error: the run's to report, once
            self.failure = ModelBuildError(model_name, weights, str(e) or type(e).__name__)
            log.debug("building %s failed", model_name, exc_info=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        # Raised by the call itself, not by the iterator it returns: Ray Data reports
        # exceptions of the call as the user code's, in a line, and others with its own stack.
        if self.failure is not None:
            raise self.failure
        return self.segmenter(batch)


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
