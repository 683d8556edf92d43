"""Filesystems for paths and URIs (local, s3://, gs://, file://) through fsspec."""

from __future__ import annotations

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `uri` and the path within it (protocol stripped)."""
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as users write it: plain for local files, with the protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem for pyarrow and Ray's Parquet writer."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
