"""Decode turns any image file into RGB uint8 in display orientation, or a clear error row."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from rayseg.pipeline.decode import (
    DecodeError,
    as_rgb,
    decode_batch,
    decode_image,
    decode_images,
)
from rayseg.pipeline.in_flight import MAX_DEATHS_ALONE, InFlightRecord


def encoded(image: Image.Image, format: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_args)
    return buffer.getvalue()


def test_rgb_png_decodes_to_its_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = decode_image(encoded(Image.fromarray(pixels)))
    assert decoded.dtype == np.uint8 and decoded.shape == (5, 7, 3)
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_other_modes_become_three_channel_rgb(mode):
    image = Image.new(mode, (6, 4))
    data = encoded(image, "JPEG" if mode == "CMYK" else "PNG")
    decoded = decode_image(data)
    assert decoded.shape == (4, 6, 3) and decoded.dtype == np.uint8


def test_exif_orientation_is_applied_and_swaps_width_and_height():
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :5] = 255  # a white band on the left edge of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image(encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=100))
    assert decoded.shape == (30, 10, 3)
    assert decoded[:5].mean() > 200 and decoded[-5:].mean() < 50  # the band is now on top


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    data = encoded(Image.new("RGB", (300, 200)))
    assert decode_image(data, max_pixels=60000).shape == (200, 300, 3)
    with pytest.raises(DecodeError, match="too large: 300x200"):
        decode_image(data, max_pixels=59999)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"this is a text file", "not a decodable image"),
        (b"<html><body>503 Service Unavailable</body></html>", "not a decodable image"),
    ],
)
def test_non_images_raise_decode_errors(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_truncated_image_raises_decode_error():
    data = encoded(Image.fromarray(np.full((64, 64, 3), 7, dtype=np.uint8)))
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) // 2])


def test_decoding_turns_each_failure_into_its_own_error_row(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encoded(Image.new("RGB", (8, 6), "red")))
    (tmp_path / "text.png").write_text("hello")
    uris = [str(good), str(tmp_path / "text.png"), str(tmp_path / "missing.png"), str(good)]
    batch = {"image_id": np.array(["g", "t", "m", "g2"], dtype=object), "uri": np.array(uris, dtype=object)}
    (out,) = decode_images(batch)
    assert list(out["status"]) == ["ok", "error", "error", "ok"]
    assert out["error"][0] is None
    assert "not a decodable image" in out["error"][1]
    assert "read failed: FileNotFoundError" in out["error"][2]
    assert list(out["height"]) == [6, 0, 0, 6] and list(out["width"]) == [8, 0, 0, 8]
    assert out["image"][0].shape == (6, 8, 3) and out["image"][1].shape == (0, 0, 3)


def test_a_batch_may_mix_plain_paths_uris_and_unknown_protocols(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(encoded(Image.new("RGB", (4, 3), "blue")))
    uris = [str(tmp_path / "a.png"), f"file://{tmp_path / 'b.png'}", "nope://bucket/c.png", f"file://{tmp_path / 'gone.png'}"]
    batch = {"image_id": np.array(["a", "b", "c", "gone"], dtype=object), "uri": np.array(uris, dtype=object)}
    out = decode_batch(batch)
    assert list(out["status"]) == ["ok", "ok", "error", "error"]
    assert "nope" in out["error"][2] and "FileNotFoundError" in out["error"][3]
    assert out["image"][1].shape == (3, 4, 3)


def test_file_names_are_read_as_written_never_as_globs(tmp_path):
    (tmp_path / "a[1].png").write_bytes(encoded(Image.new("RGB", (2, 2), "red")))
    (tmp_path / "a1.png").write_bytes(encoded(Image.new("RGB", (3, 3), "blue")))  # what "a[1]" matches as a glob
    (tmp_path / "b*.png").write_bytes(encoded(Image.new("RGB", (4, 4), "green")))
    (tmp_path / "bx.png").write_bytes(encoded(Image.new("RGB", (5, 5), "white")))
    names = ["a[1].png", "b*.png", "c?.png"]
    batch = {"image_id": np.array(names, dtype=object), "uri": np.array([str(tmp_path / n) for n in names], dtype=object)}
    out = decode_batch(batch)
    assert list(out["status"]) == ["ok", "ok", "error"]
    assert [image.shape[0] for image in out["image"][:2]] == [2, 4]
    assert "FileNotFoundError" in out["error"][2]


def test_two_uris_of_one_file_give_a_row_each(tmp_path):
    (tmp_path / "b.png").write_bytes(encoded(Image.new("RGB", (4, 3), "blue")))
    uris = [str(tmp_path / "b.png"), f"file://{tmp_path / 'b.png'}"]
    out = decode_batch({"image_id": np.array(["plain", "uri"], dtype=object), "uri": np.array(uris, dtype=object)})
    assert list(out["status"]) == ["ok", "ok"] and [image.shape for image in out["image"]] == [(3, 4, 3)] * 2


def test_decoded_rows_are_yielded_in_bounded_batches_in_input_order(tmp_path):
    for index in range(5):
        (tmp_path / f"{index}.png").write_bytes(encoded(Image.new("RGB", (10, 10), (index, 0, 0))))
    uris = np.array([str(tmp_path / f"{i}.png") for i in range(5)], dtype=object)
    batch = {"image_id": np.arange(5).astype(str).astype(object), "uri": uris}
    # 300 bytes per decoded image: a 600-byte budget yields batches of two.
    batches = list(decode_images(batch, rows_per_read=3, max_batch_bytes=600))
    assert [len(b["image_id"]) for b in batches] == [2, 2, 1]
    assert [img[0, 0, 0] for b in batches for img in b["image"]] == [0, 1, 2, 3, 4]
    assert [i for b in batches for i in b["image_id"]] == ["0", "1", "2", "3", "4"]


def test_decode_batch_hands_back_one_batch_in_input_order_with_error_rows(tmp_path):
    for index in range(3):
        (tmp_path / f"{index}.png").write_bytes(encoded(Image.new("RGB", (10, 10), (index, 0, 0))))
    uris = np.array([str(tmp_path / f"{i}.png") for i in range(3)] + [str(tmp_path / "gone.png")], dtype=object)
    batch = {"image_id": np.array(["0", "1", "2", "gone"], dtype=object), "uri": uris}
    # A 300-byte budget makes decode_images yield one row at a time: decode_batch joins them.
    out = decode_batch(batch, max_batch_bytes=300)
    assert list(out["image_id"]) == ["0", "1", "2", "gone"]
    assert [image[0, 0, 0] for image in out["image"][:3]] == [0, 1, 2]
    assert list(out["status"]) == ["ok", "ok", "ok", "error"]
    empty = decode_batch({"image_id": np.array([], dtype=object), "uri": np.array([], dtype=object)})
    assert len(empty["image"]) == 0 and len(empty["status"]) == 0


def test_sixteen_bit_greys_are_scaled_not_clipped():
    levels = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    decoded = decode_image(encoded(Image.fromarray(levels)))
    assert decoded.shape == (2, 3, 3)
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128], [255, 4, 233]])
    assert (decoded[..., 0] == decoded[..., 2]).all()


@pytest.mark.reliability
def test_float_greys_in_zero_to_one_are_scaled_to_the_full_range():
    pixels = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    image = decode_image(encoded(Image.fromarray(pixels, mode="F"), "TIFF"))
    assert image.shape == (1, 4, 3) and image[0, :, 0].tolist() == [0, 128, 255, 0]
    wide = decode_image(encoded(Image.fromarray(np.array([[-5.0, 100.0, 300.0]], dtype=np.float32), mode="F"), "TIFF"))
    assert wide[0, :, 0].tolist() == [0, 100, 255], "other ranges are read as 0–255"


def test_arrays_are_made_uint8_rgb_as_decoded_files_are():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    assert (as_rgb(rgb) == rgb).all()
    assert (as_rgb(rgb.astype(np.float32) / 255) == rgb).all(), "floats in 0–1 scaled"
    assert (as_rgb(rgb.astype(np.uint16) * 257) == rgb).all(), "16-bit scaled"
    assert (as_rgb(np.concatenate([rgb, np.zeros((2, 3, 1), np.uint8)], axis=2)) == rgb).all(), "alpha dropped"
    assert (as_rgb(rgb[:, :, 0]) == np.repeat(rgb[:, :, :1], 3, axis=2)).all(), "grey repeated"
    assert (as_rgb(rgb[:, :, :1]) == np.repeat(rgb[:, :, :1], 3, axis=2)).all()
    assert as_rgb(np.ones((2, 2), bool)).max() == 255
    for bad, reason in ((None, "no image: None"), (np.zeros((0, 4, 3), np.uint8), "shape (0, 4, 3)"), (np.zeros((2, 2, 2)), "shape (2, 2, 2)"), (np.array([["a"]]), "array of <U1")):
        with pytest.raises(DecodeError, match=re.escape(reason)):
            as_rgb(bad)


def test_a_one_pixel_image_decodes():
    assert decode_image(encoded(Image.new("RGB", (1, 1), (9, 8, 7)))).tolist() == [[[9, 8, 7]]]


def test_other_columns_travel_on_with_their_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(Image.new("RGB", (4, 4))))
    batch = {
        "image_id": np.array(["a", "b"], dtype=object),
        "uri": np.array([str(tmp_path / "a.png"), str(tmp_path / "b.png")], dtype=object),
        "prompt_category_ids": np.array([[1, 2], [3]], dtype=object),
    }
    (out,) = decode_images(batch)
    assert list(out["prompt_category_ids"]) == [[1, 2], [3]]


def test_an_image_that_killed_its_decode_task_too_often_is_an_error_row_in_the_same_batches(tmp_path):
    for index in range(5):
        (tmp_path / f"{index}.png").write_bytes(encoded(Image.new("RGB", (10, 10), (index, 0, 0))))
    uris = np.array([str(tmp_path / f"{i}.png") for i in range(5)], dtype=object)
    batch = {"image_id": np.arange(5).astype(str).astype(object), "uri": uris}
    record = str(tmp_path / "task.json")
    # Earlier attempts of the task died holding images 0–2, then holding image 1 alone.
    for in_hand in [["0", "1", "2"]] + [["1"]] * MAX_DEATHS_ALONE:
        InFlightRecord.load(record).hold(in_hand)
    batches = list(decode_images(batch, rows_per_read=3, max_batch_bytes=600, in_flight=InFlightRecord.load(record)))
    assert [len(b["image_id"]) for b in batches] == [2, 2, 1], "batches as an attempt that decoded it would yield"
    statuses = [s for b in batches for s in b["status"]]
    errors = [e for b in batches for e in b["error"]]
    assert statuses == ["ok", "error", "ok", "ok", "ok"]
    assert errors[1].startswith(f"the worker process died {MAX_DEATHS_ALONE} times while working on this image alone")
    assert not InFlightRecord.load(record).deaths, "every image done: nothing remembered"


def test_a_given_up_image_over_the_pixel_limit_counts_as_the_error_row_it_decodes_to(tmp_path):
    for index in range(5):
        size = (40, 40) if index == 1 else (10, 10)  # image 1: over the limit below, an error row
        (tmp_path / f"{index}.png").write_bytes(encoded(Image.new("RGB", size, (index, 0, 0))))
    batch = {
        "image_id": np.arange(5).astype(str).astype(object),
        "uri": np.array([str(tmp_path / f"{i}.png") for i in range(5)], dtype=object),
    }
    plain = list(decode_images(batch, max_pixels=1000, rows_per_read=3, max_batch_bytes=600))
    record = str(tmp_path / "task.json")
    for _ in range(MAX_DEATHS_ALONE):
        InFlightRecord.load(record).hold(["1"])
    given_up = list(decode_images(batch, max_pixels=1000, rows_per_read=3, max_batch_bytes=600, in_flight=InFlightRecord.load(record)))
    assert [len(b["image_id"]) for b in given_up] == [len(b["image_id"]) for b in plain] == [3, 2]
