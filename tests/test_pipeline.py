"""End to end on local Ray: every input gets exactly one row, in the output schema, committed."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.models.unet import build_unet
from rayseg.pipeline.evaluation import synthetic as syn
from rayseg.pipeline.resources import plan_resources
from rayseg.pipeline.schema import OUTPUT_SCHEMA
from rayseg.pipeline.segment import ModelSpec, segment
from rayseg.pipeline.sink import (
    RUN_FILE,
    STAGING_DIR,
    OutputError,
    committed_files,
    write_run,
)
from rayseg.pipeline.sources import SourceError, read_source

from .conftest import same_segments

pytestmark = pytest.mark.usefixtures("ray_cluster")

runner = CliRunner()


def rayseg(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_rows(output) -> list[dict]:
    table = pq.read_table(output)
    assert table.schema.equals(OUTPUT_SCHEMA)
    return table.to_pylist()


@pytest.fixture(scope="module")
def checkpoint(varied_unet):
    return varied_unet


def test_segment_writes_one_ok_row_per_image_with_decodable_rle(shapes, tmp_path):
    output = tmp_path / "out"
    result = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", "random")
    assert result.exit_code == 0, result.output
    rows = read_rows(output)
    expected_ids = sorted(p.name for p in shapes.images_dir.glob("*.png"))
    assert sorted(row["image_id"] for row in rows) == expected_ids
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None and row["model"] == "unet"
        assert (row["height"], row["width"]) == (64, 64)
        assert row["segments"], "a semantic model labels every pixel with some class"
        union = np.zeros((64, 64), dtype=np.uint8)
        for seg in row["segments"]:
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": seg["rle"]})
            assert mask.shape == (64, 64)
            assert seg["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert 0 <= seg["score"] <= 1 and seg["label"] and not seg["iscrowd"]
            union += mask
        assert (union == 1).all(), "semantic segments partition the image"
    run = json.loads((output / RUN_FILE).read_text())
    assert run["status"] == "complete" and run["model"] == "unet" and run["weights"] == "random"
    assert run["counts"]["images"] == 20 and run["counts"]["ok"] == 20 and run["counts"]["error"] == 0
    assert run["counts"]["segments"] == sum(len(r["segments"]) for r in rows)
    assert not (output / "_staging").exists()


def test_corrupt_and_non_image_files_become_error_rows_and_the_rest_succeed(shapes, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes.images_dir, images)
    good = (images / "000000.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 3])
    (images / "notes.jpg").write_text("not an image at all")
    (images / "empty.png").write_bytes(b"")
    output = tmp_path / "out"
    result = rayseg("segment", images, output, "--model", "unet", "--weights", "random")
    assert result.exit_code == 0, result.output
    rows = {row["image_id"]: row for row in read_rows(output)}
    assert len(rows) == 23
    for bad in ("truncated.png", "notes.jpg", "empty.png"):
        assert rows[bad]["status"] == "error" and rows[bad]["error"], bad
        assert rows[bad]["segments"] == []
    assert rows["empty.png"]["error"] == "empty file"
    assert sum(row["status"] == "ok" for row in rows.values()) == 20
    run = json.loads((output / RUN_FILE).read_text())
    assert run["counts"] == {"images": 23, "ok": 20, "error": 3, "segments": run["counts"]["segments"], "files": 1, "repeated_image_ids": 0, "resumed": 0}


def test_pipeline_output_equals_the_model_run_directly_on_a_saved_checkpoint(shapes, checkpoint, tmp_path):
    output = tmp_path / "out"
    result = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", checkpoint, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    model = build_unet(str(checkpoint))
    rows = read_rows(output)
    assert sum(len(row["segments"]) for row in rows) > len(rows), "the checkpoint predicts several classes"
    for row in rows:
        image = np.asarray(Image.open(shapes.images_dir / row["image_id"]).convert("RGB"))
        (expected,) = model.postprocess(model.forward(model.preprocess([image])), [image.shape[:2]])
        assert [s["category_id"] for s in row["segments"]] == [s.category_id for s in expected]
        for got, want in zip(row["segments"], expected):
            mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": got["rle"]})
            np.testing.assert_array_equal(mask.astype(bool), want.mask)
            assert got["score"] == pytest.approx(want.score, abs=1e-4)  # thread counts differ: float sums reorder
    run = json.loads((output / RUN_FILE).read_text())
    assert run["weights_sha256"] == model.weights_sha256


def test_cpu_stages_in_the_actors_or_in_tasks_around_them_give_the_same_rows(shapes, checkpoint, tmp_path):
    source = shutil.copytree(shapes.images_dir, tmp_path / "images")
    (source / "broken.png").write_bytes(b"not a png")
    cpu_plan = plan_resources(ray.cluster_resources(), batch_size=3)
    assert cpu_plan.cpu_stages_in_actors, "this cluster has no GPUs: its actors decode and encode"
    outputs = {}
    for in_actors in (True, False):
        output = tmp_path / f"out-{in_actors}"
        rows = segment(
            read_source(str(source)), ModelSpec("unet", str(checkpoint)), replace(cpu_plan, cpu_stages_in_actors=in_actors)
        )
        write_run(rows, str(output), run_id="stages", run_info={"model": "unet"})
        outputs[in_actors] = sorted(read_rows(output), key=lambda row: row["image_id"])
    assert [{**row, "segments": None} for row in outputs[True]] == [{**row, "segments": None} for row in outputs[False]]
    for in_actors, in_tasks in zip(outputs[True], outputs[False]):
        same_segments(in_actors["segments"], in_tasks["segments"])
    errors = [row for row in outputs[True] if row["status"] == "error"]
    assert [row["image_id"] for row in errors] == ["broken.png"] and "not a decodable image" in errors[0]["error"]
    assert sum(len(row["segments"]) for row in outputs[True]) > 0


def test_write_run_commits_only_into_an_empty_output_and_leaves_other_runs_staging(tmp_path):
    def rows(count: int) -> ray.data.Dataset:
        items = [syn.row(f"img{i}", 4, 4, [], model="unet") for i in range(count)]
        return ray.data.from_arrow(pa.Table.from_pylist(items, schema=OUTPUT_SCHEMA))

    output = tmp_path / "out"
    other = output / STAGING_DIR / "interrupted" / "part-0.parquet"  # another run's, to resume
    other.parent.mkdir(parents=True)
    pq.write_table(OUTPUT_SCHEMA.empty_table(), other)
    write_run(rows(8), str(output), run_id="night-1", run_info={}, rows_per_file=2)
    assert other.exists(), "committing removes only this run's staging"
    with pytest.raises(OutputError, match="output is not empty"):
        write_run(rows(2), str(output), run_id="night-2", run_info={})
    assert len(read_rows(output)) == 8 and json.loads((output / RUN_FILE).read_text())["run_id"] == "night-1"


def test_python_api_accepts_already_decoded_images(checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    items = [{"image_id": f"img{i}", "image": rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)} for i in range(5)]
    rows = segment(
        ray.data.from_items(items), ModelSpec("unet", str(checkpoint)), plan_resources(ray.cluster_resources())
    )
    summary = write_run(rows, str(tmp_path / "out"), run_id="api", run_info={"model": "unet"})
    assert (summary.images, summary.ok, summary.error) == (5, 5, 0)
    by_id = {row["image_id"]: row for row in read_rows(tmp_path / "out")}
    assert [(by_id[f"img{i}"]["height"], by_id[f"img{i}"]["width"]) for i in range(5)] == [(24 + i, 40) for i in range(5)]
    assert all(row["uri"] is None for row in by_id.values())


def test_decoded_float_images_give_the_uint8_rows_and_non_images_are_error_rows(shapes, checkpoint):
    rgb = np.asarray(Image.open(shapes.images_dir / "000003.png").convert("RGB"))
    plan = plan_resources(ray.cluster_resources())
    model = ModelSpec("unet", str(checkpoint))
    items = [{"image_id": "rgb", "image": rgb}, {"image_id": "empty", "image": rgb[:0]}, {"image_id": "none", "image": None}]
    by_id = {row["image_id"]: row for row in segment(ray.data.from_items(items), model, plan).take_all()}
    assert sorted(by_id) == ["empty", "none", "rgb"], "one row per input"
    assert by_id["empty"]["status"] == "error" and "shape (0, 64, 3)" in by_id["empty"]["error"]
    assert by_id["none"]["status"] == "error" and by_id["none"]["error"].startswith("no image: ")
    floats = [{"image_id": "float", "image": rgb.astype(np.float32) / 255}]  # as torchvision's to_tensor gives
    (row,) = segment(ray.data.from_items(floats), model, plan).take_all()
    assert row["status"] == "ok" and row["segments"] == by_id["rgb"]["segments"]


def test_python_api_takes_ray_read_images_behind_a_map(shapes, checkpoint, tmp_path):
    # Ray cannot tell a mapped dataset's columns without running it: segment() looks.
    images = ray.data.read_images(str(shapes.images_dir), include_paths=True, mode="RGB").map(
        lambda row: {"image_id": row["path"].rsplit("/", 1)[-1], "image": row["image"]}
    )
    assert images.schema(fetch_if_missing=False) is None
    rows = segment(images, ModelSpec("unet", str(checkpoint)), plan_resources(ray.cluster_resources()))
    summary = write_run(rows, str(tmp_path / "out"), run_id="read-images", run_info={"model": "unet"})
    assert (summary.images, summary.ok) == (len(list(shapes.images_dir.glob("*.png"))),) * 2
    by_id = {row["image_id"]: row for row in read_rows(tmp_path / "out")}
    assert (by_id["000000.png"]["height"], by_id["000000.png"]["width"]) == Image.open(shapes.images_dir / "000000.png").size[::-1]


def test_python_api_names_the_columns_it_needs_before_any_inference(checkpoint):
    images = ray.data.from_items([{"image": np.zeros((8, 8, 3), np.uint8)}])
    with pytest.raises(SourceError, match=r"image_id and uri, or image_id and a decoded image; this dataset has \['image'\]"):
        segment(images, ModelSpec("unet", str(checkpoint)), plan_resources(ray.cluster_resources()))


def test_an_empty_manifest_commits_one_file_with_the_schema_and_no_rows(tmp_path):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("uri\n")
    result = rayseg("segment", manifest, tmp_path / "out", "--model", "unet", "--weights", "random")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 0 and table.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    run = json.loads((tmp_path / "out" / RUN_FILE).read_text())
    assert run["files"] == ["part-00000.parquet"] and run["counts"]["images"] == 0


def test_limit_processes_only_the_first_images(shapes, tmp_path):
    result = rayseg("segment", shapes.images_dir, tmp_path / "out", "--model", "unet", "--weights", "random", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert sorted(r["image_id"] for r in read_rows(tmp_path / "out")) == ["000000.png", "000001.png", "000002.png"]


def test_a_run_starts_an_actor_per_model_batch_of_its_listing_up_to_the_pool(shapes, tmp_path):
    def initial_actors(*args: str) -> int:
        output = tmp_path / "runs" / ("-".join(args) or "all")
        result = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", "random", *args)
        assert result.exit_code == 0, result.output
        return json.loads((output / RUN_FILE).read_text())["resources"]["initial_actors"]

    # The test cluster's two CPUs give a pool of up to two actors, batch 8; 20 images.
    assert initial_actors("--limit", "3") == 1
    assert initial_actors() == 2
    assert initial_actors("--batch-size", "16") == 2
    assert initial_actors("--batch-size", "32") == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "random", "--model", "nope"], "unknown model 'nope'"),
        (["--model", "sam"], "has no bundled weights"),
        (["--model", "unet", "--weights", "/no/such/checkpoint"], "weights not found"),
        (["--model", "unet", "--weights", "random", "--gpus-per-actor", "1"], "cluster has none"),
        (["--model", "unet", "--weights", "random", "--actors", "4", "--cpus-per-actor", "0.5"], "leaves no CPU"),
        (["--model", "unet", "--weights", "random", "--task", "panoptic"], "model 'unet': option task must be one of semantic, instance"),
        (["--model", "unet", "--weights", "random", "--model-option", "min_area=-3"], "option min_area must be at least 0"),
        (["--model", "maskrcnn", "--weights", "random", "--model-option", "mask_threshold=abc"], "option mask_threshold must be a number"),
        (["--model", "fcn", "--weights", "random", "--category-file", "/no/such.json"], "category file not found: /no/such.json"),
        (["--model", "oneformer", "--weights", "random"], "oneformer has no random weights"),
        (["--model", "unet", "--task", "instance", "--model-option", "task=semantic"], "--task instance and --model-option task=semantic disagree"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message_and_write_nothing(shapes, tmp_path, args, message):
    output = tmp_path / "out"
    result = rayseg("segment", shapes.images_dir, output, *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not output.exists()


def test_help_shows_each_default_in_its_brackets():
    result = rayseg("segment", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for default in ("[the model's bundled weights: unet]", "[one per GPU]", "[GPU 16, CPU 8]"):
        assert default in text


def test_a_bad_input_is_refused_before_connecting_to_ray(shapes, tmp_path, monkeypatch):
    from rayseg.jobs import runner as jobs_runner
    from rayseg.jobs.spec import parse_spec

    def connect(*args, **kwargs):
        raise AssertionError("connected to Ray before the input was checked")

    monkeypatch.setattr(jobs_runner.cluster, "connect", connect)
    no_uri = tmp_path / "no-uri.parquet"
    pq.write_table(pa.table({"path": ["a.png"]}), no_uri)
    for source, message in (
        ({"input": str(tmp_path / "nowhere")}, "input not found"),
        ({"input": str(no_uri)}, "has no 'uri' column"),
        ({"input": str(shapes.instances_json)}, "needs --image-root"),
    ):
        spec = parse_spec({"kind": "segment", **source, "output": str(tmp_path / "out"), "model": {"name": "unet", "weights": "random"}})
        with pytest.raises(SourceError, match=message):
            jobs_runner.run_segment_spec(spec, storage_options={})


def test_weights_that_cannot_load_are_refused_before_any_work(shapes, checkpoint, tmp_path):
    without_config = tmp_path / "no-config"
    without_config.mkdir()
    shutil.copy(checkpoint / "model.safetensors", without_config)
    not_a_directory = shapes.images_dir / "000000.png"
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    (truncated / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:-100])
    for weights, message in (
        (without_config, f"weights incomplete: {without_config / 'config.json'} is missing beside model.safetensors"),
        (not_a_directory, f"weights not found: {not_a_directory}/model.safetensors"),
        (truncated, f"weights unusable: {truncated / 'model.safetensors'}: truncated or corrupt"),
    ):
        result = rayseg("segment", shapes.images_dir, tmp_path / "out", "--model", "unet", "--weights", weights)
        assert result.exit_code == 2 and message in " ".join(result.output.split())
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stop,code,said", [(KeyboardInterrupt(), 130, "interrupted"), (RuntimeError("disk full"), 1, "run failed: RuntimeError: disk full")])
@pytest.mark.parametrize("staged", [True, False])
def test_a_run_that_stops_before_its_commit_says_how_to_finish_it(shapes, tmp_path, monkeypatch, stop, code, said, staged):
    from rayseg.jobs import runner as jobs_runner

    def stopped_write_run(rows, output, *, run_id, **kwargs):
        if staged:  # as a run that wrote a file of rows before it stopped
            (Path(output) / STAGING_DIR / run_id).mkdir(parents=True)
            pq.write_table(OUTPUT_SCHEMA.empty_table(), Path(output) / STAGING_DIR / run_id / "part-0.parquet")
        raise stop

    output = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(jobs_runner, "write_run", stopped_write_run)
        result = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", "random", "--limit", "2")
    text = " ".join(result.output.split())
    assert result.exit_code == code and f"error: {said}" in text
    if not staged:
        assert re.search(r"run \S+ staged no rows: the same command runs it again from the start", text), text
        return
    run_id = re.search(r"the same command with `--resume --run-id (\S+)` finishes it", text).group(1)
    finished = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", "random", "--limit", "2", "--resume", "--run-id", run_id)
    assert finished.exit_code == 0, finished.output
    assert json.loads((output / RUN_FILE).read_text())["run_id"] == run_id


def test_error_messages_are_printed_as_given_brackets_included(tmp_path):
    weights = tmp_path / "[model]" / "unet"
    result = rayseg("segment", tmp_path, tmp_path / "out", "--model", "unet", "--weights", weights)
    assert result.exit_code == 2 and f"weights not found: {weights}/model.safetensors" in " ".join(result.output.split())


def test_wrong_weights_sha256_is_refused_before_any_work(shapes, checkpoint, tmp_path):
    result = rayseg(
        "segment", shapes.images_dir, tmp_path / "out", "--model", "unet", "--weights", checkpoint, "--weights-sha256", "0" * 64
    )
    assert result.exit_code == 2
    assert "sha256 mismatch" in result.output


def test_an_output_holding_results_is_never_overwritten(shapes, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "part-00000.parquet").write_bytes(b"earlier results")
    result = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", "random")
    assert result.exit_code == 2 and "not empty" in result.output
    assert (output / "part-00000.parquet").read_bytes() == b"earlier results"


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    assert "input not found" in rayseg("segment", tmp_path / "nowhere", tmp_path / "o", "--model", "unet", "--weights", "random").output
    (tmp_path / "empty").mkdir()
    result = rayseg("segment", tmp_path / "empty", tmp_path / "o", "--model", "unet", "--weights", "random")
    assert result.exit_code == 2 and "no images" in result.output


def test_readers_find_a_committed_run_through_its_run_file(shapes, tmp_path):
    output = tmp_path / "out"
    assert rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", "random", "--limit", "2").exit_code == 0
    files = committed_files(str(output))
    assert files == [str(output / "part-00000.parquet")]
    (output / RUN_FILE).unlink()  # as if the run had died before committing
    with pytest.raises(OutputError, match="no committed run"):
        committed_files(str(output))
