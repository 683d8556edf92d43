"""`export panoptic`: COCO panoptic PNGs + json that decode back to the predicted segments,
with PNG names that never leave DIR."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from rayseg.pipeline.panoptic_export import (
    decode_ids,
    encode_ids,
    export_panoptic,
    png_name,
)
from rayseg.pipeline.schema import OUTPUT_SCHEMA

H, W = 20, 30


def segment(mask, category_id, score, segment_id=None, label=None):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    return {
        "category_id": category_id, "label": label or f"cat{category_id}", "score": score,
        "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
        "area": int(mask.sum()), "rle": rle["counts"].decode(), "segment_id": segment_id, "iscrowd": False,
        "annotation_id": None,
    }  # fmt: skip


def row(image_id, segments, status="ok"):
    return {
        "image_id": image_id, "uri": f"file:///{image_id}", "width": W, "height": H, "status": status,
        "error": None if status == "ok" else "decode failed", "model": "mask2former", "segments": segments,
    }  # fmt: skip


def panoptic_masks():
    sky = np.zeros((H, W), bool)
    sky[:8] = True
    person = np.zeros((H, W), bool)
    person[10:18, 3:9] = True
    car = np.zeros((H, W), bool)
    car[12:19, 15:28] = True
    return [(sky, 7, 0.9, 1), (person, 1, 0.8, 2), (car, 3, 0.7, 5)]


def write_predictions(directory, rows, **run):
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), directory / "part-0.parquet")
    (directory / "_run.json").write_text(json.dumps({"status": "complete", "files": ["part-0.parquet"], **run}))


def exported_isthing(tmp_path, **run) -> dict[int, int]:
    """category id → isthing in the panoptic.json of a run of `panoptic_masks` (its `_run.json` holding `run`)."""
    write_predictions(tmp_path / "run", [row("1", [segment(m, c, s, i) for m, c, s, i in panoptic_masks()])], **run)
    export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"))
    return {c["id"]: c["isthing"] for c in json.loads((tmp_path / "pan" / "panoptic.json").read_text())["categories"]}


def test_a_semantic_run_s_classes_are_exported_as_stuff(tmp_path):
    assert exported_isthing(tmp_path, model="unet", spec={"model": {"options": {}}}) == {1: 0, 3: 0, 7: 0}


def test_an_instance_or_panoptic_run_s_classes_are_exported_as_things(tmp_path):
    assert exported_isthing(tmp_path, model="unet", spec={"model": {"options": {"task": "instance"}}}) == {1: 1, 3: 1, 7: 1}


def test_isthing_comes_from_the_category_file_the_run_s_model_was_given(tmp_path):
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "sky", "isthing": False}]))
    run = {"model": "mask2former", "spec": {"model": {"options": {"category_file": str(categories)}}}}
    assert exported_isthing(tmp_path, **run) == {1: 1, 3: 1, 7: 0}


def test_round_trip_png_ids_and_json_match_the_segments(tmp_path):
    masks = panoptic_masks()
    # An instance-style row too: overlapping masks, no segment ids.
    a = np.zeros((H, W), bool)
    a[2:12, 2:12] = True
    b = np.zeros((H, W), bool)
    b[6:16, 6:16] = True
    hidden = np.zeros((H, W), bool)
    hidden[7:9, 7:9] = True  # inside the better-scored b: no pixels left, dropped
    rows = [
        row("42", [segment(m, c, s, i) for m, c, s, i in masks]),
        row("scene.jpg", [segment(a, 1, 0.6), segment(b, 1, 0.9), segment(hidden, 3, 0.1)]),
        row("broken.png", [], status="error"),
    ]
    predictions = tmp_path / "out"
    write_predictions(predictions, rows)
    (predictions / "_staging").mkdir()
    pq.write_table(pa.Table.from_pylist([row("uncommitted", [])], schema=OUTPUT_SCHEMA), predictions / "_staging" / "x.parquet")
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "sky", "isthing": False}]))

    summary = export_panoptic(str(predictions), str(tmp_path / "pan"), category_file=str(categories))
    assert (summary.images, summary.error_rows, summary.dropped_segments) == (2, 1, 1)

    document = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    assert [image["id"] for image in document["images"]] == [42, "scene.jpg"]
    assert document["categories"] == [
        {"id": 1, "name": "cat1", "isthing": 1}, {"id": 3, "name": "cat3", "isthing": 1}, {"id": 7, "name": "cat7", "isthing": 0},
    ]  # fmt: skip
    first, second = document["annotations"]
    assert first["file_name"] == "42.png" and second["file_name"] == "scene.png"

    ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / "42.png").convert("RGB")))
    assert set(np.unique(ids)) == {0, 1, 2, 5}
    by_id = {info["id"]: info for info in first["segments_info"]}
    for mask, category_id, _, segment_id in masks:
        assert (ids == segment_id).sum() == mask.sum() and ((ids == segment_id) == mask).all()
        info = by_id[segment_id]
        ys, xs = np.nonzero(mask)
        assert info == {
            "id": segment_id, "category_id": category_id, "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)], "iscrowd": 0,
        }  # fmt: skip

    ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / "scene.png")))
    infos = {info["id"]: info for info in second["segments_info"]}
    assert sorted(infos) == [1, 2]  # ids 1..N in row order; segment 3 had no pixels left
    assert ((ids == 2) == b).all(), "the better-scored segment keeps the overlap"
    assert ((ids == 1) == (a & ~b)).all()
    assert infos[1]["area"] == int((a & ~b).sum()) and infos[2]["area"] == int(b.sum())
    assert len(os.listdir(tmp_path / "pan" / "panoptic")) == 2


def test_ids_above_255_use_all_three_channels():
    ids = np.array([[0, 1, 256, 65536 + 256 * 3 + 7]], dtype=np.uint32)
    rgb = encode_ids(ids)
    assert rgb[0, 3].tolist() == [7, 3, 1]
    assert (decode_ids(rgb) == ids).all()


def test_hostile_image_ids_stay_inside_dir(tmp_path):
    hostile = ["../../etc/x", "/abs/path.png", "..", "a/../../b.png", "sub\\dir.png", "x.png", "x.jpg", " spaced id "]
    mask = np.zeros((H, W), bool)
    mask[:5, :5] = True
    predictions = tmp_path / "out"
    write_predictions(predictions, [row(i, [segment(mask, 1, 0.5, 1)]) for i in hostile])
    out = tmp_path / "nested" / "pan"
    summary = export_panoptic(str(predictions), str(out))
    assert summary.images == len(hostile)
    written = sorted(os.listdir(out / "panoptic"))
    assert len(written) == len(hostile), "every image its own file"
    document = json.loads((out / "panoptic.json").read_text())
    assert sorted(a["file_name"] for a in document["annotations"]) == written
    for name in written:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".png")
    # Nothing was written anywhere but DIR.
    everything = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files}
    assert {p for p in everything if not p.startswith(("out", os.path.join("nested", "pan")))} == set()
    assert png_name("../../etc/x") == png_name("../../etc/x") and ".." not in png_name("../../etc/x")


def test_rayseg_export_panoptic_writes_the_export_and_refuses_missing_predictions(tmp_path):
    from rayseg.jobs.cli import app

    mask = np.ones((H, W), bool)
    predictions = tmp_path / "out"
    write_predictions(predictions, [row("1", [segment(mask, 2, 0.5, 1)])])
    result = CliRunner().invoke(app, ["export", "panoptic", str(predictions), str(tmp_path / "pan")])
    assert result.exit_code == 0, result.output
    assert "1 PNGs" in result.output
    result = CliRunner().invoke(app, ["export", "panoptic", str(tmp_path / "missing"), str(tmp_path / "pan2")])
    assert result.exit_code == 2
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(app, ["export", "panoptic", str(predictions), str(tmp_path / "a-file")])
    assert result.exit_code == 2 and "a-file is a file: name the directory" in " ".join(result.output.split())


def test_an_image_id_in_two_rows_is_exported_once_from_its_first_ok_row(tmp_path):
    (sky, sky_id, score, segment_id), (person, person_id, *_) = panoptic_masks()[:2]
    rows = [row("a", [], status="error"), row("a", [segment(sky, sky_id, score, 1)]), row("a", [segment(person, person_id, score, 1)])]
    write_predictions(tmp_path / "run", rows)
    summary = export_panoptic(str(tmp_path / "run"), str(tmp_path / "pan"))
    assert (summary.images, summary.error_rows, summary.duplicate_rows) == (1, 1, 1)
    (annotation,) = json.loads((tmp_path / "pan" / "panoptic.json").read_text())["annotations"]
    assert [info["category_id"] for info in annotation["segments_info"]] == [sky_id]
    ids = decode_ids(np.asarray(Image.open(tmp_path / "pan" / "panoptic" / annotation["file_name"]).convert("RGB")))
    assert (ids != 0).sum() == sky.sum(), "the PNG is the first row's, not overwritten by the second"
