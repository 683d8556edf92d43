"""Decode: image bytes → RGB uint8 (H, W, 3), EXIF orientation applied, size limits enforced.

Every row comes out with a status: a file that cannot be read or decoded becomes an
`error` row with the reason, and never fails the batch it is in.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from .schema import STATUS_ERROR, STATUS_OK
from .storage import filesystem

# Images above this many pixels are refused before their pixels are allocated (a 30000 ×
# 30000 "decompression bomb" would need 2.7 GB). 64 MP covers photographs and scans.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


class DecodeError(ValueError):
    """Bytes that are not an image we can decode, or one beyond the size limit."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes → uint8 (H, W, 3) RGB in display orientation (EXIF applied)."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) before our own, explicit limit applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DecodeError(f"image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
                image = ImageOps.exif_transpose(image)
                return np.asarray(image.convert("RGB"))
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError(f"not a decodable image: {e}") from e


def _read_all(uris: list[str], storage_options: dict | None) -> dict[str, bytes | Exception]:
    """Bytes of each uri, or the exception that reading it raised; one cat() per filesystem."""
    groups: dict[int, tuple] = {}
    for uri in uris:
        fs, path = filesystem(uri, storage_options)
        groups.setdefault(id(fs), (fs, {}))[1][path] = uri
    results: dict[str, bytes | Exception] = {}
    for fs, uri_of in groups.values():
        # cat() of a list fetches concurrently on object stores and returns each failure.
        for path, content in fs.cat(list(uri_of), on_error="return").items():
            results[uri_of[path]] = content
    return results


def decode_batch(
    batch: dict[str, np.ndarray], storage_options: dict | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Ray Data batch function: {image_id, uri} → + image, width, height, status, error."""
    uris = [str(uri) for uri in batch["uri"]]
    contents = _read_all(list(dict.fromkeys(uris)), storage_options)
    images, statuses, errors = [], [], []
    for uri in uris:
        content = contents[uri]
        try:
            if isinstance(content, Exception):
                raise DecodeError(f"read failed: {type(content).__name__}: {content}")
            images.append(decode_image(content, max_pixels))
            statuses.append(STATUS_OK)
            errors.append(None)
        except DecodeError as e:
            images.append(EMPTY_IMAGE)
            statuses.append(STATUS_ERROR)
            errors.append(str(e))
    return {
        "image_id": batch["image_id"],
        "uri": batch["uri"],
        "image": _object_array(images),
        "height": np.array([image.shape[0] for image in images], dtype=np.int32),
        "width": np.array([image.shape[1] for image in images], dtype=np.int32),
        "status": np.array(statuses, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array of `items` (numpy would otherwise try to stack same-shape images)."""
    array = np.empty(len(items), dtype=object)
    for index, item in enumerate(items):
        array[index] = item
    return array
