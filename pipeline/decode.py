"""Decode: image bytes → RGB uint8 (H, W, 3), EXIF orientation applied, size limits enforced.

Every row comes out with a status: a file that cannot be read or decoded becomes an
`error` row with the reason, and never fails the batch it is in.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageOps

from .in_flight import InFlightRecord
from .schema import STATUS_ERROR, STATUS_OK
from .storage import filesystem

# Images above this many pixels are refused before their pixels are allocated (a 30000 ×
# 30000 "decompression bomb" would need 2.7 GB). 64 MP covers photographs and scans.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# Images beyond this many pixels are shown to the model downscaled (aspect kept) and their
# masks scaled back to full size: models work at far lower resolutions, and a forward pass
# at tens of megapixels would exhaust an accelerator's (or a CPU worker's) memory.
MODEL_MAX_PIXELS = 4 * 1024 * 1024

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)

# Files fetched per storage round trip (concurrently on object stores), and the decoded
# pixels a decode task accumulates before it hands a batch on.
READ_ROWS = 32
MAX_BATCH_BYTES = 128 * 1024 * 1024
DECODE_TASK_MEMORY = 2 * MAX_BATCH_BYTES


# With `jpegs_for_actor`, the JPEGs that GPU actors can decode (`gpu_decodable_size`) leave
# the decode task as their file bytes, in this column (b"": decoded here); a binary column
# in every block, so that blocks with and without JPEGs concatenate.
JPEG_COLUMN = "jpeg"
JPEG_MAGIC = b"\xff\xd8\xff"
# A JPEG ends with its end-of-image marker (padding aside). One without was cut short: the
# CPU decode refuses it, which nvJPEG might not, so it stays on the CPU.
JPEG_END = b"\xff\xd9"
# nvJPEG decodes YCbCr and grey JPEGs to the RGB that PIL makes of them; CMYK/YCCK files
# (which PIL converts its own way) stay on the CPU.
GPU_JPEG_MODES = frozenset({"RGB", "L"})
EXIF_ORIENTATION = 0x0112


# Single-channel integer modes PIL would clip, not scale, when converting to 8-bit RGB.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _sixteen_bit_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """16-bit values → uint8 of the same shape, the full 0–65535 range mapped onto 0–255."""
    return ((np.clip(pixels.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float values → uint8 of the same shape: values all in 0–1 (the common float range)
    mapped onto 0–255, else taken as 0–255; NaN is 0."""
    finite = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        finite = finite * 255
    return np.clip(np.rint(finite), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def as_rgb(pixels: Any) -> np.ndarray:
    """An image given as an array → uint8 (H, W, 3), as a decoded file would be: grey
    (H, W) or (H, W, 1) repeated to three channels, alpha dropped, 16-bit and float values
    scaled as `decode_image` scales them. DecodeError for anything else."""
    array = np.asarray(pixels)
    if array.ndim == 0:  # None, or the NaN Ray makes of a None beside arrays
        raise DecodeError(f"no image: {array.item()!r}")
    if array.ndim == 3 and array.shape[2] in (1, 4):
        array = array[:, :, 0] if array.shape[2] == 1 else array[:, :, :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or 0 in array.shape[:2]:
        raise DecodeError(f"not an image: an array of shape {array.shape}, not (H, W) or (H, W, 1|3|4)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = _float_to_uint8(array)
    elif array.dtype != np.uint8 and np.issubdtype(array.dtype, np.integer):
        array = _sixteen_bit_to_uint8(array)
    elif array.dtype != np.uint8:
        raise DecodeError(f"not an image: an array of {array.dtype}")
    return np.ascontiguousarray(_grey_to_rgb(array) if array.ndim == 2 else array)


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
                ImageOps.exif_transpose(image, in_place=True)
                if image.mode in SIXTEEN_BIT_MODES:
                    return _grey_to_rgb(_sixteen_bit_to_uint8(np.asarray(image)))
                if image.mode == "F":
                    return _grey_to_rgb(_float_to_uint8(np.asarray(image)))
                return np.asarray(image.convert("RGB"))
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from e
    except Image.UnidentifiedImageError as e:
        # PIL's own message names the in-memory buffer (its address), not the file.
        raise DecodeError("not a decodable image: no image format recognised") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError(f"not a decodable image: {e}") from e


def gpu_decodable_size(content: bytes | Exception, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) of a JPEG a GPU actor may decode, from its header alone: YCbCr or
    grey, whole (JPEG_END), within `max_pixels`, and already in display orientation (no
    EXIF orientation other than 1: nvJPEG does not apply it). None for anything the CPU
    decodes here, errors included (its decode says why)."""
    if not isinstance(content, bytes) or not content.startswith(JPEG_MAGIC):
        return None
    if not content[-64:].rstrip(b"\0").endswith(JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                width, height = image.size
                if image.format != "JPEG" or image.mode not in GPU_JPEG_MODES or width * height > max_pixels:
                    return None
                if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    return None
    except Exception:  # noqa: BLE001 - not a readable JPEG header: the CPU decode makes its error row
        return None
    return height, width


def _read_all(uris: list[str], storage_options: dict | None) -> dict[str, bytes | Exception]:
    """Bytes of each uri, or the exception that reading it raised; one cat() per filesystem."""
    groups: dict[int, tuple] = {}
    results: dict[str, bytes | Exception] = {}
    # Resolving a uri's filesystem costs as much as reading a small local file: once per
    # protocol here. Chained uris ("simplecache::s3://…") are resolved one by one.
    by_protocol: dict[str | None, fsspec.AbstractFileSystem] = {}
    for uri in uris:
        protocol = fsspec.core.split_protocol(uri)[0]
        try:
            if protocol in by_protocol:
                fs = by_protocol[protocol]
                path = fs._strip_protocol(uri)
            else:
                fs, path = filesystem(uri, storage_options)
                if "::" not in uri:
                    by_protocol[protocol] = fs
        except Exception as e:  # noqa: BLE001 - e.g. an unknown protocol: this row's error
            results[uri] = e
            continue
        _, paths, fs_uris = groups.setdefault(id(fs), (fs, [], []))
        paths.append(path)
        fs_uris.append(uri)
    for fs, paths, fs_uris in groups.values():
        # cat_ranges() of whole files fetches concurrently on object stores, returns each
        # failure in its place, and takes paths as they are: cat() would expand "[1]", "*"
        # or "?" in a file name as a glob, and would merge two uris naming one file.
        try:
            contents = fs.cat_ranges(paths, None, None, on_error="return")
        except Exception as e:  # noqa: BLE001 - the group's read failed whole: each row's error
            contents = [e] * len(paths)
        results.update(zip(fs_uris, contents))
    return results


def decode_images(
    batch: dict[str, np.ndarray],
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rows_per_read: int = READ_ROWS,
    max_batch_bytes: int = MAX_BATCH_BYTES,
    in_flight: InFlightRecord | None = None,
    jpegs_for_actor: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch generator: {image_id, uri} → + image, width, height, status, error.

    Reads `rows_per_read` files at a time and yields decoded rows whenever they reach
    `max_batch_bytes`, so a task holds a bounded amount of pixels however large its
    input block is.

    jpegs_for_actor: JPEGs that `gpu_decodable_size` accepts are not decoded here: their
    row carries the file's bytes (JPEG_COLUMN), an empty image, and its size and status
    from the header, for the GPU actor to decode (`pipeline/gpu_decode.py`).

    in_flight: where the images being read and decoded are recorded as in hand; an image
    whose process died too often while decoding it alone becomes an error row
    (`pipeline/in_flight.py`).
    """
    count = len(batch["uri"])
    pending: list[tuple[int, np.ndarray, str | None]] = []
    pending_bytes = 0
    # row → (JPEG bytes, (height, width)) of the pending rows left to the actor
    jpegs: dict[int, tuple[bytes, tuple[int, int]]] | None = {} if jpegs_for_actor else None
    for start in range(0, count, rows_per_read):
        rows = range(start, min(start + rows_per_read, count))
        unreadable = {row: _source_error(batch, row) for row in rows}
        uris = [batch["uri"][row] for row in rows if unreadable[row] is None]
        contents = _read_all(list(dict.fromkeys(uris)), storage_options)
        image_ids = [str(batch["image_id"][row]) for row in rows]
        # Recorded as a group; images a dead process had in hand one by one (as the actors do).
        one_by_one = in_flight is not None and in_flight.suspects(image_ids)
        if in_flight is not None and not one_by_one:
            in_flight.hold(image_ids)
        for row, image_id in zip(rows, image_ids):
            reason = unreadable[row]
            content = DecodeError(reason) if reason else contents[batch["uri"][row]]
            size = gpu_decodable_size(content, max_pixels) if jpegs is not None and not one_by_one else None
            if size is not None:
                jpegs[row] = (content, size)
                image, error = EMPTY_IMAGE, None
                image_bytes = len(content)  # what the row holds until the actor decodes it
            elif not one_by_one:
                image, error = _decode_content(content, max_pixels)
                image_bytes = image.nbytes
            elif deaths := in_flight.given_up(image_id):
                image, error = EMPTY_IMAGE, in_flight.given_up_reason(deaths)
                # Counted at its decoded size, so that this attempt yields the same batches
                # as the attempts before it: Ray keeps what a dead attempt already yielded.
                image_bytes = _declared_bytes(content, max_pixels)
                in_flight.release([image_id])
            else:
                in_flight.hold([image_id])
                image, error = _decode_content(content, max_pixels)
                image_bytes = image.nbytes
                in_flight.release([image_id])
            pending.append((row, image, error))
            pending_bytes += image_bytes
            if pending_bytes >= max_batch_bytes:
                yield _decoded_rows(batch, pending, jpegs)
                pending, pending_bytes = [], 0
                jpegs = None if jpegs is None else {}
        if in_flight is not None and not one_by_one:
            in_flight.release(image_ids)
    if pending:
        yield _decoded_rows(batch, pending, jpegs)


def decode_images_in_task(batch: dict[str, np.ndarray], **options) -> Iterator[dict[str, np.ndarray]]:
    """`decode_images` as a Ray Data decode task runs it: with the task's in-flight record,
    so that an image which kills the task's process is found and given up on."""
    yield from decode_images(batch, **options, in_flight=InFlightRecord.for_current_task())


def _declared_bytes(content: bytes | Exception, max_pixels: int) -> int:
    """What an image decodes to (height × width × RGB), from its header alone; 0 for what
    decodes to an error row (not an image, or over `max_pixels`)."""
    try:
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - not an image: its decode is an error row, 0 bytes
        return 0
    return 0 if width * height > max_pixels else width * height * 3


def decode_batch(
    batch: dict[str, np.ndarray],
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch_bytes: int = MAX_BATCH_BYTES,
) -> dict[str, np.ndarray]:
    """`decode_images` over one batch, handed back as one batch: for a consumer that decodes
    the few rows it is about to use (the inference actors on CPU clusters)."""
    parts = list(decode_images(batch, storage_options, max_pixels, max_batch_bytes=max_batch_bytes))
    parts = parts or [_decoded_rows(batch, [])]
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _source_error(batch: dict[str, np.ndarray], row: int) -> str | None:
    """Why the source already knows `row` cannot be read (no uri, an undecodable name), or None."""
    known = batch["error"][row] if "error" in batch else None
    if isinstance(known, str):
        return known
    return None if isinstance(batch["uri"][row], str) else "no uri"


def _decode_content(content: bytes | Exception, max_pixels: int) -> tuple[np.ndarray, str | None]:
    """(image, None) or (EMPTY_IMAGE, reason)."""
    try:
        if isinstance(content, DecodeError):
            raise content
        if isinstance(content, Exception):
            raise DecodeError(f"read failed: {type(content).__name__}: {content}")
        return decode_image(content, max_pixels), None
    except DecodeError as e:
        return EMPTY_IMAGE, str(e)


def _decoded_rows(
    batch: dict[str, np.ndarray],
    rows: list[tuple[int, np.ndarray, str | None]],
    jpegs: dict[int, tuple[bytes, tuple[int, int]]] | None = None,
) -> dict[str, np.ndarray]:
    """The output columns of `rows` (row, image, error); with `jpegs` (`decode_images`'
    JPEGs left to the actor) also JPEG_COLUMN, and those rows' sizes from their headers."""
    indices = [index for index, _, _ in rows]
    images = [image for _, image, _ in rows]
    errors = [error for _, _, error in rows]
    # Other columns (e.g. prompts for promptable models) travel on with their rows.
    passed_on = {key: values[indices] for key, values in batch.items() if key not in ("image_id", "uri", "error")}
    if jpegs is not None:
        sizes = [jpegs[index][1] if index in jpegs else image.shape[:2] for index, image in zip(indices, images)]
        passed_on[JPEG_COLUMN] = object_array([jpegs[index][0] if index in jpegs else b"" for index in indices])
    else:
        sizes = [image.shape[:2] for image in images]
    return {
        **passed_on,
        "image_id": np.array([str(image_id) for image_id in batch["image_id"][indices]], dtype=object),
        # Strings or None: a block whose uris are all None arrives as floats (NaN), which
        # would not join the string uris of other blocks in an actor's batch.
        "uri": object_array([uri if isinstance(uri, str) else None for uri in batch["uri"][indices]]),
        "image": object_array(images),
        "height": np.array([height for height, _ in sizes], dtype=np.int32),
        "width": np.array([width for _, width in sizes], dtype=np.int32),
        "status": np.array([STATUS_OK if error is None else STATUS_ERROR for error in errors], dtype=object),
        "error": np.array(errors, dtype=object),
    }


def object_array(items: list) -> np.ndarray:
    """A 1-D object array of `items` (numpy would otherwise try to stack same-shape images)."""
    array = np.empty(len(items), dtype=object)
    for index, item in enumerate(items):
        array[index] = item
    return array
