"""Object storage (a real S3 API on 127.0.0.1) and manifests: the same rows as local runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.models.unet import UNet, UNetConfig, save_unet
from rayseg.pipeline.schema import OUTPUT_SCHEMA
from rayseg.pipeline.sources import (
    check_manifest,
    dataset_from_table,
    manifest_table,
    normalise_manifest,
    source_kind,
)
from rayseg.pipeline.storage import join_uri, move, parse_storage_options, remove

from .conftest import BUCKET, PLANTED_SECRET

pytestmark = pytest.mark.usefixtures("ray_cluster")

runner = CliRunner()


def rayseg(*args) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def rows_by_id(table: pa.Table) -> dict[str, dict]:
    assert table.schema.equals(OUTPUT_SCHEMA)
    return {row["image_id"]: row for row in table.to_pylist()}


def read_s3_output(prefix: str) -> pa.Table:
    fs = s3()
    files = sorted(p for p in fs.find(prefix) if p.endswith(".parquet"))
    assert files and not any("/_staging/" in p for p in files)
    return pa.concat_tables(pq.read_table(p, filesystem=fs) for p in files)


@pytest.fixture(scope="module")
def uploaded(shapes, tmp_path_factory):
    """The shapes images and a U-Net checkpoint under s3://BUCKET/, uploaded with boto3."""
    client = boto3.client("s3")
    for path in sorted(shapes.images_dir.glob("*.png")):
        client.upload_file(str(path), BUCKET, f"images/{path.name}")
    torch.manual_seed(0)
    network = UNet(UNetConfig(width=4, depth=2))
    with torch.no_grad():
        network.head.weight.mul_(100)  # varied classes, so comparisons compare something
    local = tmp_path_factory.mktemp("unet")
    save_unet(network, str(local))
    for name in ("config.json", "model.safetensors"):
        client.upload_file(str(local / name), BUCKET, f"unet/{name}")
    return {"images": f"s3://{BUCKET}/images", "weights": f"s3://{BUCKET}/unet", "local_weights": local}


@pytest.fixture(scope="module")
def local_rows(shapes, uploaded, tmp_path_factory):
    output = tmp_path_factory.mktemp("local") / "out"
    result = rayseg("segment", shapes.images_dir, output, "--model", "unet", "--weights", uploaded["local_weights"])
    assert result.exit_code == 0, result.output
    return rows_by_id(pq.read_table(output))


def label_map(row: dict) -> np.ndarray:
    """The row's semantic segments painted into one (H, W) map of category ids."""
    labels = np.zeros((row["height"], row["width"]), dtype=np.int32)
    for segment in row["segments"]:
        labels[mask_utils.decode({"size": [row["height"], row["width"]], "counts": segment["rle"]}).astype(bool)] = segment["category_id"]
    return labels


def same_predictions(got: dict, want: dict) -> None:
    for key in ("width", "height", "status"):
        assert got[key] == want[key], key
    # The runs batch images differently, and oneDNN picks its kernels by batch size: a pixel
    # at a near-tie between two classes may flip, nothing more.
    assert (label_map(got) == label_map(want)).mean() >= 0.99
    scores = {s["category_id"]: s["score"] for s in want["segments"]}
    for segment in got["segments"]:
        if segment["category_id"] in scores:
            assert segment["score"] == pytest.approx(scores[segment["category_id"]], abs=1e-3)


def test_s3_input_weights_and_output_give_the_same_rows_as_a_local_run(uploaded, local_rows):
    output = f"s3://{BUCKET}/runs/s3-end-to-end"
    result = rayseg("segment", uploaded["images"], output, "--model", "unet", "--weights", uploaded["weights"])
    assert result.exit_code == 0, result.output
    rows = rows_by_id(read_s3_output(output))
    assert rows.keys() == local_rows.keys()
    for image_id, row in rows.items():
        assert row["uri"] == f"{uploaded['images']}/{image_id}"
        same_predictions(row, local_rows[image_id])
    fs = s3()
    run = json.loads(fs.cat(f"{output}/_run.json"))
    assert run["counts"]["images"] == 20 and run["counts"]["ok"] == 20
    assert run["weights"] == uploaded["weights"] and len(run["weights_sha256"]) == 64
    assert not fs.exists(f"{output}/_staging")


@pytest.mark.reliability
def test_names_with_glob_characters_are_read_and_committed_as_written(shapes):
    """"[1]", "*" and "?" are plain characters in keys: fsspec's rm/mv/cat would match
    them as globs (here: read a1.png for a[1].png, or fail the commit after the work)."""
    client = boto3.client("s3")
    client.upload_file(str(shapes.images_dir / "000000.png"), BUCKET, "odd[1]/a[1].png")
    client.upload_file(str(shapes.images_dir / "000001.png"), BUCKET, "odd[1]/a*.png")
    client.upload_file(str(shapes.images_dir / "000002.png"), BUCKET, "odd1/a1.png")  # what the globs match
    client.put_object(Bucket=BUCKET, Key="runs/glob1/_staging/other/keep.parquet", Body=b"another run's")
    output = f"s3://{BUCKET}/runs/glob[1]"
    result = rayseg("segment", f"s3://{BUCKET}/odd[1]", output, "--model", "unet", "--weights", "random")
    assert result.exit_code == 0, result.output
    rows = rows_by_id(read_s3_output(output))
    assert sorted(rows) == ["a*.png", "a[1].png"] and all(r["status"] == "ok" for r in rows.values())
    assert rows["a[1].png"]["uri"] == f"s3://{BUCKET}/odd[1]/a[1].png"
    fs = s3()
    assert not fs.exists(f"{output}/_staging") and fs.exists(f"{BUCKET}/runs/glob1/_staging/other/keep.parquet")


def test_remove_and_move_take_object_keys_as_written():
    fs = s3()
    for key in ("tree[1]/a", "tree[1]/b/c", "tree1/a", "file[1]", "file1"):
        fs.pipe_file(f"{BUCKET}/{key}", key.encode())
    remove(fs, f"{BUCKET}/tree[1]")
    move(fs, f"{BUCKET}/file[1]", f"{BUCKET}/moved[1]")
    assert not fs.exists(f"{BUCKET}/tree[1]/a") and not fs.exists(f"{BUCKET}/tree[1]/b/c")
    assert fs.cat_file(f"{BUCKET}/tree1/a") == b"tree1/a", "a path the glob would match is left alone"
    assert fs.cat_file(f"{BUCKET}/moved[1]") == b"file[1]" and not fs.exists(f"{BUCKET}/file[1]")
    assert fs.cat_file(f"{BUCKET}/file1") == b"file1"


def test_parquet_manifest_naming_a_missing_object_gives_one_error_row(uploaded, local_rows, tmp_path):
    names = sorted(local_rows)[:5]
    uris = [f"{uploaded['images']}/{n}" for n in names] + [f"{uploaded['images']}/missing.png"]
    manifest = f"s3://{BUCKET}/manifests/images.parquet"
    with s3().open(manifest, "wb") as f:
        pq.write_table(pa.table({"image_id": names + ["missing"], "uri": uris, "extra": list(range(6))}), f)
    output = tmp_path / "out"
    result = rayseg("segment", manifest, output, "--model", "unet", "--weights", uploaded["weights"])
    assert result.exit_code == 0, result.output
    rows = rows_by_id(pq.read_table(output))
    assert sorted(rows) == sorted(names + ["missing"])
    assert rows["missing"]["status"] == "error" and "FileNotFoundError" in rows["missing"]["error"]
    for name in names:
        same_predictions(rows[name], local_rows[name])


def test_csv_manifest_with_relative_uris_joins_them_to_the_image_root(uploaded, local_rows, tmp_path):
    names = sorted(local_rows)[5:9]
    manifest = tmp_path / "images.csv"
    pacsv.write_csv(pa.table({"uri": names}), manifest)
    output = tmp_path / "out"
    result = rayseg(
        "segment", manifest, output, "--model", "unet", "--weights", uploaded["weights"], "--image-root", uploaded["images"]
    )
    assert result.exit_code == 0, result.output
    rows = rows_by_id(pq.read_table(output))
    assert sorted(rows) == names, "without an image_id column, the id is the uri as written"
    for name in names:
        assert rows[name]["uri"] == f"{uploaded['images']}/{name}"
        same_predictions(rows[name], local_rows[name])


def test_coco_json_input_uses_coco_image_ids(shapes, uploaded, local_rows, tmp_path):
    coco = json.loads(shapes.instances_json.read_text())
    coco_uri = f"s3://{BUCKET}/annotations/instances.json"
    s3().pipe(coco_uri, json.dumps(coco).encode())
    output = tmp_path / "out"
    result = rayseg(
        "segment", coco_uri, output, "--model", "unet", "--weights", uploaded["weights"], "--image-root", uploaded["images"]
    )
    assert result.exit_code == 0, result.output
    rows = rows_by_id(pq.read_table(output))
    assert sorted(rows, key=int) == [str(image["id"]) for image in coco["images"]]
    for image in coco["images"]:
        same_predictions(rows[str(image["id"])], local_rows[image["file_name"]])


@pytest.fixture
def other_s3_endpoint():
    """A second S3 server in its own process (so with its own state), named by no env var."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_storage_options_on_the_command_line_reach_every_worker(shapes, tmp_path, other_s3_endpoint):
    # Ray's workers inherited an environment naming the session's S3 server, which has no
    # bucket "elsewhere": only the --storage-option leads the listing and every decode
    # task to the other server.
    client = boto3.client("s3", endpoint_url=other_s3_endpoint)
    client.create_bucket(Bucket="elsewhere")
    for path in sorted(shapes.images_dir.glob("*.png"))[:4]:
        client.upload_file(str(path), "elsewhere", f"images/{path.name}")
    output = tmp_path / "out"
    result = rayseg(
        "segment", "s3://elsewhere/images", output, "--model", "unet", "--weights", "random",
        "--storage-option", f"endpoint_url={other_s3_endpoint}",
    )
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in pq.read_table(output).to_pylist()] == ["ok"] * 4


def test_an_hf_checkpoint_with_only_a_bin_file_is_found_on_an_endpoint_given_as_a_storage_option(
    s3_endpoint, tmp_path, other_s3_endpoint
):
    """The weights finder lists the directory with the run's storage options: without them
    it looked for model.safetensors and the run failed "weights not found"."""
    from safetensors.torch import load_file
    from transformers import MaskFormerImageProcessor

    from rayseg.models.maskformer import build_maskformer
    from rayseg.pipeline.segment import ModelSpec, pin_weights

    from .test_maskformer import save_checkpoint

    local = tmp_path / "maskformer"
    save_checkpoint(local, "maskformer", MaskFormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}))
    torch.save(load_file(local / "model.safetensors"), local / "pytorch_model.bin")
    (local / "model.safetensors").unlink()
    client = boto3.client("s3", endpoint_url=other_s3_endpoint)
    client.create_bucket(Bucket="weights")
    for path in local.iterdir():
        client.upload_file(str(path), "weights", f"maskformer/{path.name}")
    storage_options = {"endpoint_url": other_s3_endpoint}
    pinned = pin_weights(ModelSpec("maskformer", "s3://weights/maskformer"), storage_options)
    assert pinned.weights_sha256 == hashlib.sha256((local / "pytorch_model.bin").read_bytes()).hexdigest()
    model = build_maskformer("s3://weights/maskformer", weights_sha256=pinned.weights_sha256, storage_options=storage_options)
    assert model.weights_sha256 == pinned.weights_sha256


def test_credentials_never_reach_outputs_or_logs(uploaded, tmp_path, caplog):
    output = f"s3://{BUCKET}/runs/secret-check"
    result = rayseg(
        "segment", uploaded["images"], output, "--model", "unet", "--weights", uploaded["weights"], "--limit", "3",
        "--storage-option", "key=rayseg-test-key", "--storage-option", f"secret={PLANTED_SECRET}",
    )
    assert result.exit_code == 0, result.output
    fs = s3()
    for path in fs.find(output):
        assert PLANTED_SECRET.encode() not in fs.cat(path), path
    assert PLANTED_SECRET not in result.output
    assert PLANTED_SECRET not in caplog.text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for log_file in logs.rglob("*"):
        if log_file.is_file():
            assert PLANTED_SECRET.encode() not in log_file.read_bytes(), log_file


def test_storage_that_cannot_be_reached_or_is_not_installed_is_exit_2_naming_the_input(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        result = rayseg(
            "segment", f"s3://{BUCKET}/images", tmp_path / "out", "--model", "unet",
            "--storage-option", f"endpoint_url={endpoint}", "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}',
        )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"cannot read s3://{BUCKET}/images: EndpointConnectionError" in " ".join(result.output.split())
    if importlib.util.find_spec("adlfs") is None:  # Azure's fsspec package, not a dependency
        result = rayseg("segment", "az://container/images", tmp_path / "out", "--model", "unet")
        assert result.exit_code == 2 and "cannot open az://container/images: Install adlfs" in " ".join(result.output.split())


def test_a_manifest_without_a_uri_column_is_refused_before_any_work(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.png"]}), manifest)
    result = rayseg("segment", manifest, tmp_path / "out", "--model", "unet", "--weights", "random")
    assert result.exit_code == 2 and "no 'uri' column" in result.output


def test_a_coco_json_input_needs_an_image_root(shapes, tmp_path):
    result = rayseg("segment", shapes.instances_json, tmp_path / "out", "--model", "unet", "--weights", "random")
    assert result.exit_code == 2 and "--image-root" in result.output


def test_a_coco_json_that_is_not_json_or_has_a_null_id_is_refused_naming_the_file(shapes, tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [')
    coco = json.loads(shapes.instances_json.read_text())
    coco["images"][3]["id"] = None
    (tmp_path / "null-id.json").write_text(json.dumps(coco))
    coco["images"][3]["id"], coco["images"][5]["file_name"] = 3, None
    (tmp_path / "null-name.json").write_text(json.dumps(coco))
    (tmp_path / "images-object.json").write_text(json.dumps({"images": {"id": 1, "file_name": "a.png"}}))
    for name, message in (
        ("broken.json", "is not valid JSON"),
        ("null-id.json", "every COCO image needs an 'id'"),
        ("null-name.json", f"image {coco['images'][5]['id']!r} has file_name None, not a path"),
        ("images-object.json", "is not a COCO json with a non-empty 'images' list"),
    ):
        result = rayseg(
            "segment", tmp_path / name, tmp_path / "out", "--model", "unet", "--weights", "random",
            "--image-root", shapes.images_dir,
        )  # fmt: skip
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and name in text and message in text


def test_a_coco_json_with_a_repeated_image_id_is_refused(shapes, tmp_path):
    coco = json.loads(shapes.instances_json.read_text())
    coco["images"][1]["id"] = coco["images"][0]["id"]
    (tmp_path / "repeated.json").write_text(json.dumps(coco))
    result = rayseg(
        "segment", tmp_path / "repeated.json", tmp_path / "out", "--model", "unet", "--weights", "random",
        "--image-root", shapes.images_dir,
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"COCO image ids must be unique; 1 repeat, e.g. '{coco['images'][0]['id']}'" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "uri,kind",
    [("s3://b/m.parquet", "parquet"), ("m.CSV", "csv"), ("gs://b/coco.json", "coco"), ("s3://b/images/", "directory"), ("/data", "directory")],
)
def test_source_kind_follows_the_extension(uri, kind):
    assert source_kind(uri) == kind


def test_manifest_rows_keep_their_ids_and_rows_without_ids_or_uris_are_kept():
    table = pa.table({"image_id": ["a", None, "", None, "b"], "uri": ["x/1.png", "x/2.png", "x/3.png", None, " "]})
    out = normalise_manifest(table, image_root="s3://b/root")
    assert out.to_pylist() == [
        {"image_id": "a", "uri": "s3://b/root/x/1.png", "error": None},
        {"image_id": "x/2.png", "uri": "s3://b/root/x/2.png", "error": None},
        {"image_id": "x/3.png", "uri": "s3://b/root/x/3.png", "error": None},  # an empty id is none
        {"image_id": "", "uri": None, "error": "manifest row has no uri"},
        {"image_id": "b", "uri": None, "error": "manifest row has no uri"},  # a blank uri is none
    ]


def test_a_csv_manifest_with_a_byte_order_mark_has_its_uri_column(tmp_path):
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes("uri,image_id\nimages/a.png,001\n".encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert check_manifest(str(manifest), "csv") == ["image_id", "uri"]
    rows = manifest_table(str(manifest), "csv", image_root="/data")
    assert rows.to_pylist() == [{"image_id": "001", "uri": "/data/images/a.png", "error": None}]


@pytest.mark.parametrize("rows,cpus,blocks", [(500, 2, 8), (3000, 2, 12), (5, 2, 5), (100_000, 64, 391)])
def test_a_listing_becomes_blocks_of_at_most_256_rows_and_several_per_cpu(rows, cpus, blocks):
    table = pa.table({"image_id": [str(i) for i in range(rows)], "uri": [f"/images/{i}.png" for i in range(rows)]})
    dataset = dataset_from_table(table, cpus)
    assert dataset.num_blocks() == blocks
    assert dataset.count() == rows


def test_join_uri_keeps_absolute_paths_and_uris():
    assert join_uri("s3://b/root/", "a/b.png") == "s3://b/root/a/b.png"
    assert join_uri("/data", "a.png") == "/data/a.png"
    assert join_uri("/data", "gs://other/a.png") == "gs://other/a.png"
    assert join_uri("/data", "/abs/a.png") == "/abs/a.png"


def test_storage_option_values_are_typed_when_they_are_json():
    assert parse_storage_options(["anon=false", "endpoint_url=http://h:1", "retries=3", 'client_kwargs={"region_name": "x"}']) == {
        "anon": False,
        "endpoint_url": "http://h:1",
        "retries": 3,
        "client_kwargs": {"region_name": "x"},
    }
    with pytest.raises(ValueError, match="--storage-option takes KEY=VALUE, got 'novalue'"):
        parse_storage_options(["novalue"])
    with pytest.raises(ValueError, match="--model-option takes KEY=VALUE, got 'min_area'"):
        parse_storage_options(["min_area"], flag="--model-option")
