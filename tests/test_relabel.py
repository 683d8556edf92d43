"""Re-labelling: each run a new version; only new or changed images go through the model, the
rest are carried forward; a COCO export and a diff against the previous version."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from pycocotools.coco import COCO
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.jobs.relabel import list_versions
from rayseg.models.unet import UNet, UNetConfig, save_unet

from .conftest import same_segments

pytestmark = pytest.mark.usefixtures("ray_cluster")

runner = CliRunner()


def rows_by_id(directory) -> dict[str, dict]:
    return {row["image_id"]: row for row in pq.read_table(directory).to_pylist()}


def relabel_setup(shapes, tmp_path, seed: int):
    """A source of 12 images (000000 … 000011), U-Net weights that predict several classes
    per image, and a relabel spec over them: (source, weights, output root, spec file)."""
    source = tmp_path / "images"
    source.mkdir()
    for image in sorted(shapes.images_dir.glob("*.png"))[:12]:
        shutil.copy(image, source)
    torch.manual_seed(seed)
    network = UNet(UNetConfig(width=4, depth=2))
    with torch.no_grad():
        network.head.weight.mul_(100)
    weights = tmp_path / "unet"
    save_unet(network, str(weights))
    root = tmp_path / "relabel"
    spec = tmp_path / "relabel.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "relabel", "source": str(source), "output_root": str(root), "schedule": "0 3 * * *",
        "model": {"name": "unet", "weights": str(weights)},
    }))
    return source, weights, root, spec


def test_versions_segment_only_what_changed_and_match_a_full_run(shapes, tmp_path):
    source, weights, root, spec = relabel_setup(shapes, tmp_path, seed=0)

    first = runner.invoke(app, ["relabel", str(spec)])
    assert first.exit_code == 0, first.output
    (v1,) = list_versions(str(root))
    assert v1.name == "v0001" and v1.run["processed"] == 12 and v1.run["counts"]["images"] == 12
    assert v1.diff["images"] == {"added": 12, "removed": 0, "changed": 0, "retried": 0, "relabelled": 0}

    unchanged = runner.invoke(app, ["relabel", str(spec)])
    assert unchanged.exit_code == 0 and "no new version" in unchanged.output
    assert len(list_versions(str(root))) == 1

    (source / "000003.png").write_bytes((shapes.images_dir / "000015.png").read_bytes())  # changed
    shutil.copy(shapes.images_dir / "000016.png", source / "new.png")  # added
    (source / "000007.png").unlink()  # removed
    second = runner.invoke(app, ["relabel", str(spec)])
    assert second.exit_code == 0, second.output
    v1, v2 = list_versions(str(root))
    assert v2.name == "v0002" and v2.run["previous_version"] == "v0001"
    assert v2.run["processed"] == 2 and v2.run["carried_forward"] == 10
    assert v2.diff["images"] == {"added": 1, "removed": 1, "changed": 1, "retried": 0, "relabelled": 0}
    assert v2.diff["examples"] == {"added": ["new.png"], "removed": ["000007.png"], "changed": ["000003.png"], "retried": [], "relabelled": []}

    fresh = tmp_path / "fresh"
    full = runner.invoke(app, ["segment", str(source), str(fresh), "--model", "unet", "--weights", str(weights)])
    assert full.exit_code == 0, full.output
    version_rows, fresh_rows = rows_by_id(root / "versions" / "v0002" / "predictions"), rows_by_id(fresh)
    assert version_rows.keys() == fresh_rows.keys()
    for image_id, row in version_rows.items():
        same_segments(row["segments"], fresh_rows[image_id]["segments"])

    old = rows_by_id(root / "versions" / "v0001" / "predictions")
    expected: dict[str, dict[str, int]] = {}
    for image_id in ("new.png", "000007.png", "000003.png"):
        before = Counter(s["label"] for s in old.get(image_id, {"segments": []})["segments"])
        after = Counter(s["label"] for s in version_rows.get(image_id, {"segments": []})["segments"])
        for label in before | after:
            entry = expected.setdefault(label, {"added": 0, "removed": 0})
            entry["added"] += max(0, after[label] - before[label])
            entry["removed"] += max(0, before[label] - after[label])
    assert v2.diff["segments_by_label"] == dict(sorted(expected.items()))
    assert sum(c["removed"] for c in expected.values()) > 0, "the deleted image's segments count as removed"
    coco = COCO(str(root / "versions" / "v0002" / "coco.json"))
    assert len(coco.imgs) == 12 and len(coco.anns) == sum(len(r["segments"]) for r in version_rows.values())

    listing = runner.invoke(app, ["versions", str(root)], env={"COLUMNS": "80"})
    assert listing.exit_code == 0 and "v0001" in listing.stdout and "v0002" in listing.stdout
    lines = listing.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in listing.stdout, max(lines, key=len)
    assert all(header in listing.stdout for header in ("finished (UTC)", "segments", "segmented", "removed", "retried", "relabelled"))

    spec.write_text(spec.read_text().replace(str(weights), "random"))  # another model over the same source
    third = runner.invoke(app, ["relabel", str(spec)])
    assert third.exit_code == 0 and "12 relabelled (the model, weights or options changed)" in " ".join(third.output.split())
    v3 = list_versions(str(root))[-1]
    assert v3.run["processed"] == 12 and v3.run["carried_forward"] == 0 and v3.run["weights"] == "random"
    assert v3.diff["images"] == {"added": 0, "removed": 0, "changed": 0, "retried": 0, "relabelled": 12}
    assert "no new version" in runner.invoke(app, ["relabel", str(spec)]).output


def test_versions_of_a_root_that_is_not_a_relabel_root_is_refused(tmp_path):
    result = runner.invoke(app, ["versions", str(tmp_path)])
    assert result.exit_code == 2 and "holds no re-labelling versions (no versions/ directory)" in " ".join(result.output.split())


def test_a_relabel_spec_is_not_a_segment_spec(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"input": "a", "output": "b", "model": {"name": "unet", "weights": "random"}}))
    result = runner.invoke(app, ["relabel", str(spec)])
    assert result.exit_code == 2 and "kind: relabel" in result.output


def test_a_relabel_that_died_before_its_commit_is_finished_by_the_next_from_what_it_staged(shapes, tmp_path, monkeypatch):
    source, weights, root, spec = relabel_setup(shapes, tmp_path, seed=1)
    assert runner.invoke(app, ["relabel", str(spec)]).exit_code == 0
    for index, image in enumerate(sorted(shapes.images_dir.glob("*.png"))[12:18]):
        shutil.copy(image, source / f"new-{index}.png")
    (source / "000003.png").write_bytes((shapes.images_dir / "000019.png").read_bytes())

    def killed(*args, **kwargs):
        raise RuntimeError("preempted")

    with monkeypatch.context() as patched:  # the second run dies as it commits: all staged, nothing committed
        patched.setattr(LocalFileSystem, "mv", killed)
        died = runner.invoke(app, ["relabel", str(spec)])
    assert died.exit_code == 1 and "the next relabel run takes over the rows this one staged" in died.output
    staging = root / "versions" / "v0002" / "predictions" / "_staging" / "v0002"
    # As if it had died earlier, having staged three of its seven new or changed images.
    kept = {"new-0.png", "new-1.png", "000003.png"}
    staged = pq.read_table(sorted(staging.glob("*.parquet")))
    for path in staging.glob("*.parquet"):
        path.unlink()
    pq.write_table(staged.filter(pc.is_in(staged["image_id"], pa.array(sorted(kept)))), staging / "part-0.parquet")
    (staging / "torn.parquet").write_bytes(b"PAR1 half a file")
    # new-0.png staged twice, as a write task retried under another file name may leave it.
    pq.write_table(staged.filter(pc.equal(staged["image_id"], "new-0.png")), staging / "part-1.parquet")
    # An unfinished version begun with other weights: nothing of it may be taken.
    other = root / "versions" / "v0005"
    shutil.copytree(root / "versions" / "v0002", other)
    other_staging = other / "predictions" / "_staging" / "v0002"
    other_staging.rename(other_staging.parent / "v0005")
    attempt = json.loads((other_staging.parent / "v0005" / "_attempt.json").read_text())
    (other_staging.parent / "v0005" / "_attempt.json").write_text(json.dumps({**attempt, "weights_sha256": "0" * 64}))
    # new-1.png changes after the run that staged it died: its staged row is stale.
    (source / "new-1.png").write_bytes((shapes.images_dir / "000001.png").read_bytes())

    resumed = runner.invoke(app, ["relabel", str(spec)])
    assert resumed.exit_code == 0, resumed.output
    v1, v6 = list_versions(str(root))
    assert v6.name == "v0006" and v6.run["previous_version"] == "v0001"
    assert v6.run["recovered"] == {"v0002": 1}, "000003.png; not new-0.png (twice), new-1.png (changed), nor v0005's"
    assert v6.run["processed"] == 6 and v6.run["carried_forward"] == 11
    assert "1 taken from unfinished versions" in " ".join(resumed.output.split())
    assert v6.diff["images"] == {"added": 6, "removed": 0, "changed": 1, "retried": 0, "relabelled": 0}
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v0001", "v0006"], "unfinished versions deleted"

    fresh = tmp_path / "fresh"
    assert runner.invoke(app, ["segment", str(source), str(fresh), "--model", "unet", "--weights", str(weights)]).exit_code == 0
    version_rows, fresh_rows = rows_by_id(root / "versions" / "v0006" / "predictions"), rows_by_id(fresh)
    assert version_rows.keys() == fresh_rows.keys()
    for image_id, row in version_rows.items():
        same_segments(row["segments"], fresh_rows[image_id]["segments"])


def test_a_manifest_source_keeps_its_ids_and_error_rows_are_retried_but_not_every_run(shapes, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(shapes.images_dir / "000000.png", images / "first.png")
    manifest = tmp_path / "manifest.csv"

    def write_manifest(*rows: str) -> None:
        manifest.write_text("\n".join(["image_id,uri,etag", *rows]) + "\n")

    write_manifest(
        "001,first.png,e1",
        "007,late.png,e7",  # missing until after the first run; its etag never changes
        "never,never.png,e9",  # missing every run
        "blank,,",  # no uri: an error row, not the image root
        "lookup,gone.png,",  # no etag: looked up, missing: an error row, not a failed run
    )
    root = tmp_path / "relabel"
    spec = tmp_path / "relabel.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "relabel", "source": str(manifest), "image_root": str(images), "output_root": str(root),
        "schedule": "0 3 * * *", "model": {"name": "unet", "weights": "random"},
    }))

    def relabel() -> str:
        result = runner.invoke(app, ["relabel", str(spec)])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    relabel()
    (v1,) = list_versions(str(root))
    rows = rows_by_id(root / "versions" / "v0001" / "predictions")
    assert sorted(rows) == ["001", "007", "blank", "lookup", "never"], "ids as written: 001 stays 001"
    assert [rows[i]["status"] for i in ("001", "007", "never", "blank", "lookup")] == ["ok"] + ["error"] * 4
    assert rows["blank"]["error"] == "manifest row has no uri"

    shutil.copy(shapes.images_dir / "000001.png", images / "late.png")
    assert "4 error rows retried" in relabel()
    v1, v2 = list_versions(str(root))
    assert v2.diff["images"] == {"added": 0, "removed": 0, "changed": 0, "retried": 4, "relabelled": 0}
    rows = rows_by_id(root / "versions" / "v0002" / "predictions")
    assert rows["007"]["status"] == "ok" and rows["never"]["status"] == "error"

    assert "no new version" in relabel(), "the last version only retried: the three that still fail wait for a change"
    assert len(list_versions(str(root))) == 2

    shutil.copy(shapes.images_dir / "000002.png", images / "new.png")
    write_manifest("001,first.png,e1", "007,late.png,e7", "never,never.png,e9", "blank,,", "lookup,gone.png,", "new,new.png,e10")
    relabel()
    v3 = list_versions(str(root))[-1]
    assert v3.diff["images"] == {"added": 1, "removed": 0, "changed": 0, "retried": 3, "relabelled": 0}
    assert v3.run["carried_forward"] == 2

    write_manifest()
    relabel()
    v4 = list_versions(str(root))[-1]
    assert v4.name == "v0004" and v4.run["counts"]["images"] == 0 and v4.diff["images"]["removed"] == 6


def test_a_changed_phrase_list_relabels_every_image_and_the_coco_export_lists_the_phrases(shapes, tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for image in sorted(shapes.images_dir.glob("*.png"))[:4]:
        shutil.copy(image, source)
    root = tmp_path / "relabel"
    spec = tmp_path / "relabel.yaml"

    def write_spec(text) -> None:
        model = {"name": "sam3", "weights": "random", "score_threshold": 0.2, "text": text}
        spec.write_text(yaml.safe_dump({"kind": "relabel", "source": str(source), "output_root": str(root), "model": model}))

    write_spec("circle, square")
    assert runner.invoke(app, ["relabel", str(spec)]).exit_code == 0
    write_spec(["circle", "square"])  # the same phrases, as a list: the same model
    assert "no new version" in runner.invoke(app, ["relabel", str(spec)]).output
    write_spec("circle, square, triangle")
    again = runner.invoke(app, ["relabel", str(spec)])
    assert again.exit_code == 0 and "4 relabelled" in " ".join(again.output.split()), again.output
    v2 = list_versions(str(root))[-1]
    assert v2.diff["images"]["relabelled"] == 4 and v2.run["processed"] == 4
    coco = json.loads((root / "versions" / v2.name / "coco.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "circle"), (2, "square"), (3, "triangle")]
    assert coco["annotations"] and {a["category_id"] for a in coco["annotations"]} <= {1, 2, 3}
