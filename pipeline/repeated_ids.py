"""Image ids that name more than one output row, found in a committed run's files.

Export, evaluation and resume join on image_id, so two rows under one id are one image to
them. A listing or a COCO json is checked for this before the run (pipeline/sources.py); a
streamed manifest cannot be without a pass over it, so its rows are checked once written.

The check holds 8 bytes per row (a 64-bit hash of each id), not the ids: a run of ten
million images costs the driver 80 MB, and about 1.2 s per million rows on a 2-core machine
(the ids read from 200 local files, hashed and checked). Ids whose hashes repeat are then
read again and compared as strings, so a hash collision is never reported as a repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EXAMPLES = 3


@dataclass(frozen=True)
class RepeatedIds:
    """How many image ids name more than one row, and a few of those ids."""

    ids: int = 0
    examples: tuple[str, ...] = ()


def id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """uint64 hash per image id (pandas' SipHash with its fixed key: equal ids, equal hashes)."""
    return pd.util.hash_array(ids.to_numpy(zero_copy_only=False)) if len(ids) else np.empty(0, np.uint64)


def repeated_hashes(hashes: list[np.ndarray]) -> np.ndarray:
    """The hash values that occur more than once among `hashes`, sorted."""
    ordered = np.sort(np.concatenate(hashes)) if hashes else np.empty(0, np.uint64)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def find_repeated_ids(fs, files: list[str], hashes: list[np.ndarray]) -> RepeatedIds:
    """The ids repeated across `files` (Parquet with an image_id column, read through `fs`),
    given `hashes`: `id_hashes` of each file's image_id column, in the same order."""
    suspects = repeated_hashes(hashes)
    if not len(suspects):
        return RepeatedIds()
    candidates = []
    for path, file_hashes in zip(files, hashes):
        suspect_rows = np.isin(file_hashes, suspects)
        if suspect_rows.any():
            with fs.open(path, "rb") as f:
                ids = pq.ParquetFile(f).read(columns=["image_id"])["image_id"].combine_chunks()
            candidates.append(ids.filter(pa.array(suspect_rows)))
    counts = pc.value_counts(pa.chunked_array(candidates, pa.string()))
    values = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    return RepeatedIds(len(values), tuple(values[:EXAMPLES].to_pylist()))
