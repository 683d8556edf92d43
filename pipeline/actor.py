"""The inference actors' class as the driver hands it to Ray Data: importable without torch.

Ray Data takes the actor's class from the driver, and pipeline/inference.py imports torch,
about 1.2 s of CPU. The driver would pay it before every run, on the cores where the actors
start, to plan work it never runs. This class imports the model code only in the actor.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

# Images beyond this many pixels are shown to the model downscaled (aspect kept) and their
# masks scaled back to full size: models work at far lower resolutions, and a forward pass
# at tens of megapixels would exhaust an accelerator's (or a CPU worker's) memory.
MODEL_MAX_PIXELS = 4 * 1024 * 1024


class SegmentImages:
    """Ray Data callable class: a `pipeline.inference.ImageSegmenter`, built in the actor
    from the same arguments and recording its images in hand (`pipeline/in_flight.py`);
    each call yields its tables."""

    def __init__(self, *args, **kwargs):
        from .in_flight import InFlightRecord
        from .inference import ImageSegmenter

        self.segmenter = ImageSegmenter(*args, in_flight=InFlightRecord.for_current_actor(), **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        yield from self.segmenter(batch)
