"""The U-Net: its size arithmetic, its architecture, the FCN property and its output contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from rayseg.models.categories import SHAPES, Category
from rayseg.models.segments import Segment
from rayseg.models.unet import (
    UNet,
    UNetConfig,
    UNetSegmenter,
    conv_output_size,
    conv_transpose_output_size,
    padded_size,
)
from rayseg.models.weights import WeightsError


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from threads, and idle threads spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(width: int = 4, depth: int = 2, categories: list[Category] | None = None, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(categories=list(categories or SHAPES), width=width, depth=depth)).eval()


def varied_unet(categories: list[Category] | None = None, seed: int = 3) -> UNet:
    """A tiny random U-Net whose head is scaled up so its logits are spread enough to predict
    several classes per image: mask comparisons then test something."""
    network = tiny_unet(width=4, depth=2, categories=categories, seed=seed)
    with torch.no_grad():
        network.head.weight.mul_(30)
    return network


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def segment(model: UNetSegmenter, images: list[np.ndarray]) -> list[list[Segment]]:
    """Each image's segments as rows (masks on the host)."""
    return [list(segments) for segments in model.postprocess(model.forward(model.preprocess(images)), [image.shape[:2] for image in images])]


# --- size arithmetic -------------------------------------------------------------------------

SIZES = [1, 2, 3, 5, 7, 8, 13, 16]  # odd, even, 1
# Every size on both axes, each paired with a different size on the other one.
SIZE_PAIRS = list(zip(SIZES, reversed(SIZES))) + [(size, size) for size in (1, 7, 16)]


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
def test_conv_output_size_equals_what_torch_conv2d_produces(kernel, stride, padding, dilation):
    conv = nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    checked = 0
    for height, width in SIZE_PAIRS:
        expected = (
            conv_output_size(height, kernel, stride, padding, dilation),
            conv_output_size(width, kernel, stride, padding, dilation),
        )
        with torch.no_grad():
            if min(expected) < 1:  # the kernel does not fit: torch refuses exactly these
                with pytest.raises(RuntimeError):
                    conv(torch.zeros(1, 1, height, width))
                continue
            out = conv(torch.zeros(1, 1, height, width))
        assert tuple(out.shape[-2:]) == expected, f"input {height}x{width}"
        checked += 1
    assert checked


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride,output_padding", [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
def test_conv_transpose_output_size_equals_what_torch_conv_transpose2d_produces(
    kernel, stride, output_padding, padding, dilation
):
    conv = nn.ConvTranspose2d(
        1, 1, kernel, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, bias=False
    )
    checked = 0
    for height, width in SIZE_PAIRS:
        expected = (
            conv_transpose_output_size(height, kernel, stride, padding, output_padding, dilation),
            conv_transpose_output_size(width, kernel, stride, padding, output_padding, dilation),
        )
        with torch.no_grad():
            if min(expected) < 1:  # the output would be empty: torch refuses exactly these
                with pytest.raises(RuntimeError):
                    conv(torch.zeros(1, 1, height, width))
                continue
            out = conv(torch.zeros(1, 1, height, width))
        assert tuple(out.shape[-2:]) == expected, f"input {height}x{width}"
        checked += 1
    assert checked


def test_size_formulas_match_the_documented_closed_forms():
    # Spot values worked by hand, independent of torch.
    assert conv_output_size(7, 3) == 5
    assert conv_output_size(7, 3, stride=2, padding=1) == 4
    assert conv_output_size(1, 3, padding=1) == 1
    assert conv_output_size(10, 3, dilation=2) == 6
    assert conv_transpose_output_size(4, 2, stride=2) == 8
    assert conv_transpose_output_size(3, 3, stride=2, padding=1, output_padding=1) == 6
    assert conv_transpose_output_size(1, 1) == 1


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65, 100])
def test_padded_size_is_the_smallest_multiple_of_two_to_the_depth_not_below_size(size, depth):
    multiple = 2**depth
    padded = padded_size(size, depth)
    assert padded % multiple == 0
    assert padded >= size
    assert padded - multiple < size  # the next multiple down would be too small


def test_a_size_already_a_multiple_is_not_padded():
    assert padded_size(32, 4) == 32
    assert padded_size(16, 4) == 16
    assert padded_size(17, 4) == 32


# --- shapes and architecture ------------------------------------------------------------------


@pytest.mark.parametrize("width,depth", [(4, 2), (4, 3), (2, 1), (3, 2)])
@pytest.mark.parametrize("height,image_width", [(1, 1), (7, 13), (31, 64), (65, 33), (2, 1)])
def test_output_is_batch_by_classes_at_the_input_size_for_any_size(width, depth, height, image_width):
    categories = [Category(i + 1, f"c{i}") for i in range(5)]
    network = tiny_unet(width=width, depth=depth, categories=categories)
    with torch.no_grad():
        out = network(torch.randn(2, 3, height, image_width))
    assert out.shape == (2, 5, height, image_width)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if type(m) is nn.Conv2d]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_channels_double_at_every_level_of_the_contracting_path(depth):
    width = 4
    network = tiny_unet(width=width, depth=depth)
    assert [conv.out_channels for conv in _convs(network.stem)] == [width, width]
    assert _convs(network.stem)[0].in_channels == 3
    assert len(network.down) == depth
    for level, block in enumerate(network.down, start=1):
        convs = _convs(block)
        assert len(convs) == 2
        assert all(conv.kernel_size == (3, 3) and conv.padding == (1, 1) for conv in convs)
        assert convs[0].in_channels == width * 2 ** (level - 1)
        assert [conv.out_channels for conv in convs] == [width * 2**level] * 2


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_expanding_path_upsamples_with_two_by_two_stride_two_transposed_convolutions(depth):
    width = 4
    network = tiny_unet(width=width, depth=depth)
    transposed = [m for m in network.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(transposed) == depth
    # From the bottleneck up: each halves the channels and doubles the resolution.
    expected_in = [width * 2**level for level in range(depth, 0, -1)]
    assert [t.in_channels for t in transposed] == expected_in
    assert [t.out_channels for t in transposed] == [c // 2 for c in expected_in]
    for t in transposed:
        assert t.kernel_size == (2, 2) and t.stride == (2, 2)
    assert [block.up for block in network.up] == transposed


def test_up_blocks_concatenate_the_skip_so_their_convs_see_twice_their_output_channels():
    network = tiny_unet(width=4, depth=3)
    for block in network.up:
        first, second = _convs(block.conv)
        assert first.in_channels == 2 * first.out_channels
        assert first.out_channels == block.up.out_channels == second.out_channels


def test_up_blocks_concatenate_the_same_level_skip_with_the_upsampled_features():
    network = tiny_unet(width=4, depth=3)
    encoder = [network.stem, *network.down]  # level 0 .. depth
    skips, upsampled, conv_inputs = {}, {}, {}
    hooks = [
        m.register_forward_hook(lambda m, a, out, level=level: skips.__setitem__(level, out))
        for level, m in enumerate(encoder)
    ]
    for block in network.up:
        hooks.append(block.up.register_forward_hook(lambda m, a, out, b=block: upsampled.__setitem__(b, out)))
        hooks.append(block.conv.register_forward_pre_hook(lambda m, args, b=block: conv_inputs.__setitem__(b, args[0])))
    try:
        with torch.no_grad():
            network(torch.randn(1, 3, 13, 21))  # padded to 16 × 24
    finally:
        for hook in hooks:
            hook.remove()

    for level, block in zip(reversed(range(3)), network.up):  # up[0] is the deepest
        channels = block.up.out_channels
        skip, up, joined = skips[level], upsampled[block], conv_inputs[block]
        assert skip.shape == up.shape == (1, channels, 16 // 2**level, 24 // 2**level)
        assert joined.shape == (1, 2 * channels, *skip.shape[-2:])
        halves = (joined[:, :channels], joined[:, channels:])
        assert (torch.equal(halves[0], skip) and torch.equal(halves[1], up)) or (
            torch.equal(halves[0], up) and torch.equal(halves[1], skip)
        )


def test_head_is_a_one_by_one_convolution_with_one_channel_per_category():
    categories = [Category(7, "a"), Category(9, "b", False)]
    network = tiny_unet(width=4, depth=2, categories=categories)
    assert isinstance(network.head, nn.Conv2d)
    assert network.head.kernel_size == (1, 1)
    assert network.head.in_channels == 4
    assert network.head.out_channels == len(categories)


def test_the_network_does_not_mix_images_of_one_batch():
    network = tiny_unet(width=4, depth=2)
    batch = torch.randn(3, 3, 9, 14)
    with torch.no_grad():
        together = network(batch)
        alone = torch.cat([network(batch[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# --- the segmenter ---------------------------------------------------------------------------


def test_a_prediction_does_not_depend_on_the_other_images_in_its_batch():
    segmenter = UNetSegmenter(varied_unet())
    a, b = random_image(13, 22, seed=1), random_image(30, 17, seed=2)
    together = segment(segmenter, [a, b])
    alone = segment(segmenter, [a])
    b_alone = segment(segmenter, [b])
    assert len(alone[0]) >= 2 and len(b_alone[0]) >= 2
    for batched, single in [(together[0], alone[0]), (together[1], b_alone[0])]:
        assert [s.category_id for s in batched] == [s.category_id for s in single]
        for x, y in zip(batched, single):
            np.testing.assert_array_equal(x.mask, y.mask)
            assert x.score == pytest.approx(y.score, abs=1e-5)


def test_a_prediction_does_not_depend_on_same_size_neighbours_either():
    segmenter = UNetSegmenter(varied_unet())
    a, b = random_image(13, 22, seed=1), random_image(6, 6, seed=2)
    white, black = np.full_like(a, 255), np.zeros_like(a)  # neighbours as unlike `a` as possible
    together = segment(segmenter, [white, a, b, black])
    (alone,) = segment(segmenter, [a])
    assert len(alone) >= 2
    assert [s.category_id for s in together[1]] == [s.category_id for s in alone]
    for x, y in zip(together[1], alone):
        np.testing.assert_array_equal(x.mask, y.mask)
        assert x.score == pytest.approx(y.score, abs=1e-5)


def test_images_are_returned_in_input_order_whatever_their_sizes():
    segmenter = UNetSegmenter(tiny_unet(width=4, depth=2, seed=2))
    images = [random_image(*size, seed=i) for i, size in enumerate([(9, 9), (5, 12), (9, 9), (1, 1), (5, 12)])]
    results = segment(segmenter, images)
    assert len(results) == len(images)
    for image, segments in zip(images, results):
        assert segments, "random weights still label every pixel with some class"
        assert all(s.mask.shape == image.shape[:2] for s in segments)


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (33, 20)])
def test_semantic_segments_are_disjoint_cover_the_image_and_name_each_class_once(size):
    categories = [Category(3, "a"), Category(5, "b"), Category(11, "c", False)]
    segmenter = UNetSegmenter(varied_unet(categories))
    image = random_image(*size, seed=4)
    (segments,) = segment(segmenter, [image])
    assert len(segments) >= (1 if size == (1, 1) else 2)
    ids = [s.category_id for s in segments]
    assert len(ids) == len(set(ids))
    assert set(ids) <= {c.id for c in categories}
    coverage = np.zeros(size, dtype=int)
    for s in segments:
        assert isinstance(s, Segment)
        assert s.mask.dtype == np.bool_ and s.mask.shape == size
        assert s.mask.any()
        assert 0.0 <= s.score <= 1.0
        assert s.segment_id is None and s.iscrowd is False
        coverage += s.mask
    np.testing.assert_array_equal(coverage, 1)


def test_segments_follow_the_argmax_and_score_the_mean_winning_probability():
    categories = [Category(1, "a"), Category(2, "b"), Category(3, "c")]
    network = varied_unet(categories)
    segmenter = UNetSegmenter(network)
    image = random_image(11, 6, seed=6)
    (segments,) = segment(segmenter, [image])
    assert len(segments) >= 2

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - mean) / std
    with torch.no_grad():
        probabilities = network(x).softmax(dim=1)[0].numpy()
    labels = probabilities.argmax(axis=0)
    by_id = {s.category_id: s for s in segments}
    assert set(by_id) == {categories[c].id for c in np.unique(labels)}
    for channel, category in enumerate(categories):
        if category.id not in by_id:
            continue
        expected_mask = labels == channel
        np.testing.assert_array_equal(by_id[category.id].mask, expected_mask)
        assert by_id[category.id].score == pytest.approx(probabilities[channel][expected_mask].mean(), abs=1e-5)


def test_a_class_that_wins_every_pixel_is_one_segment_covering_the_image():
    categories = [Category(1, "a"), Category(2, "b"), Category(3, "c")]
    network = tiny_unet(width=4, depth=2, categories=categories)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    (segments,) = segment(UNetSegmenter(network), [random_image(5, 9, seed=0)])
    assert len(segments) == 1
    assert segments[0].category_id == 2
    assert segments[0].mask.all()
    expected = float(torch.tensor([0.0, 2.0, 0.0]).softmax(0)[1])
    assert segments[0].score == pytest.approx(expected, abs=1e-6)


def test_score_threshold_drops_segments_scored_below_it():
    network = varied_unet()
    images = [random_image(16, 16, seed=8), random_image(9, 4, seed=9)]
    all_segments = segment(UNetSegmenter(network), images)
    scores = sorted(s.score for segments in all_segments for s in segments)
    assert scores

    above_all = segment(UNetSegmenter(network, score_threshold=scores[-1] + 1e-4), images)
    assert above_all == [[], []]

    middle = scores[len(scores) // 2]
    kept = segment(UNetSegmenter(network, score_threshold=middle), images)
    kept_scores = sorted(s.score for segments in kept for s in segments)
    assert kept_scores == [s for s in scores if s >= middle]


def test_segmenter_reports_its_name_task_and_categories():
    categories = [Category(4, "x"), Category(8, "y")]
    segmenter = UNetSegmenter(tiny_unet(categories=categories))
    assert segmenter.name == "unet"
    assert segmenter.task == "semantic"
    assert segmenter.categories == categories


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"width": 0}, {"width": -1}, {"depth": 0}, {"depth": -2}, {"in_channels": 0}, {"categories": []}],
)
def test_config_rejects_impossible_networks(kwargs):
    with pytest.raises(ValueError):
        UNetConfig(**kwargs)


def test_config_survives_a_json_round_trip():
    config = UNetConfig(
        categories=[Category(3, "road", False), Category(17, "car", True)], width=6, depth=3, in_channels=3
    )
    text = config.to_json()
    assert json.loads(text)["architecture"] == "unet"
    assert UNetConfig.from_json(text) == config


def test_default_config_is_the_shapes_dataset():
    config = UNetConfig()
    assert config.categories == SHAPES
    assert UNetConfig.from_json(config.to_json()) == config


def _config_dict() -> dict:
    return json.loads(UNetConfig(width=4, depth=2).to_json())


def test_config_with_unknown_keys_is_refused():
    data = _config_dict()
    data["dropout"] = 0.5
    with pytest.raises(WeightsError, match="dropout"):
        UNetConfig.from_json(json.dumps(data))


def test_config_of_another_architecture_is_refused():
    data = _config_dict()
    data["architecture"] = "deeplabv3"
    with pytest.raises(WeightsError, match="U-Net"):
        UNetConfig.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ['{"width": 4, "depth": 2}', "[1, 2]", "not json {"])
def test_malformed_config_is_a_weights_error(text):
    with pytest.raises(WeightsError):
        UNetConfig.from_json(text)
