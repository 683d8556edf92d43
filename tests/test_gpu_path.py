"""The GPU path's helpers, checked on the CPU: masks packed where the model left them give the
bytes the encode stage reads, device-side thresholding equals a CPU reference, and the
`amp_dtype` option reaches torch.autocast."""

import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayseg.models.device import (
    autocast,
    check_amp_dtype,
    host_batch,
    host_tensor,
    resolve_amp_dtype,
    to_device,
)
from rayseg.models.maskformer import build_maskformer
from rayseg.models.maskrcnn import build_maskrcnn
from rayseg.models.registry import check_options
from rayseg.models.sam import build_sam
from rayseg.models.unet import UNet, UNetConfig, UNetSegmenter, build_unet
from rayseg.pipeline.device_masks import (
    full_size_masks,
    masks_to_wire,
    pack_masks_on_device,
)
from rayseg.pipeline.inference import (
    EncodedMasks,
    ImageSegmenter,
    PackedMasks,
    fit_for_model,
)
from rayseg.pipeline.masks import pack_masks, unpack_masks
from rayseg.pipeline.model_spec import ModelSpec
from rayseg.pipeline.schema import STATUS_OK

# --- bit-packing where the masks are ----------------------------------------------------------


@pytest.mark.parametrize("count,height,width", [(1, 1, 1), (3, 7, 13), (2, 64, 48), (5, 33, 1), (4, 3, 5)])
def test_masks_packed_by_torch_are_the_bytes_numpy_packs_and_unpack_to_the_masks(count, height, width):
    masks = torch.from_numpy(np.random.default_rng(count * height).random((count, height, width)) > 0.5)
    packed = pack_masks_on_device(masks)
    assert packed.dtype == torch.uint8 and packed.device == masks.device
    assert packed.numpy().tobytes() == pack_masks(masks.numpy())
    unpacked = unpack_masks(packed.numpy().tobytes(), count, height, width)
    np.testing.assert_array_equal(unpacked.transpose(2, 0, 1), masks.numpy())


def test_no_masks_cross_as_no_bytes():
    assert masks_to_wire(torch.zeros((0, 5, 7), dtype=torch.bool)) == b""


@pytest.mark.parametrize("small,large", [((3, 5), (7, 11)), ((8, 8), (8, 8)), ((10, 6), (31, 17))])
def test_masks_scaled_to_full_size_on_the_device_take_the_nearest_model_pixel(small, large):
    masks = torch.from_numpy(np.random.default_rng(0).random((2, *small)) > 0.5)
    scaled = full_size_masks(masks, large)
    assert scaled.shape == (2, *large)
    for y in range(large[0]):
        for x in range(large[1]):
            source = (y * small[0] // large[0], x * small[1] // large[1])
            assert torch.equal(scaled[:, y, x], masks[:, source[0], source[1]])


# --- device-side thresholding equals the CPU ---------------------------------------------------


@pytest.fixture(scope="module")
def unet_weights(varied_unet):
    """A small U-Net whose argmax varies over the image (so several classes are present)."""
    return varied_unet


def images(count: int, height: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(height * width)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def test_unet_masks_thresholded_on_the_device_equal_a_numpy_argmax_of_its_logits(unet_weights):
    model = build_unet(str(unet_weights))
    batch = images(3, 20, 28)
    raw = model.forward(model.preprocess(batch))
    results = model.postprocess(raw, [image.shape[:2] for image in batch])
    for image, result in zip(batch, results):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            logits = model.network((x - model._mean) / model._std)[0].numpy()
        labels = logits.argmax(0)
        probabilities = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
        present = np.unique(labels)
        assert [s.category_id for s in result] == [model.categories[c].id for c in present]
        np.testing.assert_array_equal(result.masks.numpy(), labels[None] == present[:, None, None])
        for segment, channel in zip(result, present):
            assert segment.score == pytest.approx(probabilities[channel][labels == channel].mean(), rel=1e-4)


def host_path_bytes(model, batch: list[np.ndarray]) -> list[bytes]:
    """What the pipeline sent before masks stayed on the device: host bool masks, numpy-packed."""
    sizes = [image.shape[:2] for image in batch]
    with torch.inference_mode():
        results = model.postprocess(model.forward(model.preprocess(batch)), sizes)
    return [pack_masks(np.stack([s.mask for s in segments])) if segments else b"" for segments in results]


def rows(batch: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded rows as Ray Data hands them to the inference actor."""
    count = len(batch)
    column = np.empty(count, dtype=object)
    column[:] = batch
    return {
        "image_id": np.array([f"{i}.png" for i in range(count)], dtype=object),
        "uri": np.array([f"/{i}.png" for i in range(count)], dtype=object),
        "width": np.array([image.shape[1] for image in batch], dtype=np.int32),
        "height": np.array([image.shape[0] for image in batch], dtype=np.int32),
        "status": np.array([STATUS_OK] * count, dtype=object),
        "error": np.array([None] * count, dtype=object),
        "image": column,
    }


@pytest.mark.parametrize(
    "name,options",
    [
        ("unet", {}),
        ("maskrcnn", {"min_size": 48, "max_size": 64, "score_threshold": 0.0}),
        ("sam", {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}),
    ],
)
def test_pipeline_packs_device_masks_into_the_bytes_of_the_host_masks(name, options, unet_weights):
    options = dict(options)
    score_threshold = options.pop("score_threshold", None)
    weights = str(unet_weights) if name == "unet" else "random"
    actor = ImageSegmenter(ModelSpec(name, weights, score_threshold=score_threshold, options=options), PackedMasks(), torch_threads=1)
    assert all(isinstance(s.masks, torch.Tensor) for s in actor.model.postprocess(actor.model.forward(actor.model.preprocess(images(1, 40, 56))), [(40, 56)]))
    batch = images(2, 40, 56)
    table = pa.concat_tables(actor(rows(batch)))
    expected = host_path_bytes(actor.model, batch)
    assert table["masks"].to_pylist() == expected
    assert any(expected), "the model found no masks: the comparison would be empty"


def test_downscaled_images_get_device_masks_scaled_back_like_host_masks(unet_weights):
    actor = ImageSegmenter(ModelSpec("unet", str(unet_weights)), PackedMasks(), torch_threads=1, model_max_pixels=20 * 28)
    batch = images(2, 40, 56)  # shown to the model at 20×28
    table = pa.concat_tables(actor(rows(batch)))
    shown = [fit_for_model(image, 20 * 28) for image in batch]
    assert all(image.shape[:2] == (20, 28) for image in shown)
    with torch.inference_mode():
        results = actor.model.postprocess(actor.model.forward(actor.model.preprocess(shown)), [(20, 28)] * 2)
    for packed, segments in zip(table["masks"].to_pylist(), results):
        # nearest neighbour ×2: pixel (y, x) takes model pixel (y // 2, x // 2)
        full = np.stack([s.mask.repeat(2, 0).repeat(2, 1) for s in segments])
        assert packed == pack_masks(full)


@pytest.mark.parametrize("encode", [False, True])
def test_a_downscaled_images_detector_boxes_come_back_in_its_full_size_pixels(encode):
    options = {"min_size": 48, "max_size": 64}
    spec = ModelSpec("maskrcnn", score_threshold=0.0, options=options)
    actor = ImageSegmenter(spec, EncodedMasks() if encode else PackedMasks(), torch_threads=1)
    small = ImageSegmenter(spec, PackedMasks(), torch_threads=1)
    actor.model_max_pixels = 20 * 28
    batch = images(1, 40, 56)  # shown to the model at 20×28: boxes ×2
    (row,) = pa.concat_tables(actor(rows(batch))).to_pylist()
    (alone,) = pa.concat_tables(small(rows([fit_for_model(batch[0], 20 * 28)]))).to_pylist()
    assert len(alone["boxes"]) > 0, "the random detector found nothing: the comparison would be empty"
    shown_boxes = np.asarray(alone["boxes"], dtype=np.float32)
    if encode:
        got = np.asarray([s["bbox"] for s in row["segments"]], dtype=np.float32)
        got[:, 2:] += got[:, :2]
    else:
        got = np.asarray(row["boxes"], dtype=np.float32)
    np.testing.assert_allclose(got, shown_boxes * 2, atol=1e-4)


def test_a_very_thin_image_is_shown_small_enough_once_padded_and_its_masks_come_back_full_size(unet_weights):
    # 1 × 20000 pixels fit a budget of 40000, but padded to 32 rows they would be 640000.
    thin = images(1, 1, 20000)
    shown = fit_for_model(thin[0], 40000)
    # Padded to 32 rows, 2500 columns are twice the budget: it shrinks in 5% steps to below that.
    assert shown.shape[0] == 1 and 0.9 * 2500 < shown.shape[1] <= 2500
    ordinary = images(1, 150, 250)[0]
    assert fit_for_model(ordinary, 40000) is ordinary  # padded 160 × 256 stays within twice the budget
    actor = ImageSegmenter(ModelSpec("unet", str(unet_weights)), PackedMasks(), torch_threads=1, model_max_pixels=40000)
    table = pa.concat_tables(actor(rows(thin)))
    (row,) = table.to_pylist()
    assert row["status"] == STATUS_OK
    masks = unpack_masks(row["masks"], len(row["category_ids"]), 1, 20000)
    assert masks.shape == (1, 20000, len(row["category_ids"])) and masks.any(axis=2).all()  # (H, W, N)


# --- autocast plumbing -------------------------------------------------------------------------


def test_amp_dtype_names_and_what_auto_means_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp_dtype("auto", cpu) is None and resolve_amp_dtype("auto", cuda) is torch.float16
    assert resolve_amp_dtype("bf16", cpu) is torch.bfloat16 and resolve_amp_dtype("fp16", cuda) is torch.float16
    assert resolve_amp_dtype("none", cuda) is None
    with pytest.raises(ValueError, match="amp_dtype must be one of auto, fp16, bf16, none"):
        check_amp_dtype("fp32")


def test_autocast_on_cuda_carries_the_dtype():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available … Disabling autocast" on this machine
        context = autocast(torch.device("cuda"), torch.bfloat16)
    assert isinstance(context, torch.autocast) and context.device == "cuda" and context.fast_dtype is torch.bfloat16


def test_a_bad_amp_dtype_is_refused_before_any_work():
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        check_options("maskrcnn", {"amp_dtype": "float16"})
    check_options("maskrcnn", {"amp_dtype": "bf16"})
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        build_unet("random", amp_dtype="half")


def autocast_seen_by(module: torch.nn.Module) -> list[tuple[bool, torch.dtype]]:
    """Records (autocast enabled on the CPU, its dtype) each time `module` runs."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    return seen


@pytest.mark.parametrize("amp_dtype,expected", [("bf16", (True, torch.bfloat16)), ("auto", (False, None)), ("none", (False, None))])
def test_the_chosen_dtype_reaches_torch_autocast_in_every_models_forward(amp_dtype, expected, unet_weights):
    unet = build_unet(str(unet_weights), amp_dtype=amp_dtype)
    maskrcnn = build_maskrcnn("random", min_size=32, max_size=32, amp_dtype=amp_dtype)
    sam = build_sam("random", points_per_side=2, amp_dtype=amp_dtype)
    maskformer = build_maskformer("random", amp_dtype=amp_dtype)
    watched = {
        "unet": (unet, autocast_seen_by(unet.network)),
        "maskrcnn": (maskrcnn, autocast_seen_by(maskrcnn.network.backbone)),
        "sam": (sam, autocast_seen_by(sam.network.vision_encoder)),
        "maskformer": (maskformer, autocast_seen_by(maskformer.network)),
    }
    sam_decoder = autocast_seen_by(sam.network.mask_decoder)
    image = images(1, 32, 32)
    for name, (model, seen) in watched.items():
        assert model.amp_dtype is expected[1], name
        model.forward(model.preprocess(image))
        assert seen and all(enabled == expected[0] for enabled, _ in seen), name
        if expected[0]:
            assert all(dtype is expected[1] for _, dtype in seen), name
    assert sam_decoder and not any(enabled for enabled, _ in sam_decoder), "SAM's mask decoder stays in float32"


# --- host buffers ------------------------------------------------------------------------------


def test_host_batches_are_one_stacked_copy_and_arrive_channels_last():
    arrays = images(3, 5, 7)
    batch = host_batch(arrays, pin=False)
    np.testing.assert_array_equal(batch.numpy(), np.stack(arrays))
    nchw = batch.permute(0, 3, 1, 2)
    assert to_device(nchw, torch.device("cpu")) is nchw
    assert nchw.is_contiguous(memory_format=torch.channels_last)
    model = UNetSegmenter(UNet(UNetConfig(width=4, depth=2)))
    [(_, pixels)] = model.preprocess(arrays)
    assert pixels.dtype == torch.uint8 and pixels.is_contiguous(memory_format=torch.channels_last)


def test_read_only_arrays_are_copied_without_a_warning():
    array = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = host_tensor(array, pin=False)
    np.testing.assert_array_equal(tensor.numpy(), array)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_bound_for_cuda_are_pinned_and_copied_without_blocking():
    batch = host_batch(images(2, 4, 4), pin=True)
    assert batch.is_pinned()
    on_device = to_device(batch.permute(0, 3, 1, 2), torch.device("cuda"))
    assert on_device.is_cuda and on_device.is_contiguous(memory_format=torch.channels_last)


def test_an_actor_given_a_gpu_that_torch_cannot_use_runs_on_the_cpu_and_says_so(monkeypatch, caplog):
    import logging

    import ray

    from rayseg.pipeline import inference

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    logger = logging.getLogger("rayseg.pipeline")
    logger.addHandler(caplog.handler)  # the CLI's logging setup may stop propagation to the root
    try:
        assert inference.select_device() == torch.device("cpu")
    finally:
        logger.removeHandler(caplog.handler)
    assert "this actor holds GPU [0] but torch" in caplog.text and "sees no CUDA device: running on the CPU" in caplog.text
