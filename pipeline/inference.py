"""Infer: the model run as a Ray Data actor pool, built once per actor.

Per batch: model.preprocess → model.forward → model.postprocess, then masks leave the
actor bit-packed (pipeline/masks.py) with their metadata; pycocotools encoding happens in
the CPU stage after it, not on the accelerator's actor.
"""

from __future__ import annotations

import logging
import traceback

import numpy as np
import pyarrow as pa
import torch

from ..models.base import Prompts, Segment, SegmentationModel
from ..models.registry import build_model
from .masks import pack_masks
from .schema import STATUS_ERROR, STATUS_OK

log = logging.getLogger("rayseg.pipeline")

# What crosses from the inference actor to the encode stage: the row's identity and
# status, segment metadata as lists, and all of a row's masks as one packed binary value.
INFERENCE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("model", pa.string()),
        pa.field("category_ids", pa.list_(pa.int32())),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("segment_ids", pa.list_(pa.int32())),
        pa.field("iscrowd", pa.list_(pa.bool_())),
        pa.field("annotation_ids", pa.list_(pa.int64())),
        pa.field("masks", pa.binary()),
    ]
)


PROMPT_COLUMNS = ("prompt_boxes", "prompt_category_ids", "prompt_annotation_ids")


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


def select_device() -> torch.device:
    """CUDA when this process has a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SegmentImages:
    """Ray Data callable class: decoded rows → rows of segments with packed masks.

    A batch that fails is retried one image at a time, so one bad image costs only its
    own row (status "error"), never its neighbours'.
    """

    def __init__(
        self,
        model_name: str,
        weights: str,
        *,
        weights_sha256: str | None = None,
        storage_options: dict | None = None,
        score_threshold: float | None = None,
        torch_threads: int | None = None,
        model_options: dict | None = None,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = select_device()
        self.model: SegmentationModel = build_model(
            model_name,
            weights,
            weights_sha256=weights_sha256,
            device=str(self.device),
            storage_options=storage_options,
            score_threshold=score_threshold,
            **(model_options or {}),
        )
        self.labels = {category.id: category.name for category in self.model.categories}
        log.info("built %s on %s", model_name, self.device)

    def _segment(self, images: list[np.ndarray], prompts: list[Prompts | None] | None) -> list[list[Segment]]:
        sizes = [image.shape[:2] for image in images]
        batch = self.model.preprocess(images) if prompts is None else self.model.preprocess(images, prompts=prompts)
        return self.model.postprocess(self.model.forward(batch), sizes)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["image_id"])
        statuses = list(batch["status"])
        # An all-null string column reaches numpy as floats (NaN): keep only real reasons.
        errors = [error if isinstance(error, str) else None for error in batch["error"]]
        results: list[list[Segment]] = [[] for _ in range(count)]
        ready = [i for i in range(count) if statuses[i] == STATUS_OK]
        images = [batch["image"][i] for i in ready]
        prompts = prompts_of(batch, ready)
        try:
            for index, segments in zip(ready, self._segment(images, prompts)):
                results[index] = segments
        except Exception:  # noqa: BLE001 - isolate the failing image(s), below
            log.warning("batch of %d failed; retrying its images one by one", len(ready), exc_info=True)
            for position, (index, image) in enumerate(zip(ready, images)):
                try:
                    results[index] = self._segment([image], None if prompts is None else [prompts[position]])[0]
                except Exception as e:  # noqa: BLE001 - becomes this image's error row
                    statuses[index] = STATUS_ERROR
                    errors[index] = f"inference failed: {type(e).__name__}: {e}"
                    log.warning("inference failed on %s:\n%s", batch["uri"][index], traceback.format_exc())
        return self._rows(batch, statuses, errors, results)

    def _rows(self, batch, statuses, errors, results: list[list[Segment]]) -> pa.Table:
        masks = []
        for segments in results:
            masks.append(pack_masks(np.stack([s.mask for s in segments])) if segments else b"")
        return pa.table(
            {
                "image_id": [str(x) for x in batch["image_id"]],
                "uri": [x if isinstance(x, str) else None for x in batch["uri"]],
                "width": batch["width"],
                "height": batch["height"],
                "status": statuses,
                "error": errors,
                "model": [self.model.name] * len(statuses),
                "category_ids": [[s.category_id for s in segments] for segments in results],
                "labels": [[self.labels.get(s.category_id) for s in segments] for segments in results],
                "scores": [[s.score for s in segments] for segments in results],
                "segment_ids": [[s.segment_id for s in segments] for segments in results],
                "iscrowd": [[s.iscrowd for s in segments] for segments in results],
                "annotation_ids": [[s.annotation_id for s in segments] for segments in results],
                "masks": masks,
            },
            schema=INFERENCE_SCHEMA,
        )
