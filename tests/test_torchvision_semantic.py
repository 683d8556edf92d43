"""FCN and DeepLabV3 (torchvision) as pipeline models: checkpoints, categories, and equality
with torchvision run directly on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.segmentation import (
    DeepLabV3_ResNet50_Weights,
    FCN_ResNet50_Weights,
    deeplabv3_resnet50,
    fcn_resnet50,
)
from torchvision.transforms._presets import SemanticSegmentation
from typer.testing import CliRunner

from rayseg.models.categories import VOC, VOC_21_LABELS, Category
from rayseg.models.registry import REGISTRY
from rayseg.models.segments import Segment
from rayseg.models.torchvision_semantic import (
    BACKGROUND,
    TorchvisionSemanticSegmenter,
    build_deeplabv3,
    build_fcn,
    channel_categories,
)
from rayseg.models.weights import WeightsError

torch.set_num_threads(2)

# Listed out of id order: channel i is the i-th listed category.
CATEGORIES = [Category(30, "sky", False), Category(10, "road", False), Category(20, "car", True)]
ARCHITECTURES = {"fcn": (fcn_resnet50, build_fcn), "deeplabv3": (deeplabv3_resnet50, build_deeplabv3)}


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_network(architecture: str, num_classes: int, aux_loss: bool):
    """A random network whose head is scaled up, so that the predicted class varies across
    each image instead of one class winning everywhere."""
    torch.manual_seed(0)
    network = ARCHITECTURES[architecture][0](weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    with torch.no_grad():
        network.classifier[4].weight.mul_(50)
    return network.eval()


@pytest.fixture(scope="module")
def category_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("categories") / "categories.json"
    path.write_text(json.dumps({"categories": [c.to_dict() for c in CATEGORIES]}))
    return path


@pytest.fixture(scope="module", params=["fcn", "deeplabv3"])
def setup(request, tmp_path_factory, category_file):
    """(architecture, checkpoint path, torchvision's network, our model) — FCN saved with its
    auxiliary head, DeepLabV3 without, both with 3 classes."""
    architecture = request.param
    aux_loss = architecture == "fcn"
    network = random_network(architecture, len(CATEGORIES), aux_loss)
    assert any(k.startswith("aux_classifier.") for k in network.state_dict()) == aux_loss
    path = tmp_path_factory.mktemp(architecture) / f"{architecture}.pth"
    torch.save(network.state_dict(), path)
    model = ARCHITECTURES[architecture][1](str(path), category_file=str(category_file))
    return architecture, path, network, model


def segment(model: TorchvisionSemanticSegmenter, images: list[np.ndarray]) -> list[list[Segment]]:
    """Each image's segments as rows (masks on the host)."""
    return [list(segments) for segments in model.postprocess(model.forward(model.preprocess(images)), [image.shape[:2] for image in images])]


def reference_logits(network, image: np.ndarray, resize: int | None = None) -> torch.Tensor:
    """torchvision's own preset (resize, [0, 1], ImageNet normalisation) and network, logits
    upsampled back to the image's size: float (C, H, W)."""
    x = SemanticSegmentation(resize_size=resize)(torch.from_numpy(image.copy()).permute(2, 0, 1))
    with torch.inference_mode():
        logits = network(x[None])["out"]
    return F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)[0]


def assert_equals_reference(segments: list[Segment], logits: torch.Tensor, ids: list[int]) -> int:
    """One segment per class present, its mask = where the argmax is that class, its score the
    mean max-softmax probability there. Returns the number of classes present."""
    labels = logits.argmax(0).numpy()
    probability = logits.softmax(0).amax(0).numpy()
    present = [c for c in range(len(ids)) if (labels == c).any()]
    assert [s.category_id for s in segments] == [ids[c] for c in present]
    for seg, channel in zip(segments, present):
        np.testing.assert_array_equal(seg.mask, labels == channel)
        # The pipeline's actors run one torch thread, the reference this process's count:
        # float sums in another order, equal to ~1e-5.
        assert seg.score == pytest.approx(probability[labels == channel].mean(), abs=1e-4)
    return len(present)


def test_same_size_batch_equals_torchvision(setup):
    _, _, network, model = setup
    images = [random_image(64, 80, seed) for seed in range(3)]
    x = torch.stack([SemanticSegmentation(resize_size=None)(torch.from_numpy(i).permute(2, 0, 1)) for i in images])
    with torch.inference_mode():
        logits = network(x)["out"]  # the same batch, as torchvision runs it
    classes = 0
    for segments, image_logits in zip(segment(model, images), logits):
        classes += assert_equals_reference(segments, image_logits, [c.id for c in CATEGORIES])
    assert classes >= 6, "the checkpoint must predict several classes per image"


def test_mixed_sizes_equal_torchvision_per_image(setup):
    _, _, network, model = setup
    images = [random_image(h, w, 10 + i) for i, (h, w) in enumerate([(64, 80), (48, 96), (75, 61), (64, 80)])]
    for image, segments in zip(images, segment(model, images)):
        assert assert_equals_reference(segments, reference_logits(network, image), [c.id for c in CATEGORIES]) >= 2
        union = sum(s.mask.astype(int) for s in segments)
        assert (union == 1).all(), "semantic segments partition the image"


def test_resize_runs_at_the_shorter_side_and_upsamples_back(setup, category_file):
    architecture, path, network, _ = setup
    model = ARCHITECTURES[architecture][1](str(path), category_file=str(category_file), resize=40)
    images = [random_image(64, 80, 3), random_image(90, 50, 4)]
    for image, segments in zip(images, segment(model, images)):
        assert segments[0].mask.shape == image.shape[:2]
        assert_equals_reference(segments, reference_logits(network, image, resize=40), [c.id for c in CATEGORIES])


def test_checkpoint_loads_with_or_without_the_aux_head_which_inference_skips(setup):
    architecture, _, _, model = setup
    assert model.network.aux_classifier is None
    assert model.categories == CATEGORIES and model.task == "semantic" and model.name == architecture
    assert len(model.weights_sha256) == 64


def test_class_count_mismatch_is_a_clear_error(setup, tmp_path):
    architecture, path, _, _ = setup
    build = ARCHITECTURES[architecture][1]
    five = tmp_path / "five.json"
    five.write_text(json.dumps([{"id": i, "name": f"c{i}"} for i in range(1, 6)]))
    with pytest.raises(WeightsError) as error:
        build(str(path), category_file=str(five))
    message = str(error.value)
    assert "3 classes" in message and "5 categories" in message and str(five) in message
    with pytest.raises(WeightsError, match="3 classes.*default VOC categories need 21"):
        build(str(path))


def test_channel_rules():
    assert channel_categories(21, None) == VOC
    assert channel_categories(3, CATEGORIES) == CATEGORIES  # channel i = i-th listed
    assert channel_categories(4, CATEGORIES) == [BACKGROUND, *CATEGORIES]  # VOC layout
    with pytest.raises(WeightsError, match="already uses id 0"):
        channel_categories(3, [Category(0, "x"), Category(1, "y")])


def test_voc_labels_match_torchvision():
    for weights in (FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1, DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1):
        assert VOC_21_LABELS == weights.meta["categories"]
    assert [c.id for c in VOC] == list(range(21)) and VOC[0] == BACKGROUND


def test_registry_entries():
    for name in ("fcn", "deeplabv3"):
        entry = REGISTRY[name]
        assert entry.task == "semantic" and "torchvision .pth" in entry.weights
        assert list(entry.options.model_fields) == ["amp_dtype", "category_file", "resize"]


def test_random_weights_default_to_voc():
    model = build_deeplabv3("random")
    assert model.categories == VOC and model.network.classifier[4].out_channels == 21


@pytest.mark.slow
def test_cli_segments_with_an_fcn_checkpoint(ray_cluster, tmp_path):
    """End to end through `rayseg segment --model fcn` with a 21-class (VOC) checkpoint."""
    from PIL import Image

    from rayseg.jobs.cli import app

    network = random_network("fcn", 21, aux_loss=True)
    checkpoint = tmp_path / "fcn_voc.pth"
    torch.save(network.state_dict(), checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    arrays = {f"{i}.png": random_image(48, 64 + 8 * i, 30 + i) for i in range(3)}
    for name, array in arrays.items():
        Image.fromarray(array).save(images / name)
    result = CliRunner().invoke(app, ["segment", str(images), str(tmp_path / "out"), "--model", "fcn", "--weights", str(checkpoint)])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(arrays)
    for row in rows:
        logits = reference_logits(network, arrays[row["image_id"]])
        segments = [
            Segment(
                s["category_id"],
                s["score"],
                mask_utils.decode({"size": [row["height"], row["width"]], "counts": s["rle"]}).astype(bool),
            )
            for s in row["segments"]
        ]
        assert assert_equals_reference(segments, logits, [c.id for c in VOC]) >= 2
        assert {s["label"] for s in row["segments"]} <= set(c.name for c in VOC)
