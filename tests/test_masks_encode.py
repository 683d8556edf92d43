"""Masks cross processes bit-packed and come out as COCO RLE that pycocotools decodes back."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as mask_utils

from rayseg.models.segments import METADATA_FIELDS
from rayseg.pipeline import masks as masks_module
from rayseg.pipeline.device_masks import full_size_masks
from rayseg.pipeline.encode import (
    encode_batch,
    encode_masks,
    encode_packed_masks,
    fortran_masks,
    output_table,
    segment_structs,
)
from rayseg.pipeline.inference import EncodedMasks, ImageSegmenter, PackedMasks
from rayseg.pipeline.masks import pack_masks, unpack_masks
from rayseg.pipeline.model_spec import ModelSpec
from rayseg.pipeline.schema import INFERENCE_SCHEMA, OUTPUT_SCHEMA


@pytest.mark.parametrize("count,height,width", [(1, 1, 1), (3, 7, 13), (2, 64, 48), (5, 33, 1)])
def test_packed_masks_round_trip_exactly_and_unpack_fortran_ordered(count, height, width):
    masks = np.random.default_rng(count).random((count, height, width)) > 0.5
    packed = pack_masks(masks)
    assert len(packed) == -(-count * height * width // 8)
    unpacked = unpack_masks(packed, count, height, width)
    assert unpacked.shape == (height, width, count)
    assert unpacked.flags.f_contiguous
    np.testing.assert_array_equal(unpacked.transpose(2, 0, 1), masks)


def test_masks_unpack_from_any_multiple_of_8_and_from_no_other():
    masks = np.random.default_rng(3).random((20, 5, 7)) > 0.5  # 35 bits a mask: chunks of 8 end on bytes
    packed = pack_masks(masks)
    np.testing.assert_array_equal(unpack_masks(packed, 8, 5, 7, first=8).transpose(2, 0, 1), masks[8:16])
    np.testing.assert_array_equal(unpack_masks(packed, 4, 5, 7, first=16).transpose(2, 0, 1), masks[16:])
    with pytest.raises(ValueError, match="multiple of 8"):
        unpack_masks(packed, 1, 5, 7, first=3)


def test_packed_masks_encode_alike_a_chunk_at_a_time(monkeypatch):
    masks = np.random.default_rng(4).random((20, 5, 7)) > 0.5
    whole = encode_masks(unpack_masks(pack_masks(masks), 20, 5, 7))
    monkeypatch.setattr(masks_module, "MASK_CHUNK_BYTES", 1)  # chunks of 8 masks
    chunked = encode_packed_masks(pack_masks(masks), 20, 5, 7)
    assert chunked[0] == whole[0]
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_array_equal(chunked[2], whole[2])


@pytest.mark.parametrize("encode", [True, False])
def test_an_actor_brings_masks_to_full_size_a_chunk_at_a_time_alike(monkeypatch, encode):
    segmenter = ImageSegmenter(ModelSpec("unet"), EncodedMasks() if encode else PackedMasks(), torch_threads=1)
    masks = torch.from_numpy(np.random.default_rng(5).random((20, 5, 7)) > 0.5)  # as the model saw the image
    whole = segmenter._masks_out(masks, (11, 13))
    monkeypatch.setattr(masks_module, "MASK_CHUNK_BYTES", 1)  # chunks of 8 masks
    chunked = segmenter._masks_out(masks, (11, 13))
    if encode:
        assert chunked[0] == whole[0] and len(whole[0]) == 20
        np.testing.assert_array_equal(chunked[1], whole[1])
        np.testing.assert_array_equal(chunked[2], whole[2])
    else:
        assert chunked == whole == pack_masks(full_size_masks(masks, (11, 13)).numpy())


def test_encoded_masks_decode_to_the_masks_with_their_area_and_bbox():
    masks = np.zeros((2, 20, 30), dtype=bool)
    masks[0, 2:5, 3:10] = True  # 3 rows × 7 columns at x=3, y=2
    masks[1, 10:20, 0:1] = True
    counts, areas, bboxes = encode_masks(unpack_masks(pack_masks(masks), 2, 20, 30))
    assert all(isinstance(c, str) for c in counts)
    for index, rle_counts in enumerate(counts):
        decoded = mask_utils.decode({"size": [20, 30], "counts": rle_counts})
        np.testing.assert_array_equal(decoded.astype(bool), masks[index])
    assert areas.tolist() == [21, 10]
    np.testing.assert_array_equal(bboxes, [[3, 2, 7, 3], [0, 10, 1, 10]])


def test_encode_batch_produces_the_output_schema_with_empty_lists_for_error_rows():
    mask = np.zeros((1, 4, 5), dtype=bool)
    mask[0, 1:3, 1:4] = True
    rows = pa.table(
        {
            "image_id": ["a", "b"],
            "uri": ["/a.png", "/b.png"],
            "width": [5, 0],
            "height": [4, 0],
            "status": ["ok", "error"],
            "error": [None, "not a decodable image"],
            "model": ["unet", "unet"],
            "category_ids": [[2], []],
            "labels": [["square"], []],
            "scores": [[0.75], []],
            "segment_ids": [[None], []],
            "iscrowd": [[False], []],
            "annotation_ids": [[None], []],
            "boxes": [[None], []],
            "masks": [pack_masks(mask), b""],
        },
        schema=INFERENCE_SCHEMA,
    )
    out = encode_batch(rows)
    assert out.schema == OUTPUT_SCHEMA
    first, second = out.to_pylist()
    (segment,) = first["segments"]
    assert segment["category_id"] == 2 and segment["label"] == "square"
    assert segment["area"] == 6 and segment["bbox"] == [1.0, 1.0, 3.0, 2.0]
    assert segment["score"] == pytest.approx(0.75)
    decoded = mask_utils.decode({"size": [4, 5], "counts": segment["rle"]})
    np.testing.assert_array_equal(decoded.astype(bool), mask[0])
    assert second["segments"] == [] and second["status"] == "error"


@pytest.mark.parametrize("count,height,width", [(0, 4, 5), (1, 1, 1), (3, 7, 13)])
def test_fortran_masks_are_the_masks_as_uint8_in_pycocotools_layout(count, height, width):
    masks = np.random.default_rng(count).random((count, height, width)) > 0.5
    laid_out = fortran_masks(masks)
    assert laid_out.dtype == np.uint8 and laid_out.shape == (height, width, count)
    assert laid_out.flags.f_contiguous
    np.testing.assert_array_equal(laid_out.transpose(2, 0, 1), masks)


def test_masks_encoded_where_the_model_left_them_give_the_rows_of_masks_sent_packed():
    masks = np.random.default_rng(7).random((3, 9, 11)) > 0.6
    boxes = [None, (0.5, 1.25, 7.75, 8.5), None]
    columns = ([1, 2, 3], ["a", "b", None], [0.5, 0.25, 1.0], [None, None, None], [False, True, False], [None, 4, None], boxes)
    metadata = dict(zip(METADATA_FIELDS, columns))
    image = {"image_id": ["x"], "uri": ["/x.png"], "width": [11], "height": [9], "status": ["ok"], "error": [None], "model": ["m"]}
    direct = output_table(image, [segment_structs(metadata, encode_masks(fortran_masks(masks)))])
    packed = pa.table(
        {**image, **{name: [values] for name, values in metadata.items()}, "masks": [pack_masks(masks)]},
        schema=INFERENCE_SCHEMA,
    )
    assert direct.equals(encode_batch(packed))
    assert [s["area"] for s in direct.to_pylist()[0]["segments"]] == masks.sum(axis=(1, 2)).tolist()


def test_no_masks_encode_to_no_segments():
    counts, areas, bboxes = encode_masks(fortran_masks(np.zeros((0, 4, 5), dtype=bool)))
    assert counts == [] and areas.shape == (0,) and bboxes.shape == (0, 4)
    assert segment_structs({name: [] for name in METADATA_FIELDS}, (counts, areas, bboxes)) == []


def test_a_segment_with_its_own_box_keeps_it_and_one_without_gets_its_masks_box():
    masks = np.zeros((3, 6, 8), dtype=bool)
    masks[0, 1:3, 2:5] = True  # the mask's box: [2, 1, 3, 2]
    masks[1, 4:6, 0:2] = True
    # masks[2] is empty: a detection whose pasted mask kept no pixel is still a segment
    boxes = [None, (0.25, 3.5, 2.75, 5.125), (1.5, 1.5, 2.0, 2.0)]
    columns = ([1, 1, 1], ["a"] * 3, [0.9, 0.8, 0.7], [None] * 3, [False] * 3, [None] * 3, boxes)
    structs = segment_structs(dict(zip(METADATA_FIELDS, columns)), encode_masks(fortran_masks(masks)))
    assert [s["bbox"] for s in structs] == [[2.0, 1.0, 3.0, 2.0], [0.25, 3.5, 2.5, 1.625], [1.5, 1.5, 0.5, 0.5]]
    assert [s["area"] for s in structs] == [6, 4, 0]  # the area stays the mask's
    assert mask_utils.decode({"size": [6, 8], "counts": structs[2]["rle"]}).sum() == 0
