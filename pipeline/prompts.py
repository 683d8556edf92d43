"""Box prompts for promptable models (SAM): loaded from a COCO json or a previous rayseg
run, and attached to an image dataset as the columns the inference actor reads.

    images = read_source("annotations.json", image_root="images/")   # {image_id, uri}
    images, report = attach_prompts(images, "annotations.json")       # or a run's OUTPUT
    rows = segment(images, ModelSpec("sam", weights, options={"categories": report.category_dicts()}), resources)

Sources:
- a **COCO json** (`*.json`): each annotation's `bbox` [x, y, w, h] becomes the box
  [x, y, x + w, y + h], with its `category_id` and `id` (the annotation id the mask keeps);
  prompts are keyed by image_id = str(COCO image id), as `read_source` keys images read from
  the same COCO json;
- a **rayseg run** (its OUTPUT directory or URI, committed — read through `_run.json`):
  each segment of an `ok` row prompts with its bbox, category_id and annotation_id (the
  segment's own when it has one, else -1: none, and the new mask has no annotation_id);
- a **pyarrow table** of one row per box: image_id, bbox (COCO [x, y, w, h]), category_id,
  optional annotation_id.

Columns added (PROMPT_COLUMNS, read by pipeline/inference.py): `prompt_boxes` (per image a list of
[x0, y0, x1, y1]), `prompt_category_ids`, `prompt_annotation_ids`, and `prompt_error` (null,
or why the image's prompts are unusable). An image without prompts gets empty lists: an ok
row without segments. An image with a malformed box (not 4 numbers, not finite, w or h ≤ 0,
no category_id) gets `prompt_error` — the reason its row is an error row — and its boxes
stand as written (unusable ones as NaN), which SAM refuses for that image alone even where
`prompt_error` is not read. Prompts for images that are not in the input are counted,
logged and returned in the PromptReport.

How they attach — a broadcast lookup, not `Dataset.join`: the grouped prompt table (one row
per image) is put in the object store once, and a map over the image rows looks each block's
image ids up in it (`pyarrow.compute.index_in`; workers map the table zero-copy). Ray Data's
hash join works (left outer on image_id), but on the project's 2-CPU machine it took 8–13 s
for 20 or 10,000 rows against 0.1–0.6 s for the lookup (BENCHMARKS.md); it is a barrier —
every input row is shuffled before the first image is decoded, which undoes the streaming of
manifests — and it needs aggregator actors beside the inference pool. The lookup streams,
block by block, as a light task (this module does not import torch); its cost is the prompt
table in memory: the driver builds it (a COCO json is parsed whole anyway) and each worker
maps it.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..models.categories import Category, parse_categories
from .schema import STATUS_OK
from .sink import committed_files
from .storage import filesystem

log = logging.getLogger("rayseg.pipeline")

# The columns the inference actor reads (pipeline/inference.py); defined here, where no
# torch is imported, so the lookup tasks start light.
PROMPT_COLUMNS = ("prompt_boxes", "prompt_category_ids", "prompt_annotation_ids")
PROMPT_ERROR = "prompt_error"

# One row per box, what every source is first read into.
BOXES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("bbox", pa.list_(pa.float64())),  # COCO [x, y, w, h]
        pa.field("category_id", pa.int64()),
        pa.field("annotation_id", pa.int64()),
    ]
)

# One row per image: what is broadcast and looked up.
PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("prompt_boxes", pa.list_(pa.list_(pa.float32()))),
        pa.field("prompt_category_ids", pa.list_(pa.int32())),
        pa.field("prompt_annotation_ids", pa.list_(pa.int64())),
        pa.field(PROMPT_ERROR, pa.string()),
    ]
)

# Reasons listed per image before "… and N more".
_REASONS_SHOWN = 3
_EXAMPLES_SHOWN = 10


class PromptError(ValueError):
    """A prompt source that cannot be read as prompts at all (said before any cluster work)."""


@dataclass(frozen=True)
class PromptReport:
    """What a prompt source held and how it matched the input images.

    images/boxes: images of the source with prompts, and their boxes;
    invalid_images: of those, images with a malformed box (their rows become error rows);
    matched_images: input images that got prompts (None when not checked);
    unmatched_images/unmatched_boxes/unmatched_examples: prompted images that are not in the
    input, their boxes, and up to 10 of their ids (None/() when not checked);
    categories: the source's categories (COCO `categories`, or a run's category ids and labels).
    """

    source: str
    images: int
    boxes: int
    invalid_images: int
    matched_images: int | None = None
    unmatched_images: int | None = None
    unmatched_boxes: int | None = None
    unmatched_examples: tuple[str, ...] = ()
    categories: tuple[Category, ...] = field(default_factory=tuple)

    def category_dicts(self) -> list[dict]:
        """The categories as the `categories` model option takes them."""
        return [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in self.categories]


# --- reading sources into one row per box ----------------------------------------------


def _coco_boxes(uri: str, storage_options: dict | None) -> tuple[pa.Table, list[Category]]:
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PromptError(f"prompts file not found: {uri}") from None
    except ValueError as e:
        raise PromptError(f"prompts file {uri} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PromptError(f"prompts file {uri} is not a COCO json: it has no 'annotations' list")
    image_ids, bboxes, category_ids, annotation_ids = [], [], [], []
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or annotation.get("image_id") is None:
            raise PromptError(f"prompts file {uri}: annotation {index} has no image_id")
        image_ids.append(str(annotation["image_id"]))
        bboxes.append(annotation.get("bbox"))
        category_ids.append(_integer(annotation.get("category_id")))
        annotation_ids.append(_integer(annotation.get("id")))
    try:
        categories = parse_categories(data.get("categories") or [])
    except ValueError as e:
        raise PromptError(f"prompts file {uri}: {e}") from None
    return _boxes_table(image_ids, bboxes, category_ids, annotation_ids), categories


def _run_boxes(output: str, storage_options: dict | None) -> tuple[pa.Table, list[Category]]:
    from .sink import OutputError

    try:
        files = committed_files(output, storage_options)
    except OutputError as e:
        raise PromptError(f"prompts {output} is neither a COCO json nor a committed rayseg run: {e}") from None
    leaves = ("bbox", "category_id", "annotation_id", "label")
    columns = ["image_id", "status", *(f"segments.list.element.{leaf}" for leaf in leaves)]
    image_ids, bboxes, category_ids, annotation_ids = [], [], [], []
    labels: dict[int, str] = {}
    for uri in files:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read(columns=columns)
        table = table.filter(pc.equal(table["status"], STATUS_OK))
        segments = table["segments"].combine_chunks()
        flat = pc.list_flatten(segments)
        if len(flat) == 0:
            continue
        owners = table["image_id"].combine_chunks().take(pc.list_parent_indices(segments))
        image_ids.extend(owners.to_pylist())
        bboxes.extend(flat.field("bbox").to_pylist())
        category_ids.extend(flat.field("category_id").to_pylist())
        annotation_ids.extend(flat.field("annotation_id").to_pylist())
        for category_id, label in zip(flat.field("category_id").to_pylist(), flat.field("label").to_pylist()):
            if category_id is not None and label is not None:
                labels.setdefault(int(category_id), label)
    categories = [Category(category_id, name) for category_id, name in sorted(labels.items())]
    return _boxes_table(image_ids, bboxes, category_ids, annotation_ids), categories


def _integer(value) -> int | None:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _boxes_table(image_ids, bboxes, category_ids, annotation_ids) -> pa.Table:
    """Rows of boxes; a bbox that is not a list of numbers is kept as null (reported later)."""
    clean = []
    for bbox in bboxes:
        if isinstance(bbox, (list, tuple)) and all(_is_number(v) for v in bbox):
            clean.append([float(v) for v in bbox])
        else:
            clean.append(None)
    return pa.table(
        {"image_id": image_ids, "bbox": clean, "category_id": category_ids, "annotation_id": annotation_ids},
        schema=BOXES_SCHEMA,
    )


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _problem(bbox: list[float] | None, category_id: int | None) -> str | None:
    """Why a box cannot prompt, or None when it can."""
    if bbox is None or len(bbox) != 4:
        return f"bbox {bbox!r} is not 4 numbers [x, y, w, h]"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {bbox} is not finite"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"bbox {bbox} has width or height ≤ 0"
    if category_id is None:
        return "has no integer category_id"
    return None


def group_prompts(boxes: pa.Table) -> pa.Table:
    """Rows of boxes (BOXES_SCHEMA: image_id, COCO bbox, category_id, annotation_id) → one
    row per image (PROMPTS_SCHEMA), boxes as [x0, y0, x1, y1], malformed ones reported in
    `prompt_error` (see the module docstring)."""
    missing = {"image_id", "bbox", "category_id"} - set(boxes.column_names)
    if missing:
        raise PromptError(f"a prompt table needs columns image_id, bbox, category_id (missing {', '.join(sorted(missing))})")
    columns = boxes.to_pydict()
    count = boxes.num_rows
    annotation_ids = columns.get("annotation_id") or [None] * count
    groups: dict[str, dict] = {}
    for row in range(count):
        image_id = columns["image_id"][row]
        if image_id is None:
            raise PromptError(f"prompt row {row} has no image_id")
        group = groups.setdefault(str(image_id), {"boxes": [], "categories": [], "annotations": [], "problems": []})
        bbox, category_id, annotation_id = columns["bbox"][row], columns["category_id"][row], annotation_ids[row]
        annotation_id = -1 if annotation_id is None else int(annotation_id)
        problem = _problem(bbox, category_id)
        if problem is None:
            x, y, w, h = bbox
            group["boxes"].append([x, y, x + w, y + h])
        else:
            owner = f"annotation {annotation_id}" if annotation_id >= 0 else f"box {len(group['boxes'])}"
            group["problems"].append(f"{owner} {problem}" if problem.startswith("has") else f"{owner}: {problem}")
            # As written when SAM refuses it as such (w or h ≤ 0), else NaN, which it refuses too.
            empty = bbox is not None and len(bbox) == 4 and all(map(math.isfinite, bbox)) and category_id is not None
            group["boxes"].append([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]] if empty else [math.nan] * 4)
        group["categories"].append(-1 if category_id is None else int(category_id))
        group["annotations"].append(annotation_id)
    errors = []
    for group in groups.values():
        problems = group["problems"]
        if not problems:
            errors.append(None)
            continue
        more = f"; and {len(problems) - _REASONS_SHOWN} more" if len(problems) > _REASONS_SHOWN else ""
        errors.append("invalid prompt: " + "; ".join(problems[:_REASONS_SHOWN]) + more)
    return pa.table(
        {
            "image_id": list(groups),
            "prompt_boxes": [g["boxes"] for g in groups.values()],
            "prompt_category_ids": [g["categories"] for g in groups.values()],
            "prompt_annotation_ids": [g["annotations"] for g in groups.values()],
            PROMPT_ERROR: errors,
        },
        schema=PROMPTS_SCHEMA,
    )


def load_prompts(source: str | pa.Table, storage_options: dict | None = None) -> tuple[pa.Table, list[Category]]:
    """(one row per image, PROMPTS_SCHEMA; the source's categories) for a COCO json path or
    URI, a committed rayseg run's OUTPUT, or a table of boxes (BOXES_SCHEMA columns)."""
    if isinstance(source, pa.Table):
        if set(PROMPTS_SCHEMA.names) <= set(source.column_names):
            return source.select(PROMPTS_SCHEMA.names).cast(PROMPTS_SCHEMA), []
        return group_prompts(source), []
    if source.rstrip("/").lower().endswith(".json"):
        boxes, categories = _coco_boxes(source, storage_options)
    else:
        boxes, categories = _run_boxes(source, storage_options)
    return group_prompts(boxes), categories


# --- attaching -------------------------------------------------------------------------------


def _lookup_table(table: pa.Table) -> pa.Table:
    """The prompt table plus a last row of empty lists, which images without prompts get:
    empty lists rather than nulls, because a batch whose list column is all null reaches
    numpy as a float NaN column, not as lists."""
    empty = pa.table(
        {"image_id": [None], "prompt_boxes": [[]], "prompt_category_ids": [[]], "prompt_annotation_ids": [[]], PROMPT_ERROR: [None]},
        schema=PROMPTS_SCHEMA,
    )
    return pa.concat_tables([table.cast(PROMPTS_SCHEMA), empty]).combine_chunks()


def _attach(batch: pa.Table, prompts: list) -> pa.Table:
    """Adds the prompt columns to a block of image rows, looked up by image_id."""
    (reference,) = prompts
    table = ray.get(reference)
    for name in (*PROMPT_COLUMNS, PROMPT_ERROR):
        if name in batch.column_names:
            batch = batch.drop_columns([name])
    ids = table["image_id"].chunk(0)
    index = pc.index_in(pc.cast(batch["image_id"], pa.string()), value_set=ids.slice(0, len(ids) - 1))
    index = pc.fill_null(index, len(ids) - 1)
    for name in (*PROMPT_COLUMNS, PROMPT_ERROR):
        batch = batch.append_column(name, table[name].take(index))
    return batch


def _matched(images: ray.data.Dataset, image_ids: pa.Array) -> np.ndarray:
    """Which of `image_ids` occur in the dataset's image_id column (read once, streamed)."""
    present = np.zeros(len(image_ids), dtype=bool)
    for batch in images.select_columns(["image_id"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        ids = pc.cast(batch["image_id"], pa.string()).combine_chunks()
        present |= pc.is_in(image_ids, value_set=ids).to_numpy(zero_copy_only=False)
    return present


def attach_prompts(
    images: ray.data.Dataset,
    prompts: str | pa.Table,
    *,
    storage_options: dict | None = None,
    check_unmatched: bool = True,
    num_cpus: float = 0.25,
    name: str | None = None,
) -> tuple[ray.data.Dataset, PromptReport]:
    """`images` (rows with image_id) plus the prompt columns, and what the prompts held.

    prompts: a COCO json, a committed run's OUTPUT, or a table (see `load_prompts`); read
    and checked here, on the driver (PromptError before any cluster work).
    check_unmatched: count prompts whose image is not in `images`; this reads the image_id
    column of `images` once (a listing or manifest: cheap; a dataset that decodes as it reads
    would decode twice — turn it off there).
    num_cpus: of each lookup task.
    name: what log lines and the report call the prompts (default: `prompts` when it is a
    path or URI, else "<table>"); give the source a table was read from.

    The result is lazy, one row per row of `images`, in its blocks. A dataset of decoded images
    (`image` column) stays one: `segment` runs its first block to see the column through
    the added map, unless told `decoded=True`.
    """
    table, categories = load_prompts(prompts, storage_options)
    table = table.combine_chunks()
    name = name or (prompts if isinstance(prompts, str) else "<table>")
    boxes = pc.list_value_length(table["prompt_boxes"]).to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0, int)
    invalid = int(pc.sum(pc.is_valid(table[PROMPT_ERROR])).as_py() or 0)
    report = PromptReport(name, table.num_rows, int(boxes.sum()), invalid, categories=tuple(categories))
    if not report.boxes:
        log.warning("%s holds no box prompts: every image will be an ok row without segments", name)
    if invalid:
        first = table[PROMPT_ERROR].drop_null()[0].as_py()
        log.warning("%d image(s) have malformed prompts and will be error rows, e.g. %s", invalid, first)
    if check_unmatched:
        present = _matched(images, table["image_id"].combine_chunks()) if table.num_rows else np.zeros(0, bool)
        missing = np.flatnonzero(~present)
        examples = tuple(table["image_id"].take(pa.array(missing[:_EXAMPLES_SHOWN])).to_pylist())
        report = PromptReport(
            name,
            report.images,
            report.boxes,
            invalid,
            matched_images=int(present.sum()),
            unmatched_images=len(missing),
            unmatched_boxes=int(boxes[missing].sum()),
            unmatched_examples=examples,
            categories=tuple(categories),
        )
        if len(missing):
            log.warning(
                "%d prompted image(s) (%d boxes) of %s are not in the input and are ignored, e.g. %s",
                len(missing), report.unmatched_boxes, name, ", ".join(examples),
            )  # fmt: skip
    log.info(
        "prompts from %s: %d boxes on %d images%s", name, report.boxes, report.images,
        "" if report.matched_images is None else f", {report.matched_images} of them in the input",
    )  # fmt: skip
    attached = images.map_batches(
        _attach,
        fn_kwargs={"prompts": [ray.put(_lookup_table(table))]},
        batch_format="pyarrow",
        num_cpus=num_cpus,
        udf_modifying_row_count=False,
    )
    return attached, report
