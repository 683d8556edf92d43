"""Whether a checkpoint file is whole: torch-free, for the driver to check before any actor
loads it (a truncated upload would otherwise fail in every actor, after the pool started).

safetensors: an 8-byte little-endian header length, a JSON header whose tensors' byte
ranges must tile the data that follows, to the end of the file. torch.save files (.pth,
.pt, .bin) since torch 1.6 are zip archives, whose directory sits at the end of the file.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from collections.abc import Callable
from typing import IO

# safetensors' own limit on the header (100 MB).
MAX_SAFETENSORS_HEADER = 100_000_000
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
ZIP_MAGIC = b"PK\x03\x04"


def checkpoint_problem(path: str, head: bytes, size: int, reopen: Callable[[], IO[bytes]]) -> str | None:
    """What is wrong with the checkpoint file at `path`, or None if it looks whole.

    head: the file's first bytes (at least its safetensors header, when it has one);
    size: its length in bytes; reopen: opens it again (seekable) when the end must be read.
    """
    if path.endswith(".safetensors"):
        return _safetensors_problem(head, size, reopen)
    if head.startswith(ZIP_MAGIC):
        with reopen() as f:
            try:
                zipfile.ZipFile(f).close()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                return f"a torch.save archive that is truncated or corrupt ({e})"
    # Anything else (torch's legacy pickle format) is left to torch.load(weights_only=True).
    return None


def _safetensors_problem(head: bytes, size: int, reopen: Callable[[], IO[bytes]]) -> str | None:
    if size < 8:
        return f"not a safetensors file: {size} bytes"
    (header_length,) = struct.unpack("<Q", head[:8])
    if header_length > min(MAX_SAFETENSORS_HEADER, size - 8):
        return f"not a safetensors file, or truncated: a {header_length}-byte header in a {size}-byte file"
    if len(head) < 8 + header_length:
        with reopen() as f:
            head = f.read(8 + header_length)
    try:
        header = json.loads(head[8 : 8 + header_length])
        ends = [_tensor_end(name, entry) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return f"not a safetensors file: its header does not parse ({e})"
    expected = 8 + header_length + max(ends, default=0)
    if expected != size:
        return f"truncated or corrupt: its header describes {expected} bytes, the file has {size}"
    return None


def _tensor_end(name: str, entry: dict) -> int:
    """Where a tensor's bytes end in the data section; ValueError if its range does not fit
    its dtype and shape."""
    begin, end = entry["data_offsets"]
    expected = SAFETENSORS_DTYPE_BYTES[entry["dtype"]] * math.prod(entry["shape"])
    if not 0 <= begin <= end or end - begin != expected:
        raise ValueError(f"tensor {name!r} spans bytes {begin}–{end}, its dtype and shape need {expected}")
    return end
