"""GPU JPEG decode in the inference actor (`--gpu-decode`): the JPEGs that the decode tasks
left as file bytes (`decode.JPEG_COLUMN`, chosen by `decode.gpu_decodable_size`) decoded a
model batch at a time by nvJPEG (torchvision's `decode_jpeg` on a list), on the actor's GPU.

Whatever nvJPEG does not decode goes through the CPU decode (`decode.decode_image`), image
by image, under its rules: a file it refuses becomes an error row as a decode task would
have made it. An actor without CUDA decodes every JPEG so, and says so once.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .decode import (
    DEFAULT_MAX_PIXELS,
    EMPTY_IMAGE,
    JPEG_COLUMN,
    DecodeError,
    decode_image,
    object_array,
)
from .schema import STATUS_ERROR, STATUS_OK

log = logging.getLogger("rayseg.pipeline")


def decode_jpegs(files: list[bytes], device: str) -> list[np.ndarray]:
    """JPEG files → uint8 (H, W, 3) RGB host arrays, decoded as one batch on `device`
    ("cuda": nvJPEG; "cpu": libjpeg-turbo). Raises on any file it cannot decode.

    The pixels come back to the host because the models' preprocess takes host arrays
    (and `fit_for_model` resizes there): the copy is one memcpy per image, the decode
    itself is what leaves the actor's CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # bytearray: torch.frombuffer wants a writable buffer (it warns on bytes).
    data = [torch.frombuffer(bytearray(file), dtype=torch.uint8) for file in files]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return [image.permute(1, 2, 0).contiguous().cpu().numpy() for image in images]


class JpegDecoder:
    """`ImageSegmenter`'s decode stage on GPU actors: rows with JPEG_COLUMN → the same rows
    with those JPEGs decoded into `image` (uint8 (H, W, 3)), or made error rows, as
    `decode.decode_images` would have made them. Rows without bytes pass as they are."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels
        self.device = "cuda" if torch.cuda.is_available() else None
        if self.device is None:
            log.warning("gpu_decode is on but this actor sees no CUDA device: it decodes its JPEGs on the CPU")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [index for index, file in enumerate(batch.get(JPEG_COLUMN, ())) if file]
        if not rows:
            return batch
        sizes = [(int(batch["height"][index]), int(batch["width"][index])) for index in rows]
        decoded = self.decode([batch[JPEG_COLUMN][index] for index in rows], sizes)
        images, statuses = object_array(list(batch["image"])), object_array(list(batch["status"]))
        # An all-null string column reaches numpy as floats (NaN): reasons are strings or None.
        errors = object_array([error if isinstance(error, str) else None for error in batch["error"]])
        heights, widths = batch["height"].copy(), batch["width"].copy()
        for index, (image, error) in zip(rows, decoded):
            images[index] = image
            statuses[index], errors[index] = (STATUS_OK, None) if error is None else (STATUS_ERROR, error)
            heights[index], widths[index] = image.shape[:2]
        return {**batch, "image": images, "status": statuses, "error": errors, "height": heights, "width": widths}

    def decode(self, files: list[bytes], sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, str | None]]:
        """(image, None) or (EMPTY_IMAGE, reason) per JPEG file of header size `sizes`
        (height, width): the batch on the GPU; when that fails, each file alone on the GPU;
        whatever still fails, or decodes to another size, through the CPU decode."""
        if self.device is not None:
            try:
                images = decode_jpegs(files, self.device)
                if all(image.shape[:2] == size for image, size in zip(images, sizes)):
                    return [(image, None) for image in images]
            except Exception:  # noqa: BLE001 - one bad file fails nvJPEG's whole batch: retried alone below
                log.debug("GPU decode of %d JPEGs failed; decoding them one by one", len(files), exc_info=True)
        return [self._one(file, size) for file, size in zip(files, sizes)]

    def _one(self, file: bytes, size: tuple[int, int]) -> tuple[np.ndarray, str | None]:
        if self.device is not None:
            try:
                (image,) = decode_jpegs([file], self.device)
                if image.shape[:2] == size:
                    return image, None
            except Exception:  # noqa: BLE001 - the CPU decode below decides: an image or its error row
                log.debug("GPU decode of one JPEG failed; decoding it on the CPU", exc_info=True)
        try:
            return decode_image(file, self.max_pixels), None
        except DecodeError as e:
            return EMPTY_IMAGE, str(e)
