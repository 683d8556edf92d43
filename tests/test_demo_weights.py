"""The demo weights the project trained itself (models/bundled/unet-shapes/): they load, are
small, and reach the recorded quality on shapes images no one trained or tuned on."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.categories import SHAPES
from rayseg.models.options import UNetOptions
from rayseg.models.registry import REGISTRY
from rayseg.models.unet import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    UNetSegmenter,
    build_unet,
    load_unet,
)
from rayseg.pipeline.evaluation.confusion import iou_from_confusion
from rayseg.pipeline.training.data import label_lookup, map_label_ids

DEMO_WEIGHTS = REGISTRY["unet"].default_weights
# Training used seed 1, the demo and the README's numbers seed 1000; this seed is neither.
SEED = 2027
IMAGES = 16
MIN_MIOU = 0.90
MIN_SEGM_AP = 0.70


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("demo-weights"), images=IMAGES, size=(128, 128), seed=SEED)


@pytest.fixture(scope="module")
def network():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    loaded, _ = load_unet(DEMO_WEIGHTS)
    yield loaded
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(held_out):
    return [np.asarray(Image.open(held_out.images_dir / f"{i:06d}.png").convert("RGB")) for i in range(IMAGES)]


def test_demo_weights_are_committed_small_and_for_the_shapes_classes(network):
    directory = Path(DEMO_WEIGHTS)
    assert (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()
    assert (directory / WEIGHTS_FILE).stat().st_size < 5 * 2**20
    assert "rayseg train unet" in (directory / "README.md").read_text()
    assert network.config.categories == SHAPES
    assert build_unet(DEMO_WEIGHTS).weights_sha256  # what the pipeline loads, by digest


def test_demo_weights_semantic_miou(network, held_out, images):
    model = UNetSegmenter(network)
    confusion = np.zeros((len(SHAPES), len(SHAPES)), dtype=np.int64)
    lookup = label_lookup(SHAPES)
    for indices, labels, _ in model.forward(model.preprocess(images)):
        for row, index in enumerate(indices):
            truth = map_label_ids(np.asarray(Image.open(held_out.semantic_dir / f"{index:06d}.png")), lookup)
            predicted = labels[row].numpy()
            valid = truth != 255
            confusion += np.bincount(
                truth[valid].astype(np.int64) * len(SHAPES) + predicted[valid], minlength=len(SHAPES) ** 2
            ).reshape(len(SHAPES), len(SHAPES))
    miou, per_class, _ = iou_from_confusion(confusion)
    assert miou >= MIN_MIOU, dict(zip([c.name for c in SHAPES], per_class))


def test_demo_weights_instance_segm_ap(network, held_out, images):
    model = UNetSegmenter(network, UNetOptions(task="instance"))
    results = []
    segments = model.postprocess(model.forward(model.preprocess(images)), [image.shape[:2] for image in images])
    for index, image_segments in enumerate(segments):
        for segment in image_segments:
            rle = mask_utils.encode(np.asfortranarray(segment.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": index + 1, "category_id": segment.category_id, "segmentation": rle, "score": segment.score})
    assert results
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(held_out.instances_json))
        evaluation = COCOeval(truth, truth.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] >= MIN_SEGM_AP, evaluation.stats[:3]


def test_demo_segments_evaluates_and_reports_with_the_bundled_weights(ray_cluster, tmp_path):
    import re

    from typer.testing import CliRunner

    from rayseg.jobs.cli import app

    result = CliRunner().invoke(app, ["demo", str(tmp_path), "--images", "6"])
    assert result.exit_code == 0, result.output
    # Percent, as the evaluation tables show them.
    headline = dict(re.findall(r"^(mIoU|segm AP) (\d+\.\d)  report", result.stdout, re.MULTILINE))
    assert set(headline) == {"mIoU", "segm AP"}, result.output
    assert float(headline["mIoU"]) > 50 and float(headline["segm AP"]) > 30  # a trained model, not a random one
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert sorted(run.rsplit("-", 1)[1] for run in runs) == ["instance", "semantic"]
    for run in runs:
        assert (tmp_path / "runs" / run / "_run.json").is_file()
        assert (tmp_path / "reports" / run / "index.html").is_file()
