"""Incremental, versioned re-labelling of a dataset.

ROOT/versions/v0001/, v0002/, ... each hold

    predictions/     a complete, committed rayseg OUTPUT over the source as it was
    coco.json        the version's predictions as a COCO dataset (for labelling tools)
    diff.json, .md   what changed since the previous version
    _index.parquet   image_id, uri, fingerprint of every source image of that version

Only new or changed images (fingerprint: the object's etag, else size + mtime) go through
the model; unchanged images' rows are carried forward from the previous version. A source
without changes makes no new version.

A run that dies (preempted, past its deadline) leaves an unfinished version: its index and
the rows it staged, but no committed predictions. The next run writes a new version and
takes from unfinished ones the staged rows of images it still has to do, where the image's
fingerprint has not changed since and the same model, weights and options made them; it
then deletes the unfinished versions. A dataset too large for one run's deadline is thus
finished over several runs.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from .. import __version__
from ..pipeline.export import export_coco_dataset
from ..pipeline.progress import start_error_tally
from ..pipeline.schema import OUTPUT_SCHEMA, STATUS_OK
from ..pipeline.segment import declared_categories, pin_weights, segment
from ..pipeline.sink import (
    RUN_FILE,
    committed_files,
    read_attempt,
    staged_files,
    write_run,
)
from ..pipeline.sources import (
    SourceError,
    dataset_from_table,
    list_images,
    manifest_table,
    source_kind,
)
from ..pipeline.storage import arrow_filesystem, filesystem, full_uri, remove
from . import cluster
from .runner import model_spec, plan_on_cluster
from .spec import RelabelSpec

log = logging.getLogger("rayseg")

VERSIONS_DIR = "versions"
INDEX_FILE = "_index.parquet"
DIFF_FILE = "diff.json"
COCO_FILE = "coco.json"
PREDICTIONS_DIR = "predictions"
INDEX_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("fingerprint", pa.string())])


@dataclass(frozen=True)
class Version:
    name: str
    path: str
    run: dict
    diff: dict


def fingerprint(info: dict) -> str:
    """What identifies an object's content without reading it: its etag, else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    return f"size:{info.get('size')}:mtime:{mtime}"


def source_index(source: str, image_root: str | None, storage_options: dict) -> pa.Table:
    """{image_id, uri, fingerprint, error} of every image of a directory/prefix or manifest
    source; `error` says why a row cannot be read (as the row `segment` would give it).

    A listing returns each object's etag or size and mtime with its name; a manifest may
    carry an `etag` column, else each object is looked up. An object that cannot be looked
    up (missing, say) is fingerprinted by the failure, so it becomes an error row, and is
    segmented again once it can be.
    """
    kind = source_kind(source)
    if kind == "directory":
        return list_images(source, storage_options, fingerprint=fingerprint)
    if kind != "parquet" and kind != "csv":
        raise SourceError(f"relabel sources are directories, prefixes or Parquet/CSV manifests, not {source}")
    table = manifest_table(source, kind, image_root=image_root, storage_options=storage_options, extra=("etag",))
    etags = table["etag"].to_pylist() if "etag" in table.column_names else [None] * table.num_rows
    prints = [
        fingerprint({"etag": etag}) if etag else _looked_up(uri, storage_options)
        for uri, etag in zip(table["uri"].to_pylist(), etags)
    ]
    return table.select(["image_id", "uri", "error"]).append_column("fingerprint", pa.array(prints, pa.string()))


def _looked_up(uri: str | None, storage_options: dict) -> str:
    """The fingerprint of the object at `uri`, or of why it cannot be looked up."""
    if uri is None:
        return "none"
    try:
        return fingerprint(filesystem(uri, storage_options)[0].info(uri))
    except Exception as e:  # noqa: BLE001 - this row's error, found again when it is read
        return f"unreadable:{type(e).__name__}"


def has_versions_dir(root: str, storage_options: dict | None = None) -> bool:
    """Whether ROOT is a relabel output root: it holds a versions/ directory."""
    fs, base = filesystem(root, storage_options)
    return fs.exists(posixpath.join(base, VERSIONS_DIR))


def list_versions(root: str, storage_options: dict | None = None) -> list[Version]:
    """Committed versions under ROOT, oldest first (a version whose predictions never
    committed does not count)."""
    fs, base = filesystem(root, storage_options)
    directory = posixpath.join(base, VERSIONS_DIR)
    if not fs.exists(directory):
        return []
    versions = []
    for path in sorted(fs.ls(directory, detail=False)):
        name = posixpath.basename(path.rstrip("/"))
        run_path = posixpath.join(path, PREDICTIONS_DIR, RUN_FILE)
        index_path = posixpath.join(path, INDEX_FILE)
        if not (name.startswith("v") and fs.exists(run_path) and fs.exists(index_path)):
            continue
        diff_path = posixpath.join(path, DIFF_FILE)
        diff = json.loads(fs.cat_file(diff_path)) if fs.exists(diff_path) else {}
        versions.append(Version(name, full_uri(fs, path), json.loads(fs.cat_file(run_path)), diff))
    return versions


@dataclass(frozen=True)
class Unfinished:
    """A version whose run died before its commit: its name and path (full URI)."""

    name: str
    path: str


def _version_number(name: str) -> int | None:
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else None


def unfinished_versions(root: str, after: str | None, storage_options: dict | None = None) -> list[Unfinished]:
    """Versions newer than `after` (the last committed one) whose predictions never
    committed, newest first."""
    fs, base = filesystem(root, storage_options)
    directory = posixpath.join(base, VERSIONS_DIR)
    if not fs.exists(directory):
        return []
    newer_than = _version_number(after) if after else 0
    found = []
    for path in fs.ls(directory, detail=False):
        name = posixpath.basename(path.rstrip("/"))
        number = _version_number(name)
        index_path = posixpath.join(path, INDEX_FILE)
        if number is None or number <= newer_than or fs.exists(posixpath.join(path, PREDICTIONS_DIR, RUN_FILE)):
            continue
        if not fs.exists(index_path):
            continue  # died before it wrote its index: it staged nothing
        found.append(Unfinished(name, full_uri(fs, path)))
    return sorted(found, key=lambda version: _version_number(version.name), reverse=True)


def recoverable_rows(
    unfinished: list[Unfinished], todo: pa.Table, attempt: dict, storage_options: dict | None = None
) -> list[tuple[Unfinished, list[str], pa.Table]]:
    """Per unfinished version (newest first) that this run can take rows from: its complete
    staged files, and the image ids (a one-column table) to take from them — images in
    `todo` whose fingerprint is the one the unfinished version saw, staged once by a run begun
    with the same `attempt` (model, weights, options). Each image is taken once."""
    keys = ["image_id", "fingerprint"]
    remaining = todo.select(keys)
    attempt = json.loads(json.dumps(attempt))  # as it reads back: tuples become lists
    found = []
    for version in unfinished:
        predictions = _predictions(version.path)
        began = read_attempt(predictions, version.name, storage_options)
        if began != attempt:
            if began is not None:
                log.info("not reusing unfinished %s: it was begun with another model, weights or options", version.name)
            continue
        files = staged_files(predictions, version.name, storage_options)
        if not files:
            continue
        fs, _ = filesystem(predictions, storage_options)
        # Read only now: an index holds a row per source image, millions of them.
        index = _read_index(version, storage_options)
        staged = pa.concat_tables([_image_ids(fs, path) for path in files])
        # An image staged twice (a write retried under another file name) is segmented
        # again rather than taken twice.
        counts = staged.group_by("image_id").aggregate([("image_id", "count")])
        staged = counts.filter(pc.equal(counts["image_id_count"], 1)).select(["image_id"])
        usable = (
            remaining.join(index.select(keys), keys=keys, join_type="left semi")
            .join(staged, keys="image_id", join_type="left semi")
            .select(["image_id"])
        )
        if usable.num_rows:
            found.append((version, files, usable))
            remaining = remaining.join(usable, keys="image_id", join_type="left anti")
    return found


def _image_ids(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=["image_id"])


def _rows_of_images(fs, paths: list[str], image_ids: pa.Table, parallelism: int) -> ray.data.Dataset:
    """The rows of `image_ids` (a one-column table) in the output files `paths`: a
    distributed semi-join, as the files may hold millions of rows."""
    return ray.data.read_parquet(paths, filesystem=arrow_filesystem(fs), schema=OUTPUT_SCHEMA).join(
        ray.data.from_arrow(image_ids),
        join_type="left_semi",
        num_partitions=parallelism,
        on=("image_id",),
        # The join's aggregators finish before the actor pool needs the CPUs; a quarter
        # CPU each keeps them schedulable beside it on small machines.
        aggregator_ray_remote_args={"num_cpus": 0.25},
    )


def _next_name(root: str, storage_options: dict) -> str:
    """v0001, v0002, ...: one past every directory present, committed or not, so a version
    that died half-written is never overwritten."""
    fs, base = filesystem(root, storage_options)
    directory = posixpath.join(base, VERSIONS_DIR)
    taken = [posixpath.basename(p.rstrip("/")) for p in fs.ls(directory, detail=False)] if fs.exists(directory) else []
    numbers = [number for name in taken if (number := _version_number(name)) is not None]
    return f"v{max(numbers, default=0) + 1:04d}"


def _predictions(version_path: str) -> str:
    return posixpath.join(version_path, PREDICTIONS_DIR)


def _read_index(version: Version | Unfinished, storage_options: dict) -> pa.Table:
    fs, path = filesystem(version.path, storage_options)
    with fs.open(posixpath.join(path, INDEX_FILE), "rb") as f:
        return pq.read_table(f, schema=INDEX_SCHEMA)


def _label_counts(files: list[str], ids: set[str], storage_options: dict) -> dict[str, Counter]:
    """Per image in `ids`: how many segments of each label its row holds."""
    counts: dict[str, Counter] = {}
    for uri in files:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read(columns=["image_id", "segments.list.element.label"])
        for image_id, segments in zip(table["image_id"].to_pylist(), table["segments"].to_pylist()):
            if image_id in ids:
                counts[image_id] = Counter(s["label"] for s in segments)
    return counts


def diff_versions(
    previous_files: list[str],
    current_files: list[str],
    added: set,
    removed: set,
    changed: set,
    retried: set,
    relabelled: set,
    storage_options: dict,
) -> dict:
    """Images added/removed/changed, retried (error rows segmented again) and relabelled
    (segmented again by another model, weights or options) and, per label, segments added
    and removed."""
    again = changed | retried | relabelled
    before = _label_counts(previous_files, removed | again, storage_options)
    after = _label_counts(current_files, added | again, storage_options)
    per_label: dict[str, dict[str, int]] = {}
    for image_id in added | removed | again:
        old, new = before.get(image_id, Counter()), after.get(image_id, Counter())
        for label in old.keys() | new.keys():
            entry = per_label.setdefault(label, {"added": 0, "removed": 0})
            entry["added"] += max(0, new[label] - old[label])
            entry["removed"] += max(0, old[label] - new[label])
    groups = {"added": added, "removed": removed, "changed": changed, "retried": retried, "relabelled": relabelled}
    return {
        "images": {name: len(ids) for name, ids in groups.items()},
        "segments_by_label": dict(sorted(per_label.items())),
        "examples": {name: sorted(ids)[:10] for name, ids in groups.items()},
    }


def _error_ids(files: list[str], storage_options: dict) -> pa.Table:
    """{image_id} of the error rows in output `files`."""
    ids = []
    for uri in files:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read(columns=["image_id", "status"])
        ids.append(table.filter(pc.not_equal(table["status"], STATUS_OK))["image_id"].combine_chunks())
    return pa.table({"image_id": pa.concat_arrays(ids) if ids else pa.array([], pa.string())})


def _run_model(model) -> dict:
    """What a version's `_run.json` says of the model that made it, for `model` (pinned)."""
    return {
        "model": model.name,
        "weights_sha256": model.weights_sha256,
        "spec": {"model": {"score_threshold": model.score_threshold, "options": model.options}},
    }


def _model_identity(run: dict) -> tuple:
    """What makes a version's labels what they are, from its `_run.json`: model, weights'
    sha256, score threshold and options (as JSON reads them back)."""
    section = (run.get("spec") or {}).get("model") or {}
    options = json.dumps(section.get("options") or {}, sort_keys=True)  # tuples and lists alike
    return run.get("model"), run.get("weights_sha256"), section.get("score_threshold"), options


def _retries_only(version: Version) -> bool:
    """Whether `version` was made only to retry error rows: its source had not changed."""
    images = version.diff.get("images", {})
    return images.get("retried", 0) > 0 and not any(images.get(k) for k in ("added", "removed", "changed"))


def _diff_markdown(name: str, previous: str | None, diff: dict) -> str:
    images = diff["images"]
    lines = [
        f"# {name} vs {previous or '(nothing)'}",
        "",
        f"Images: {images['added']} added, {images['removed']} removed, {images['changed']} changed, "
        f"{images['retried']} error rows retried, {images['relabelled']} relabelled by another model.",
        "",
        "| label | segments added | segments removed |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {c['added']} | {c['removed']} |" for label, c in diff["segments_by_label"].items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RelabelSummary:
    version: str | None
    path: str | None
    previous: str | None
    processed: int
    carried: int
    diff: dict
    # Rows taken from unfinished versions' staging instead of segmented again.
    recovered: int = 0
    # Unchanged images segmented again because their row was an error.
    retried: int = 0
    # Unchanged images segmented again because the model, weights or options changed.
    relabelled: int = 0


def relabel(spec: RelabelSpec, *, address: str | None = None) -> RelabelSummary:
    """One re-labelling run of `spec`: a new version, or none when the source is unchanged."""
    started = time.time()
    storage_options = spec.storage.resolve()
    model = pin_weights(model_spec(spec), storage_options)
    current = source_index(spec.source, spec.image_root, storage_options)
    versions = list_versions(spec.output_root, storage_options)
    previous = versions[-1] if versions else None
    previous_index = _read_index(previous, storage_options) if previous else INDEX_SCHEMA.empty_table()
    keys = ["image_id", "fingerprint"]
    todo = current.join(previous_index.select(keys), keys=keys, join_type="left anti")
    unchanged = current.join(previous_index.select(keys), keys=keys, join_type="left semi")
    removed = set(previous_index.join(current.select(["image_id"]), keys="image_id", join_type="left anti")["image_id"].to_pylist())
    known = set(previous_index["image_id"].to_pylist())
    todo_ids = todo["image_id"].to_pylist()
    added = {i for i in todo_ids if i not in known}
    changed = set(todo_ids) - added
    previous_files = committed_files(_predictions(previous.path), storage_options) if previous else []
    # Unchanged images segmented again: every one under another model, weights or options
    # (a version is one model's labels), else those whose row is an error (a read that timed
    # out, a worker that died). A source without changes gets a version for its error rows,
    # but not twice in a row: an image that fails every time would otherwise make a version
    # every run.
    model_changed = previous is not None and _model_identity(previous.run) != _model_identity(_run_model(model))
    if model_changed:
        log.info("the model, weights or options differ from %s's: every image is segmented again", previous.name)
        again = unchanged
    else:
        again = unchanged.join(_error_ids(previous_files, storage_options), keys="image_id", join_type="left semi")
    if previous and not todo_ids and not removed and not model_changed and (not again.num_rows or _retries_only(previous)):
        if again.num_rows:
            log.info("%d error rows stay as they are: the last version retried them already", again.num_rows)
        log.info("source unchanged since %s: no new version", previous.name)
        return RelabelSummary(None, None, previous.name, 0, unchanged.num_rows, {"images": {"added": 0, "removed": 0, "changed": 0}})
    again_ids = set(again["image_id"].to_pylist())
    relabelled, retried = (again_ids, set()) if model_changed else (set(), again_ids)
    todo = pa.concat_tables([todo, again.select(todo.column_names)])
    unchanged = unchanged.join(again.select(["image_id"]), keys="image_id", join_type="left anti")

    # What makes a staged row reusable by a later run (recoverable_rows).
    attempt = {
        "source": spec.source,
        "image_root": spec.image_root,
        "model": model.name,
        "weights_sha256": model.weights_sha256,
        "score_threshold": model.score_threshold,
        "options": model.options,
    }
    unfinished = unfinished_versions(spec.output_root, previous.name if previous else None, storage_options)
    recovered = recoverable_rows(unfinished, todo, attempt, storage_options)
    to_segment = todo
    for _, _, image_ids in recovered:
        to_segment = to_segment.join(image_ids, keys="image_id", join_type="left anti")
    name = _next_name(spec.output_root, storage_options)
    fs, base = filesystem(spec.output_root, storage_options)
    version_path = posixpath.join(base, VERSIONS_DIR, name)
    fs.makedirs(version_path, exist_ok=True)
    with fs.open(posixpath.join(version_path, INDEX_FILE), "wb") as f:
        pq.write_table(current.select(INDEX_SCHEMA.names), f)

    ray_seconds = cluster.connect(address)
    resources = plan_on_cluster(spec.resources, spec.model.name).for_rows(to_segment.num_rows)
    parallelism = int(ray.cluster_resources().get("CPU", 1))
    error_tally = start_error_tally()
    parts = []
    for version, files, image_ids in recovered:
        log.info("taking %d staged rows from unfinished %s", image_ids.num_rows, version.name)
        parts.append(_rows_of_images(filesystem(version.path, storage_options)[0], files, image_ids, parallelism))
    if previous_files and unchanged.num_rows:
        prev_fs, _ = filesystem(previous_files[0], storage_options)
        paths = [filesystem(u, storage_options)[1] for u in previous_files]
        parts.append(_rows_of_images(prev_fs, paths, unchanged.select(["image_id"]), parallelism))
    if to_segment.num_rows or not parts:  # a source emptied since the previous version commits no rows
        to_rows = dataset_from_table(to_segment.select(["image_id", "uri", "error"]), parallelism)
        parts.insert(
            0, segment(to_rows, model, resources, storage_options=storage_options, decoded=False, error_tally=error_tally)
        )
    rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    run_info = {
        "rayseg_version": __version__,
        "kind": "relabel",
        "source": spec.source,
        "version": name,
        "previous_version": previous.name if previous else None,
        "model": model.name,
        "weights": model.weights,
        "weights_sha256": model.weights_sha256,
        "spec": spec.model_dump(mode="json", exclude={"storage"}),
        "processed": to_segment.num_rows,
        "recovered": {version.name: image_ids.num_rows for version, _, image_ids in recovered},
        "carried_forward": unchanged.num_rows,
        "retried": len(retried),
        "relabelled": len(relabelled),
        "ray_init_seconds": round(ray_seconds, 3),
        **declared_categories(model, storage_options),
    }
    version_uri = full_uri(fs, version_path)
    predictions = _predictions(version_uri)
    write_run(
        rows,
        predictions,
        run_id=name,
        run_info=run_info,
        storage_options=storage_options,
        started=started,
        write_cpus=resources.task_cpus,
        file_mib=spec.output_file_mib,
        attempt=attempt,
        # The version's rows: segmented, taken from unfinished versions, carried forward.
        expected_rows=to_segment.num_rows + sum(ids.num_rows for _, _, ids in recovered) + unchanged.num_rows,
        error_tally=error_tally,
    )
    export_coco_dataset(predictions, full_uri(fs, posixpath.join(version_path, COCO_FILE)), storage_options=storage_options)
    diff = diff_versions(
        previous_files, committed_files(predictions, storage_options), added, removed, changed, retried, relabelled, storage_options
    )
    diff["previous_version"] = previous.name if previous else None
    with fs.open(posixpath.join(version_path, DIFF_FILE), "w") as f:
        json.dump(diff, f, indent=2)
    with fs.open(posixpath.join(version_path, "diff.md"), "w") as f:
        f.write(_diff_markdown(name, previous.name if previous else None, diff))
    for version in unfinished:
        log.info("deleting unfinished %s: %s supersedes it", version.name, name)
        version_fs, path = filesystem(version.path, storage_options)
        remove(version_fs, path)
    return RelabelSummary(
        name,
        version_uri,
        previous.name if previous else None,
        to_segment.num_rows,
        unchanged.num_rows,
        diff,
        recovered=sum(image_ids.num_rows for _, _, image_ids in recovered),
        retried=len(retried),
        relabelled=len(relabelled),
    )
