"""Repeated image ids in a committed run's files: found exactly, with 8 bytes per row held."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayseg.pipeline.repeated_ids import RepeatedIds, find_repeated_ids, id_hashes

local = fsspec.filesystem("file")


def files_of(tmp_path, *id_lists: list[str]) -> list[str]:
    paths = []
    for index, ids in enumerate(id_lists):
        path = str(tmp_path / f"part-{index}.parquet")
        pq.write_table(pa.table({"image_id": pa.array(ids, pa.string())}), path)
        paths.append(path)
    return paths


def hashes_of(paths: list[str]) -> list[np.ndarray]:
    return [id_hashes(pq.read_table(path)["image_id"]) for path in paths]


def test_unique_ids_have_no_repeats(tmp_path):
    paths = files_of(tmp_path, ["a", "b"], ["c"], [])
    assert find_repeated_ids(local, paths, hashes_of(paths)) == RepeatedIds()


def test_ids_repeated_within_and_across_files_are_counted_once_each(tmp_path):
    paths = files_of(tmp_path, ["a", "b", "a"], ["c", "b"], ["b", "d"])
    found = find_repeated_ids(local, paths, hashes_of(paths))
    assert found.ids == 2 and sorted(found.examples) == ["a", "b"]  # a: 2 rows, b: 3 rows


def test_equal_hashes_of_different_ids_are_not_repeats(tmp_path):
    paths = files_of(tmp_path, ["a", "b"], ["c"])
    collision = [np.array([7, 9], np.uint64), np.array([7], np.uint64)]  # "a" and "c" hash alike
    assert find_repeated_ids(local, paths, collision) == RepeatedIds()


def test_equal_ids_hash_equal_across_calls_and_chunks():
    ids = pa.chunked_array([["x", "y"], ["x"]])
    hashes = id_hashes(ids)
    assert hashes.dtype == np.uint64 and hashes[0] == hashes[2] != hashes[1]
    assert (id_hashes(pa.array(["x"])) == hashes[0]).all()
