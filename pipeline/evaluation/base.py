"""What every evaluator shares: the detectron2-style protocol, exact sums, image rankings.

An evaluator is built once with its configuration, then used like detectron2's
`DatasetEvaluator`:

    evaluator.reset()
    evaluator.process(ground_truths, predictions)   # any number of times, any shard
    evaluator.merge(other)                           # fold in another shard's evaluator
    metrics = evaluator.evaluate()

`process` keeps only mergeable partial results (confusion matrices, PQ counters, per-image
COCO matching records), never masks, so shards evaluated in different Ray tasks merge into
exactly what one process would have computed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..run_reader import Prediction, RowLocation


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (bad paths, unknown task, mismatched ground truth)."""


class ExactSum:
    """A float sum that is exact until read, so it does not depend on the order of adds or merges.

    Keeps Shewchuk's non-overlapping partials (the algorithm behind math.fsum); `value` is
    the correctly rounded sum of everything added, whatever the sharding was.
    """

    __slots__ = ("partials",)

    def __init__(self) -> None:
        self.partials: list[float] = []

    def add(self, x: float) -> None:
        x = float(x)
        partials = self.partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    def merge(self, other: "ExactSum") -> None:
        for partial in other.partials:
            self.add(partial)

    @property
    def value(self) -> float:
        return math.fsum(self.partials)

    def __getstate__(self):
        return self.partials

    def __setstate__(self, state):
        self.partials = list(state)


@dataclass(order=True)
class RankedImage:
    """One image's quality for the best/worst thumbnails; ordered by (quality, key)."""

    quality: float
    key: str
    image_id: str = field(compare=False)
    location: RowLocation | None = field(compare=False, default=None)
    detail: dict = field(compare=False, default_factory=dict)


class ImageRanking:
    """The k best and k worst images seen, mergeable; ties broken by image key."""

    def __init__(self, k: int = 4) -> None:
        self.k = k
        self.best: list[RankedImage] = []
        self.worst: list[RankedImage] = []

    def add(self, image: RankedImage) -> None:
        if self.k <= 0 or not math.isfinite(image.quality):
            return
        full = len(self.best) >= self.k and len(self.worst) >= self.k
        if full and (-image.quality, image.key) >= (-self.best[-1].quality, self.best[-1].key) and (
            image.quality,
            image.key,
        ) >= (self.worst[-1].quality, self.worst[-1].key):
            return  # neither among the best nor among the worst: nothing to sort
        self._keep([image])

    def merge(self, other: "ImageRanking") -> None:
        self._keep([*other.best, *other.worst])

    def _keep(self, images: list[RankedImage]) -> None:
        pool = {image.key: image for image in [*self.best, *self.worst, *images]}.values()
        self.best = sorted(pool, key=lambda r: (-r.quality, r.key))[: self.k]
        self.worst = sorted(pool, key=lambda r: (r.quality, r.key))[: self.k]


def fits(prediction: Prediction, height: int, width: int) -> bool:
    """Whether a row's segments are scored against ground truth of height × width: its own
    size is that (an error row has no segments to score)."""
    return not prediction.ok or (prediction.height, prediction.width) == (height, width)


class DatasetEvaluator(ABC):
    """reset / process / merge / evaluate (see the module docstring)."""

    task: str = ""

    def __init__(self, ranking_k: int = 6) -> None:
        self.ranking_k = ranking_k
        self.reset()

    def reset(self) -> None:
        """Forget everything processed; the configuration stays."""
        self.images = 0
        self.error_rows = 0
        self.size_mismatch = 0
        self.size_mismatch_examples: list[str] = []
        self.ranking = ImageRanking(self.ranking_k)
        self._reset()

    @abstractmethod
    def _reset(self) -> None: ...

    def process(self, ground_truths: Sequence[Any], predictions: Sequence[Prediction]) -> None:
        """Evaluates each (ground truth, prediction row) pair of one image and keeps partial results.

        A row with status "error" counts as an image without predictions, as does a row
        whose size contradicts the ground truth (counted in `size_mismatch`).
        """
        if len(ground_truths) != len(predictions):
            raise ValueError("process() takes one prediction per ground-truth image")
        for ground_truth, prediction in zip(ground_truths, predictions):
            self.images += 1
            if not prediction.ok:
                self.error_rows += 1
                prediction = prediction.without_segments()
            self._process_one(ground_truth, prediction)

    def _mismatch(self, prediction: Prediction, height: int, width: int) -> Prediction:
        """The row, or the row without segments when its size is not the ground truth's."""
        if fits(prediction, height, width):
            return prediction
        self.size_mismatch += 1
        if len(self.size_mismatch_examples) < 5:
            self.size_mismatch_examples.append(
                f"{prediction.image_id}: prediction {prediction.height}x{prediction.width}, ground truth {height}x{width}"
            )
        return prediction.without_segments()

    @abstractmethod
    def _process_one(self, ground_truth: Any, prediction: Prediction) -> None: ...

    def merge(self, other: "DatasetEvaluator") -> "DatasetEvaluator":
        """Folds `other` (same configuration, other images) into this evaluator; returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.images += other.images
        self.error_rows += other.error_rows
        self.size_mismatch += other.size_mismatch
        self.size_mismatch_examples = (self.size_mismatch_examples + other.size_mismatch_examples)[:5]
        self.ranking.merge(other.ranking)
        self._merge(other)
        return self

    @abstractmethod
    def _merge(self, other: "DatasetEvaluator") -> None: ...

    @abstractmethod
    def evaluate(self) -> dict:
        """Every metric, JSON-ready (floats, ints, lists, None for undefined)."""


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are null."""
    value = float(value)
    return value if math.isfinite(value) else None
