"""Filesystems for paths and URIs (local, s3://, gs://, file://) through fsspec.

Endpoints, regions and credentials come from the standard places (AWS_* / GOOGLE_* env
vars, profiles, instance metadata) or from explicit storage options; transient errors are
retried by the storage libraries themselves, configured here.
"""

from __future__ import annotations

import json
import posixpath
from glob import has_magic

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

# botocore's standard retry mode: exponential backoff on throttling, 5xx and connection
# errors; s3fs retries on top of it for its own set of errors.
S3_RETRIES = {"retries": {"max_attempts": 8, "mode": "standard"}}


def with_defaults(uri: str, storage_options: dict | None) -> dict:
    """The user's storage options plus our defaults for the filesystem of `uri` (theirs win)."""
    options = dict(storage_options or {})
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol in ("s3", "s3a"):
        options.setdefault("config_kwargs", S3_RETRIES)
    return options


class StorageError(ValueError):
    """A URI whose filesystem is not installed."""


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `uri` and the path within it (protocol stripped);
    StorageError when its package is missing (gcsfs for gs://, say)."""
    try:
        return fsspec.core.url_to_fs(uri, **with_defaults(uri, storage_options))
    except ImportError as e:
        extra = " (pip install 'rayseg[gcs]')" if fsspec.core.split_protocol(uri)[0] in ("gs", "gcs") else ""
        raise StorageError(f"cannot open {uri}: {e}{extra}") from None


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as users write it: plain for local files, with the protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def absolute_uri(uri: str, storage_options: dict | None = None) -> str:
    """`uri` as any process reads it: a local path made absolute, a URI as it is. Ray's
    workers need not share the driver's working directory (Ray Train's run in their own)."""
    return full_uri(*filesystem(uri, storage_options))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem for pyarrow and Ray's Parquet reader and writer."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Deletes the file or the tree at `path`, taken as written.

    fsspec's rm() on an object store reads "[", "*" and "?" in a path as a glob: it would
    delete what the pattern matches instead ("out[1]/_staging" → "out1/_staging").
    """
    if isinstance(fs, LocalFileSystem) or not has_magic(path):
        fs.rm(path, recursive=True)
        return
    for file in fs.find(path):
        fs.rm_file(file)


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Moves the file `source` to `target`, both taken as written (see `remove`)."""
    if isinstance(fs, LocalFileSystem) or not has_magic(source):
        fs.mv(source, target)
        return
    fs.cp_file(source, target)
    fs.rm_file(source)


def join_uri(root: str, path: str) -> str:
    """`path` under `root`, unless `path` is already absolute or a URI."""
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(root.rstrip("/"), path)


def parse_storage_options(pairs: list[str], flag: str = "--storage-option") -> dict:
    """KEY=VALUE pairs → options; values that parse as JSON (true, 3, {"a": 1}) are typed.
    flag: the command-line option the pairs came from, for the error."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {key!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
