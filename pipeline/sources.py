"""Sources: an INPUT → a dataset of {image_id, uri}.

INPUT is one of
- a directory or URI prefix: listed once, recursively, for image files;
- a Parquet or CSV manifest with a `uri` column (optional `image_id`), read as a Ray
  dataset — millions of rows are streamed, never loaded into the driver, never listed;
- a COCO json: `images[].file_name` joined to `image_root`, `image_id` = the COCO id.
Relative manifest uris are joined to `image_root` when it is given.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from .storage import arrow_filesystem, filesystem, full_uri, join_uri

log = logging.getLogger("rayseg.pipeline")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MANIFEST_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "coco"}

# Rows per input block: enough blocks for every decode task to have work from the start,
# few enough that the driver's per-block bookkeeping stays small. Decoding streams each
# block out in bounded batches (pipeline/decode.py), so this does not bound memory.
ROWS_PER_BLOCK = 256
# A listing of few images is still cut into this many blocks per CPU: with one block per
# actor the stages could not overlap, and the first actor would take the work a second
# one starting moments later should share. Blocks may hold less than a model batch: Ray
# Data gives each actor up to two blocks at a time, and with two large blocks the first
# actor ready would take them both (measured in BENCHMARKS.md, fifth pass).
BLOCKS_PER_CPU = 4
# CPUs the task that streams a manifest holds for the whole run (Ray's default for a read).
MANIFEST_READER_CPUS = 1.0
# Files a listing gathers as Python strings before it turns them into one Arrow table: the
# driver's per-file Python objects are at most this many (a few MiB), whatever the tree.
LISTING_CHUNK_ROWS = 32_768


class SourceError(ValueError):
    """An INPUT that names no images or cannot be read."""


def source_kind(input_uri: str) -> str:
    """'parquet', 'csv' or 'coco' for manifest files (by extension), else 'directory'."""
    return MANIFEST_EXTENSIONS.get(posixpath.splitext(input_uri.rstrip("/"))[1].lower(), "directory")


def list_images(
    input_uri: str, storage_options: dict | None = None, fingerprint: Callable[[dict], str] | None = None
) -> pa.Table:
    """Every image file under a directory or URI prefix, recursively, sorted by path.

    Returns a table with `image_id` (the path relative to the input, '/'-separated), `uri`
    (where to read it) and `error` (why the file cannot be read, for names that are not
    UTF-8; else null); with `fingerprint`, also a `fingerprint` column: what it makes of
    the listing's entry for each file (fsspec's detail dict of it, as `fs.info` gives). Files
    with other extensions are skipped; a directory without images gives an empty table.

    The listing streams: directories are read one at a time and their images appended to
    Arrow tables of LISTING_CHUNK_ROWS rows, so the driver holds per-file Python objects
    only for the chunk being built, then Arrow's strings (BENCHMARKS.md, issue 25).
    """
    fs, root = filesystem(input_uri, storage_options)
    if not fs.exists(root):
        raise SourceError(f"input not found: {input_uri}")
    if not fs.isdir(root):
        raise SourceError(f"input is neither a directory nor a manifest (.parquet, .csv, .json): {input_uri}")
    root = root.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        # fsspec's own detail dict of a scandir entry, as fs.find gave it: the same fingerprints.
        entries, detail = ((entry.path, entry) for entry in _local_files(root)), fs.info
    else:
        entries, detail = ((info["name"], info) for info in _store_files(fs, root)), None
    chunks, keys, paths, prints = [], [], [], []
    for path, entry in entries:
        if posixpath.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        if fingerprint is not None:
            try:
                prints.append(fingerprint(detail(entry) if detail else entry))
            except FileNotFoundError:  # removed since its directory was read: fs.find skipped it too
                continue
        paths.append(path)
        if len(paths) == LISTING_CHUNK_ROWS:
            chunks.append(_listing_chunk(fs, root, paths, prints if fingerprint is not None else None, keys))
            paths, prints = [], []
    if paths or not chunks:
        chunks.append(_listing_chunk(fs, root, paths, prints if fingerprint is not None else None, keys))
    # Sorted by path as fs.find sorted it: Python's code point order, which is the byte order
    # of the keys (UTF-8, surrogate-escaped bytes included).
    return pa.concat_tables(chunks).take(pc.sort_indices(pa.chunked_array(keys, pa.binary())))


def _local_files(root: str) -> Iterator[os.DirEntry]:
    """Every entry under a local directory that is not a directory, one at a time, as
    fs.find lists them: hidden ones too, symlinks (to files or directories) as files, never
    followed; a directory that cannot be read is skipped, as fsspec's walk skips it."""
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            # One directory open at a time: its subdirectories wait in `pending`.
            with os.scandir(directory) as found:
                for entry in found:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        yield entry
        except OSError:
            continue


def _store_files(fs, root: str) -> Iterator[dict]:
    """fsspec's detail dict of every file under `root` of a remote filesystem, one
    directory (an object store's prefix) listed at a time."""
    # on_error="raise": fs.find's flat listing of an object store raised on a refused listing
    # (s3fs, gcsfs), which open_source reports; omitting it would say "no images" instead.
    for directory, _, files in fs.walk(root, detail=True, on_error="raise"):
        yield from files.values()
        # The filesystem caches every listing for the life of the process (s3fs, gcsfs):
        # dropped once read, else the whole tree's details would stay on the driver.
        fs.invalidate_cache(directory)


def _listing_chunk(fs, root: str, paths: list[str], prints: list[str] | None, keys: list[pa.Array]) -> pa.Table:
    """The listing's rows for `paths` as a table; their sort keys are appended to `keys`."""
    ids, uris, errors = [], [], []
    start = len(root) + 1  # every listed path is root + "/" + its path below it
    for path in paths:
        image_id, uri = path[start:], full_uri(fs, path)
        if _utf8(uri):
            errors.append(None)
        else:
            # Not representable in the output (Arrow strings are UTF-8): an error row whose
            # id and uri show the undecodable bytes escaped.
            image_id, uri = _escaped(image_id), _escaped(uri)
            errors.append(f"file name is not valid UTF-8: {uri}")
        ids.append(image_id)
        uris.append(uri)
    columns = {"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()), "error": pa.array(errors, pa.string())}
    if prints is not None:
        columns["fingerprint"] = pa.array(prints, pa.string())
    if any(error is not None for error in errors):
        # An escaped uri sorts elsewhere than its name did: the key is the name's own bytes.
        keys.append(pa.array([full_uri(fs, path).encode("utf-8", "surrogatepass") for path in paths], pa.binary()))
    else:
        keys.append(columns["uri"].view(pa.binary()))  # the uri's bytes, not copied
    return pa.table(columns)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _escaped(text: str) -> str:
    """A file name with undecodable bytes (surrogate-escaped by the OS layer) shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def coco_images(annotations_uri: str, image_root: str, storage_options: dict | None = None) -> pa.Table:
    """{image_id: str(COCO id), uri: image_root/file_name, error: null} for every image of a COCO json."""
    fs, path = filesystem(annotations_uri, storage_options)
    with fs.open(path, "rb") as f:
        try:
            data = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise SourceError(f"{annotations_uri} is not valid JSON: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not images or not isinstance(images, list):
        raise SourceError(f"{annotations_uri} is not a COCO json with a non-empty 'images' list")
    if any(not isinstance(image, dict) or image.get("id") is None for image in images):
        raise SourceError(f"{annotations_uri}: every COCO image needs an 'id' (one is null or missing)")
    for image in images:  # a missing file_name is the KeyError below
        if "file_name" in image and not (isinstance(image["file_name"], str) and image["file_name"]):
            raise SourceError(f"{annotations_uri}: image {image['id']!r} has file_name {image['file_name']!r}, not a path")
    try:
        table = pa.table(
            {
                "image_id": [str(image["id"]) for image in images],
                "uri": [join_uri(image_root, image["file_name"]) for image in images],
                "error": pa.nulls(len(images), pa.string()),
            }
        )
    except KeyError as e:
        raise SourceError(f"{annotations_uri}: every COCO image needs 'id' and 'file_name' (missing {e})") from None
    # Rows are joined on image_id (resume, export, evaluation): two images under one id would
    # be one image to them.
    counts = pc.value_counts(table["image_id"])
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise SourceError(
            f"{annotations_uri}: COCO image ids must be unique; {len(repeated)} repeat, e.g. {repeated[0].as_py()!r}"
        )
    return table


def _manifest_columns(fs, path: str, kind: str) -> list[str]:
    """Column names of a manifest, read from its Parquet footer or CSV header only."""
    if kind == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    # utf-8-sig: a CSV saved as "CSV UTF-8" (Excel) begins with a byte-order mark, which
    # would otherwise be part of the first column's name. Arrow's CSV reader skips it too.
    with fs.open(path, "rt", newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(io.StringIO(f.readline())), [])


def _parquet_rows(manifest_uri: str, storage_options: dict | None) -> int:
    """A Parquet manifest's row count, from its footer."""
    fs, path = filesystem(manifest_uri, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def _blank_as_null(strings: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(strings), ""), pa.scalar(None, pa.string()), strings)


def normalise_manifest(batch: pa.Table, image_root: str | None) -> pa.Table:
    """Manifest rows → {image_id, uri}: uris joined to `image_root`, ids derived when absent.

    A derived image_id is the uri as written in the manifest (relative to `image_root`
    when given), so it stays stable if the images move. A row without a uri is kept (as
    an error row downstream), never dropped.
    """
    # An empty uri or image_id is none (a CSV's empty cell): an empty uri would name the
    # working directory.
    written = _blank_as_null(pc.cast(batch["uri"], pa.string()))
    uris = [u if u is None or image_root is None else join_uri(image_root, u) for u in written.to_pylist()]
    ids = _blank_as_null(pc.cast(batch["image_id"], pa.string())) if "image_id" in batch.column_names else written
    ids = pc.fill_null(pc.coalesce(ids, written), "")
    errors = pa.array([None if u is not None else "manifest row has no uri" for u in uris], pa.string())
    return pa.table({"image_id": ids, "uri": pa.array(uris, pa.string()), "error": errors})


def check_manifest(
    manifest_uri: str, kind: str, storage_options: dict | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    """The columns a Parquet or CSV manifest gives ({image_id,} uri, then those of `extra` it
    has), read from its footer or header only; SourceError when it is missing or has no
    `uri` column."""
    fs, path = filesystem(manifest_uri, storage_options)
    if not fs.exists(path):
        raise SourceError(f"manifest not found: {manifest_uri}")
    columns = _manifest_columns(fs, path, kind)
    if "uri" not in columns:
        raise SourceError(f"manifest {manifest_uri} has no 'uri' column (columns: {', '.join(columns) or 'none'})")
    return [c for c in ("image_id", "uri", *extra) if c in columns]


def read_manifest(
    manifest_uri: str, kind: str, wanted: list[str], *, image_root: str | None = None, storage_options: dict | None = None
) -> ray.data.Dataset:
    """A Parquet or CSV manifest as a lazy Ray dataset of {image_id, uri}; `wanted`: the
    columns `check_manifest` found."""
    fs, path = filesystem(manifest_uri, storage_options)
    # Read, normalise and re-block fuse into one streaming task of one CPU, alive while
    # the manifest streams (pipeline/resources.py leaves room for it).
    if kind == "parquet":
        dataset = ray.data.read_parquet(path, filesystem=arrow_filesystem(fs))
        dataset = dataset.select_columns(wanted)
    else:
        import pyarrow.csv as pacsv

        dataset = ray.data.read_csv(
            path,
            filesystem=arrow_filesystem(fs),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types={c: pa.string() for c in wanted}
            ),
        )
    return dataset.map_batches(
        normalise_manifest,
        fn_kwargs={"image_root": image_root},
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    ).repartition(target_num_rows_per_block=ROWS_PER_BLOCK)


def manifest_table(
    manifest_uri: str,
    kind: str,
    *,
    image_root: str | None = None,
    storage_options: dict | None = None,
    extra: tuple[str, ...] = (),
) -> pa.Table:
    """A Parquet or CSV manifest read whole on the driver, for an index of it (re-labelling);
    `read_manifest` streams one to run over it. Its rows are normalised as a streamed
    manifest's are ({image_id, uri, error}, ids and uris as written, never retyped), plus
    those of the `extra` columns it has, as strings (blank: null)."""
    wanted = check_manifest(manifest_uri, kind, storage_options, extra)
    fs, path = filesystem(manifest_uri, storage_options)
    with fs.open(path, "rb") as f:
        if kind == "parquet":
            table = pq.read_table(f, columns=wanted)
        else:
            import pyarrow.csv as pacsv

            options = pacsv.ConvertOptions(include_columns=wanted, column_types={c: pa.string() for c in wanted})
            table = pacsv.read_csv(f, convert_options=options)
    rows = normalise_manifest(table, image_root)
    for column in wanted:
        if column in extra:
            rows = rows.append_column(column, _blank_as_null(pc.cast(table[column], pa.string())))
    return rows


def dataset_from_table(table: pa.Table, parallelism: int) -> ray.data.Dataset:
    """A Ray dataset of `table` in blocks of at most ROWS_PER_BLOCK rows, and at least
    BLOCKS_PER_CPU × `parallelism` (the cluster's CPUs) of them while rows last."""
    if not table.num_rows:
        return ray.data.from_blocks([table])
    blocks = max(min(table.num_rows, BLOCKS_PER_CPU * parallelism), math.ceil(table.num_rows / ROWS_PER_BLOCK))
    size = math.ceil(table.num_rows / blocks)
    # from_blocks takes the blocks' metadata from the driver's own tables; from_arrow would
    # run a remote task per block for it and wait, about 0.7 s before the pipeline starts.
    return ray.data.from_blocks([table.slice(start, size) for start in range(0, table.num_rows, size)])


@dataclass(frozen=True)
class Source:
    """An INPUT checked on the driver, before any cluster work: a listing's or a COCO json's
    rows, read whole (`table`), or a manifest, checked from its footer or header and
    streamed only by `dataset`."""

    uri: str
    kind: str
    table: pa.Table | None = None
    columns: tuple[str, ...] = ()  # a manifest's, as check_manifest found them
    image_root: str | None = None
    limit: int | None = None
    storage_options: dict | None = None
    footer_rows: int | None = None  # a Parquet manifest's, from its footer

    @property
    def rows(self) -> int | None:
        """The number of rows when known before the run (None for a manifest)."""
        return None if self.table is None else self.table.num_rows

    @property
    def expected_rows(self) -> int | None:
        """The number of rows the dataset will give, when known without reading them: a
        table's, or a Parquet manifest's (its footer), at most `limit`; None for a CSV."""
        if self.table is not None:
            return self.table.num_rows
        if self.footer_rows is None:
            return None
        return self.footer_rows if self.limit is None else min(self.footer_rows, self.limit)

    def dataset(self, parallelism: int = 2) -> ray.data.Dataset:
        """The lazy {image_id, uri} dataset; a table is cut into blocks as `dataset_from_table`
        says for `parallelism` CPUs."""
        if self.table is not None:
            return dataset_from_table(self.table, parallelism)
        dataset = read_manifest(
            self.uri, self.kind, list(self.columns), image_root=self.image_root, storage_options=self.storage_options
        )
        return dataset.limit(self.limit) if self.limit is not None else dataset


def open_source(
    input_uri: str,
    *,
    storage_options: dict | None = None,
    image_root: str | None = None,
    limit: int | None = None,
) -> Source:
    """INPUT (see the module docstring), at most `limit` rows, checked without Ray: a
    listing is listed, a COCO json read, a manifest's columns checked (SourceError, also
    when the storage refuses: no credentials, no permission, no such bucket)."""
    try:
        return _open_source(input_uri, storage_options, image_root, limit)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the storage said no; with -v the traceback is logged
        log.debug("reading %s failed", input_uri, exc_info=True)
        raise SourceError(f"cannot read {input_uri}: {type(e).__name__}: {e}") from None


def _open_source(input_uri: str, storage_options: dict | None, image_root: str | None, limit: int | None) -> Source:
    kind = source_kind(input_uri)
    if kind in ("parquet", "csv"):
        columns = tuple(check_manifest(input_uri, kind, storage_options))
        footer_rows = _parquet_rows(input_uri, storage_options) if kind == "parquet" else None
        return Source(
            input_uri, kind, columns=columns, image_root=image_root, limit=limit, storage_options=storage_options, footer_rows=footer_rows
        )
    if kind == "coco":
        if image_root is None:
            raise SourceError(f"a COCO json input needs --image-root (the directory its file_names are relative to): {input_uri}")
        table = coco_images(input_uri, image_root, storage_options)
    else:
        if image_root is not None:
            raise SourceError("--image-root applies to manifest and COCO json inputs, not to a directory")
        table = list_images(input_uri, storage_options)
        if not table.num_rows:
            raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {input_uri}")
    if limit is not None:
        table = table.slice(0, limit)
    return Source(input_uri, kind, table)


def read_source(
    input_uri: str,
    *,
    storage_options: dict | None = None,
    image_root: str | None = None,
    limit: int | None = None,
    parallelism: int = 2,
) -> ray.data.Dataset:
    """The lazy {image_id, uri} dataset for INPUT (see the module docstring), at most `limit` rows."""
    return open_source(input_uri, storage_options=storage_options, image_root=image_root, limit=limit).dataset(parallelism)
