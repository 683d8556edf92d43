"""Directory listings (issue 25): the streamed listing gives exactly the rows fs.find gave."""

from __future__ import annotations

import os
import posixpath

import boto3
import pyarrow as pa
import pytest

from rayseg.jobs.relabel import fingerprint as relabel_fingerprint
from rayseg.pipeline import sources
from rayseg.pipeline.sources import IMAGE_EXTENSIONS, SourceError, list_images
from rayseg.pipeline.storage import filesystem, full_uri

from .conftest import BUCKET


def listed_by_find(input_uri: str, fingerprint=None) -> pa.Table:
    """The listing as list_images made it before issue 25: one fs.find of the whole tree."""
    fs, root = filesystem(input_uri)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    paths = sorted(path for path in found if posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS)
    ids, uris, errors = [], [], []
    for path in paths:
        image_id, uri = posixpath.relpath(path, root), full_uri(fs, path)
        if sources._utf8(uri):
            errors.append(None)
        else:
            image_id, uri = sources._escaped(image_id), sources._escaped(uri)
            errors.append(f"file name is not valid UTF-8: {uri}")
        ids.append(image_id)
        uris.append(uri)
    columns = {"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()), "error": pa.array(errors, pa.string())}
    if fingerprint is not None:
        columns["fingerprint"] = pa.array([fingerprint(found[path]) for path in paths], pa.string())
    return pa.table(columns)


@pytest.fixture
def tree(tmp_path):
    """Nested directories of images among other files, with the names that tell listings
    apart: mixed-case extensions, hidden files and directories, symlinks, a name that is not
    UTF-8 (it sorts after "cafz" and "café" as a name, before them once escaped as "caf\\xe9")."""
    root = tmp_path / "images"
    for name in (
        "a.png", "B.JPG", "c.Jpeg", "notes.txt", "README", "png", ".png", ".hidden.png", "café.png", "cafz.png",
        "x/d.tif", "x/e.TIFF", "x/f.webp", "x/data.json", "x/y/g.bmp", "x/y/h.gif", "x/y/z/i.png", "x/y/z/j.PNG",
        ".cache/k.png", "empty/.keep", "x10/l.png", "x2/m.png",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:
        f.write(b"latin-1")
    (root / "link.png").symlink_to(root / "a.png")
    (root / "broken.png").symlink_to(root / "gone.png")
    (root / "linked-dir.png").symlink_to(root / "x")  # a file to fs.find: listed, not followed
    (root / "linked-dir").symlink_to(root / "x")
    return root


def test_a_streamed_listing_equals_the_fs_find_listing_with_and_without_fingerprints(tree):
    for fingerprint in (None, relabel_fingerprint):
        got = list_images(str(tree), fingerprint=fingerprint)
        want = listed_by_find(str(tree), fingerprint)
        assert got.schema.equals(want.schema)
        assert got.to_pylist() == want.to_pylist()
    ids = got["image_id"].to_pylist()
    assert ids[:4] == [".cache/k.png", ".hidden.png", "B.JPG", "a.png"]
    assert ids.index("cafz.png") < ids.index("café.png") < ids.index("caf\\xe9.png"), "sorted by name, not by the escaped form"
    assert {"linked-dir.png", "link.png", "broken.png", "x/y/z/j.PNG"} <= set(ids) and "linked-dir/d.tif" not in ids
    assert not {"notes.txt", "README", "png", ".png", "x/data.json", "empty/.keep"} & set(ids)
    (odd,) = [row for row in got.to_pylist() if row["error"]]
    assert odd["image_id"] == "caf\\xe9.png" and odd["error"] == f"file name is not valid UTF-8: {tree}/caf\\xe9.png"


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 20, 1000])
def test_a_listing_built_in_chunks_of_any_size_equals_the_fs_find_listing(tree, monkeypatch, chunk_rows):
    # 20 images: chunks of 1 and 20 end exactly at the last one, 2 and 3 part way; the
    # non-UTF-8 name lands in one chunk of several.
    monkeypatch.setattr(sources, "LISTING_CHUNK_ROWS", chunk_rows)
    got = list_images(str(tree), fingerprint=relabel_fingerprint)
    assert got.num_rows == 20
    assert got.to_pylist() == listed_by_find(str(tree), relabel_fingerprint).to_pylist()


def test_a_directory_without_images_gives_an_empty_table_and_a_missing_one_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    empty = list_images(str(tmp_path), fingerprint=relabel_fingerprint)
    assert empty.num_rows == 0 and empty.schema.equals(listed_by_find(str(tmp_path), relabel_fingerprint).schema)
    with pytest.raises(SourceError, match="input not found"):
        list_images(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="neither a directory nor a manifest"):
        list_images(str(tmp_path / "notes.txt"))


def test_an_s3_prefix_lists_as_fs_find_did_and_leaves_no_listing_cached(s3_endpoint, monkeypatch):
    client = boto3.client("s3")
    for key in ("a.png", "B.JPG", "notes.txt", "sub/", "sub/c.tiff", "sub/deeper/d.webp", "sub/deeper/e.PNG", "sub2/f.png"):
        client.put_object(Bucket=BUCKET, Key=f"listing/{key}", Body=key.encode())
    prefix = f"s3://{BUCKET}/listing"
    monkeypatch.setattr(sources, "LISTING_CHUNK_ROWS", 2)
    for fingerprint in (None, relabel_fingerprint):
        got = list_images(prefix, fingerprint=fingerprint)
        assert got.to_pylist() == listed_by_find(prefix, fingerprint).to_pylist()
    assert got["image_id"].to_pylist() == ["B.JPG", "a.png", "sub/c.tiff", "sub/deeper/d.webp", "sub/deeper/e.PNG", "sub2/f.png"]
    assert got["uri"][0].as_py() == f"{prefix}/B.JPG" and got["fingerprint"][0].as_py().startswith("etag:")
    # s3fs keeps every listing it made for the life of the process: the listing drops them.
    fs, _ = filesystem(prefix)
    fs.invalidate_cache()  # what listed_by_find's fs.find left
    list_images(prefix)
    assert not [path for path in fs.dircache if path.startswith(f"{BUCKET}/listing")]
