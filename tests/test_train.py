"""`rayseg train unet`: data listing, augmentation, loss, checkpoints, resources, the Ray Train
run end to end (train, checkpoint, resume), and U-Net instance output."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import chdir
from pathlib import Path

import numpy as np
import pytest
import torch

from rayseg.jobs.fixtures import make_fixtures
from rayseg.models.categories import SHAPES, Category
from rayseg.models.options import UNetOptions
from rayseg.models.registry import REGISTRY
from rayseg.models.segments import Segment
from rayseg.models.unet import UNet, UNetConfig, UNetSegmenter, build_unet, load_unet
from rayseg.models.unet_instances import semantic_to_instances
from rayseg.pipeline.evaluation.confusion import iou_from_confusion
from rayseg.pipeline.resources import ResourceError
from rayseg.pipeline.training import TrainingError, train_unet
from rayseg.pipeline.training.augment import augment, normalise
from rayseg.pipeline.training.checkpoints import (
    load_history,
    load_training_state,
    save_checkpoint,
)
from rayseg.pipeline.training.data import (
    IGNORE,
    find_training_data,
    label_lookup,
    map_label_ids,
    split_items,
)
from rayseg.pipeline.training.loss import segmentation_loss
from rayseg.pipeline.training.pairs import DecodePairs
from rayseg.pipeline.training.resources import plan_train_resources
from rayseg.pipeline.training.schedule import cosine_lr, warmup_steps
from rayseg.pipeline.training.validation import confusion_matrix


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    """Tiny tensors gain nothing from threads, and idle threads spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """8 shapes images, 32×32: enough for a two-step epoch."""
    return make_fixtures(tmp_path_factory.mktemp("train-tiny"), images=8, size=(32, 32), seed=11)


@pytest.fixture(scope="module")
def tiny_instances_only(tmp_path_factory, tiny):
    """The same images with only COCO instances (no label PNGs, no panoptic)."""
    root = tmp_path_factory.mktemp("train-instances")
    shutil.copytree(tiny.images_dir, root / "images")
    (root / "annotations").mkdir()
    shutil.copy(tiny.instances_json, root / "annotations" / "instances.json")
    return root


# --- data ------------------------------------------------------------------------------------


def test_finds_label_pngs_with_the_panoptic_categories(tiny):
    found = find_training_data(str(tiny.root))
    assert found.source == "semantic"
    assert found.categories == SHAPES
    assert len(found.items) == 8
    first = found.items[0]
    assert first["image_uri"].endswith("images/000000.png") and first["label_uri"].endswith("semantic/000000.png")


def test_instances_json_adds_a_background_class_and_rasterises_like_the_label_pngs(tiny, tiny_instances_only):
    found = find_training_data(str(tiny_instances_only))
    assert found.source == "instances"
    # The fixtures' instances json has only the three things: class 0 "background" is added first.
    assert found.categories == [Category(0, "background", False)] + [c for c in SHAPES if c.isthing]
    decode = DecodePairs([c.to_dict() for c in found.categories], (32, 32))
    batch = {k: np.array([item[k] for item in found.items], dtype=object) for k in ("image_uri", "label_uri", "annotations")}
    decoded = decode(batch)
    assert decoded["image"].shape == (8, 32, 32, 3) and decoded["label"].shape == (8, 32, 32)
    # The same partition as the label PNGs, with channels renumbered (background 4 → channel 0).
    from PIL import Image

    lookup = label_lookup(found.categories)
    for index in range(8):
        ids = np.asarray(Image.open(tiny.semantic_dir / f"{index:06d}.png"))
        ids = np.where(ids == 4, 0, ids)
        np.testing.assert_array_equal(decoded["label"][index], map_label_ids(ids, lookup))


def test_background_category_of_the_json_is_used_and_crowds_are_ignored(tmp_path):
    from pycocotools import mask as mask_utils

    from rayseg.pipeline.training.pairs import rasterise_instances

    categories = [Category(7, "background", False), Category(3, "cat", True)]
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[1:3, 1:3] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    crowd = [[4, 4, 6, 4, 6, 6, 4, 6]]  # a polygon
    label = rasterise_instances(
        [{"category_id": 3, "segmentation": rle, "iscrowd": 0}, {"category_id": 3, "segmentation": crowd, "iscrowd": 1}],
        6, 6, categories, background=0,
    )  # fmt: skip
    assert (label[1:3, 1:3] == 1).all()
    assert (label[4:6, 4:6] == IGNORE).all()
    assert (label[0] == 0).all()


def test_label_ids_map_to_channels_and_unknown_ids_are_ignored():
    lookup = label_lookup(SHAPES)
    ids = np.array([[0, 1, 2], [3, 4, 9]], dtype=np.uint8)
    np.testing.assert_array_equal(map_label_ids(ids, lookup), [[IGNORE, 0, 1], [2, 3, IGNORE]])
    np.testing.assert_array_equal(map_label_ids(np.array([[1, 70000]], dtype=np.int64), lookup), [[0, IGNORE]])


def test_split_is_seeded_and_disjoint():
    items = [{"image_id": f"{i:03d}"} for i in range(20)]
    train, val = split_items(items, 0.25, seed=3)
    assert (len(train), len(val)) == (15, 5)
    assert {i["image_id"] for i in train}.isdisjoint(i["image_id"] for i in val)
    assert split_items(items, 0.25, seed=3) == (train, val)
    assert split_items(items, 0.0, seed=3) == (items, [])
    with pytest.raises(TrainingError):
        split_items(items, 1.0, seed=3)


def test_errors_before_any_cluster_work(tmp_path, tiny):
    with pytest.raises(TrainingError, match="no images/"):
        find_training_data(str(tmp_path))
    (tmp_path / "images").mkdir()
    with pytest.raises(TrainingError, match="neither"):
        find_training_data(str(tmp_path))


# --- augmentation ----------------------------------------------------------------------------


def test_augmentation_keeps_image_and_label_aligned():
    """The label is a function of the image (channel 0 above mid-grey), so any geometric
    transform applied to one but not the other, or differently, breaks the relation."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(16, 24, 24), dtype=np.uint8)
    images = np.repeat((labels * 255)[..., None], 3, axis=-1).astype(np.uint8)
    images[..., 1] = rng.integers(0, 256, size=(16, 24, 24))  # texture the jitter acts on
    changed = 0
    for seed in range(8):
        out_images, out_labels = augment(images, labels, np.random.default_rng(seed), colour_jitter=0.1, crop=(16, 16))
        assert out_images.shape == (16, 16, 16, 3) and out_labels.shape == (16, 16, 16)
        np.testing.assert_array_equal(out_images[..., 0] > 127, out_labels.astype(bool))
        full_images, full_labels = augment(images, labels, np.random.default_rng(seed), colour_jitter=0.1)
        np.testing.assert_array_equal(full_images[..., 0] > 127, full_labels.astype(bool))
        changed += int((full_labels != labels).any(axis=(1, 2)).sum())
    assert changed > 0  # flips and rotations did happen


def test_colour_shuffle_keeps_alignment_and_changes_colours():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(32, 16, 16), dtype=np.uint8)
    images = np.zeros((32, 16, 16, 3), dtype=np.uint8)
    images[..., 0] = labels * 200 + 20  # the shape is red on black...
    images[..., 2] = 90  # ...on a blue cast
    out_images, out_labels = augment(images, labels, np.random.default_rng(7), colour_jitter=0.0, colour_shuffle=True)
    red_channels = set()
    inverted = 0
    for image, label in zip(out_images, out_labels):
        # The channel that carries the shape may have moved, and may be inverted.
        channel = int(np.argmax([np.ptp(image[..., c]) for c in range(3)]))
        red_channels.add(channel)
        shape = image[..., channel] > 127
        inverted += int(np.array_equal(shape, ~label.astype(bool)))
        assert np.array_equal(shape, label.astype(bool)) or np.array_equal(shape, ~label.astype(bool))
    assert len(red_channels) > 1 and 0 < inverted < 32


def test_geometric_augmentation_without_jitter_is_an_exact_permutation():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    labels = images[..., 0] // 64
    out_images, out_labels = augment(images, labels, np.random.default_rng(5), colour_jitter=0.0)
    np.testing.assert_array_equal(out_images[..., 0] // 64, out_labels)
    for before, after in zip(images, out_images):
        assert sorted(before.reshape(-1, 3).tolist()) == sorted(after.reshape(-1, 3).tolist())


# --- loss, metrics, schedule -----------------------------------------------------------------


def test_loss_ignores_unlabelled_pixels_and_rewards_the_right_answer():
    labels = torch.tensor([[[0, 1], [IGNORE, 1]]])
    right = torch.zeros(1, 3, 2, 2)
    right[0, 0, 0, 0] = right[0, 1, 0, 1] = right[0, 1, 1, 1] = 10
    wrong = right.clone()
    wrong[0, :, 1, 0] = torch.tensor([0.0, 0.0, 10.0])  # only the ignored pixel differs
    assert segmentation_loss(right, labels) == pytest.approx(float(segmentation_loss(wrong, labels)))
    assert segmentation_loss(right, labels) < segmentation_loss(torch.zeros(1, 3, 2, 2), labels)


def test_confusion_and_miou():
    labels = torch.tensor([[0, 0, 1, IGNORE]])
    predicted = torch.tensor([[0, 1, 1, 0]])
    confusion = confusion_matrix(predicted, labels, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    miou, per_class, accuracy = iou_from_confusion(confusion.numpy())
    assert per_class == [0.5, 0.5, None] and miou == 0.5 and accuracy == pytest.approx(2 / 3)


def test_learning_rate_warms_up_then_decays_to_five_percent():
    rates = [cosine_lr(1.0, step, 100, warmup_steps=5) for step in range(100)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rates[5] == 1.0 and rates[-1] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))
    assert cosine_lr(1.0, 0, 1) == 1.0
    assert warmup_steps(100) == 5 and warmup_steps(100_000) == 200


def test_normalise_matches_the_segmenter():
    network = UNet(UNetConfig(width=4, depth=2)).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    segmenter = UNetSegmenter(network)
    expected = segmenter.forward(segmenter.preprocess(list(images)))[0][1]
    with torch.inference_mode():
        assert torch.equal(network(normalise(torch.from_numpy(images))).argmax(1), expected)


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    network = UNet(UNetConfig(width=4, depth=2))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    x = normalise(torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8))
    segmentation_loss(network(x), torch.randint(0, 4, (2, 16, 16))).backward()
    optimizer.step()
    save_checkpoint(network, optimizer, 3, [{"epoch": 3, "loss": 1.0}], str(tmp_path / "ckpt"))
    loaded, _ = load_unet(str(tmp_path / "ckpt"))
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    state = load_training_state(str(tmp_path / "ckpt"))
    assert state["epoch"] == 3
    restored = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    restored.load_state_dict(state["optimizer"])
    for (_, a), (_, b) in zip(sorted(restored.state_dict()["state"].items()), sorted(optimizer.state_dict()["state"].items())):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert load_history(str(tmp_path / "ckpt")) == [{"epoch": 3, "loss": 1.0}]
    assert load_training_state(str(tmp_path)) is None  # no training_state.pt there


# --- resources -------------------------------------------------------------------------------


def test_gpus_asked_of_a_cluster_without_any_fail_fast():
    with pytest.raises(ResourceError, match="has none"):
        plan_train_resources({"CPU": 2.0}, gpus_per_worker=0.5)


def test_cpu_defaults_leave_room_for_decode_tasks():
    plan = plan_train_resources({"CPU": 2.0})
    assert plan.workers == 1 and plan.gpus_per_worker == 0
    assert plan.cpus_per_worker + 2 * plan.task_cpus <= 2.0
    assert plan.torch_threads == 2  # 1.5 CPUs: both cores, shared with the light decode tasks
    with pytest.raises(ResourceError, match="no CPU"):
        plan_train_resources({"CPU": 2.0}, workers=2, cpus_per_worker=1.0)
    gpu = plan_train_resources({"CPU": 8.0, "GPU": 2.0}, gpus_per_worker=0.5)
    assert gpu.workers == 4 and gpu.cpus_per_worker == 1.0


# --- Ray Train end to end --------------------------------------------------------------------

TINY = dict(width=4, depth=2, batch_size=4, lr=3e-2, val_fraction=0.25, seed=0)


def _loss_on(network: UNet, fixtures) -> float:
    """The training loss on all 8 images, with batch statistics in batch norm (train mode), as
    in training: four steps barely move the running statistics eval mode would use."""
    found = find_training_data(str(fixtures.root))
    batch = {k: np.array([item[k] for item in found.items], dtype=object) for k in ("image_uri", "label_uri", "annotations")}
    decoded = DecodePairs([c.to_dict() for c in found.categories], (32, 32))(batch)
    with torch.no_grad():
        logits = network.train()(normalise(torch.from_numpy(decoded["image"])))
        return float(segmentation_loss(logits, torch.from_numpy(decoded["label"]).long()))


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny, tmp_path_factory):
    """Two epochs, with DATA and OUT given relative to the working directory, as users type
    them: Ray Train's workers run in a directory of their own."""
    base = tmp_path_factory.mktemp("trained")
    with chdir(base):
        summary = train_unet(os.path.relpath(tiny.root), "unet", epochs=2, **TINY)
    return summary, base / "unet"


def test_training_runs_on_ray_train_and_lowers_the_loss(trained, tiny):
    summary, out = trained
    assert [row["epoch"] for row in summary.history] == [1, 2]
    assert (summary.train_images, summary.val_images) == (6, 2)
    assert all(row["batches"] == 2 and row["val_mIoU"] is not None for row in summary.history)
    torch.manual_seed(TINY["seed"])  # the initialisation the training loop starts from
    initial = UNet(UNetConfig(categories=list(SHAPES), width=4, depth=2))
    trained_network, _ = load_unet(str(out))
    assert _loss_on(trained_network, tiny) < 0.95 * _loss_on(initial, tiny)


def test_every_epoch_is_checkpointed_in_our_format(trained):
    summary, out = trained
    latest, _ = load_unet(str(out))
    last_epoch, _ = load_unet(str(out / "epochs" / "epoch-0002"))
    first_epoch, _ = load_unet(str(out / "epochs" / "epoch-0001"))
    state = latest.state_dict()
    assert all(torch.equal(value, last_epoch.state_dict()[key]) for key, value in state.items())
    assert not all(torch.equal(value, first_epoch.state_dict()[key]) for key, value in state.items())
    assert load_training_state(str(out))["epoch"] == 2
    assert json.loads((out / "metrics.json").read_text())["epoch"] == 2
    # Ray Train's own copy of the latest checkpoint (what restarts a failed worker) is ours too.
    ray_copies = sorted((out / "_ray_train").glob("*/epoch-0002"))
    assert ray_copies, list((out / "_ray_train").rglob("*"))
    from_ray, _ = load_unet(str(ray_copies[-1]))
    assert all(torch.equal(value, from_ray.state_dict()[key]) for key, value in state.items())


def test_resume_continues_from_the_saved_epoch_into_object_storage(trained, tiny, s3_endpoint):
    import fsspec

    from .conftest import BUCKET

    summary, out = trained
    steps_before = [float(s["step"]) for s in load_training_state(str(out))["optimizer"]["state"].values()]
    assert set(steps_before) == {4.0}  # 2 epochs × 2 batches
    resumed_uri = f"s3://{BUCKET}/train/resumed"
    with chdir(out.parent):  # --resume-from relative to the working directory, too
        resumed = train_unet(str(tiny.root), resumed_uri, epochs=3, resume_from=out.name, **{**TINY, "width": None, "depth": None})
    assert resumed.start_epoch == 2
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]  # the history travels on
    state = load_training_state(resumed_uri)
    assert state["epoch"] == 3
    # Adam's step counters went on from the restored optimizer state, not from zero.
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {6.0}
    s3 = fsspec.filesystem("s3")
    assert s3.exists(f"{resumed_uri}/epochs/epoch-0003/model.safetensors")
    assert not s3.exists(f"{resumed_uri}/epochs/epoch-0001")
    network, _ = load_unet(resumed_uri)  # what `--weights s3://...` loads
    assert network.config.width == TINY["width"]


def test_resume_is_refused_when_nothing_is_left_or_the_classes_differ(trained, tiny, tmp_path):
    summary, out = trained
    with pytest.raises(TrainingError, match="already trained 2 epochs"):
        train_unet(str(tiny.root), str(tmp_path / "again"), epochs=2, resume_from=str(out))
    with pytest.raises(TrainingError, match="differs from the checkpoint"):
        train_unet(str(tiny.root), str(tmp_path / "again"), epochs=5, resume_from=str(out), width=8)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]))
    with pytest.raises(TrainingError, match="classes and their order must match"):
        train_unet(str(tiny.root), str(tmp_path / "again"), epochs=5, resume_from=str(out), categories_file=str(other))


def test_cli_refuses_gpus_on_a_cpu_cluster(ray_cluster, tiny, tmp_path):
    from typer.testing import CliRunner

    from rayseg.jobs.cli import app

    result = CliRunner().invoke(app, ["train", "unet", str(tiny.root), "--out", str(tmp_path / "w"), "--gpus-per-worker", "1"])
    assert result.exit_code == 2, result.output
    assert "has none" in result.output


# --- what a run says ---------------------------------------------------------------------------

# What of Ray's own processes rayseg's training cannot quiet: it depends on how Ray was
# started (jobs/cluster.py; here the session's Ray, conftest) and on the machine.
# - Ray Train's PlacementGroupCleaner asks the State API, which the dashboard serves, every
#   second whether the run's controller lives: without it, 'Failed to query …' each time.
#   It finds its cluster by looking for Ray instances on the machine, and with two (a test
#   session beside another) its thread dies with a ConnectionError's traceback.
RAY_STARTED_ACTORS = ("PlacementGroupCleaner",)
# Ray's markers in its worker logs, which its log monitor strips before forwarding.
RAY_LOG_MARKER = re.compile(r"^:(job_id|actor_name|task_name):")
ACTOR_NAME = re.compile(r"^:actor_name:(\S+)", re.MULTILINE)
# Of a tqdm bar: its percentage, its rate, its cursor-up.
TQDM = re.compile(r"\d%\||row/s|\x1b\[A")


def _worker_log_sizes() -> dict[str, int]:
    """Sizes of the session's worker logs: what Ray forwards to a driver's terminal (.out to
    stdout, .err to stderr) where it runs with log_to_driver, as `rayseg` does."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {str(path): path.stat().st_size for path in logs.glob("worker-*")}


def _written_since(before: dict[str, int]) -> dict[str, list[str]]:
    """The lines written to the worker logs since `before`, by stream ("out", "err"), but
    for those of RAY_STARTED_ACTORS, once the logs stop growing: an executor's last lines
    come as it shuts down, after fit returns."""
    sizes = _worker_log_sizes()
    for _ in range(20):
        time.sleep(0.5)
        sizes, previous = _worker_log_sizes(), sizes
        if sizes == previous:
            break
    lines = {"out": [], "err": []}
    for path, size in sizes.items():
        raw = Path(path).read_bytes()[:size]
        actor = ACTOR_NAME.search(raw.decode(errors="replace"))
        if actor and actor[1] in RAY_STARTED_ACTORS:
            continue
        new = raw[before.get(path, 0) :].decode(errors="replace")
        stream = "out" if path.endswith(".out") else "err"
        lines[stream] += [line for line in new.splitlines() if line.strip() and not RAY_LOG_MARKER.match(line)]
    return lines


@pytest.fixture(scope="module")
def cli_run(ray_cluster, tiny, tmp_path_factory):
    """`rayseg train unet` for two epochs, in this process: its stdout and stderr, and what
    Ray's processes wrote meanwhile."""
    from typer.testing import CliRunner

    from rayseg.jobs.cli import app

    out = tmp_path_factory.mktemp("cli-train") / "unet"
    # Seed 1's split validates at 43.1% mIoU (seed 0's at 0%, the same in any unit).
    options = {"--epochs": 2, **{f"--{k.replace('_', '-')}": v for k, v in TINY.items()}, "--seed": 1}
    before = _worker_log_sizes()
    result = CliRunner().invoke(app, ["train", "unet", str(tiny.root), "--out", str(out), *(str(x) for kv in options.items() for x in kv)])
    assert result.exit_code == 0, result.output
    return result, _written_since(before), out


def test_the_run_logs_one_line_an_epoch_on_stderr_and_its_results_on_stdout(cli_run):
    result, _, _ = cli_run
    epoch_lines = [line for line in result.stderr.splitlines() if re.search(r"\bepoch \d+/2:", line)]
    assert len(epoch_lines) == 2, result.stderr
    assert all(re.search(r"epoch (\d)/2: loss [\d.]+, val mIoU [\d.]+%, \d+ s$", line) for line in epoch_lines), epoch_lines
    assert [re.search(r"epoch (\d)/", line)[1] for line in epoch_lines] == ["1", "2"]
    # stderr: the run's plan and its epochs, nothing else of rayseg's.
    assert len(result.stderr.splitlines()) <= 3, result.stderr
    assert "epoch 1/2" not in result.stdout
    assert "weights: " in result.stdout and "val mIoU %" in result.stdout


def test_the_epoch_lines_and_the_table_give_mIoU_in_percent_of_the_stored_fraction(cli_run):
    result, _, out = cli_run
    logged = [float(m[1]) for m in re.finditer(r"val mIoU ([\d.]+)%", result.stderr)]
    # The table's rows: │ epoch │ loss │ val mIoU % │ pixel acc % │ lr │ seconds │
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines() if re.match(r"│ \d", line)]
    assert [float(row[2]) for row in rows] == logged and len(logged) == 2, (result.stderr, result.stdout)
    # metrics.json keeps the fraction, as report.json does.
    stored = [row["val_mIoU"] for row in load_history(str(out))]
    assert logged == [round(100 * value, 1) for value in stored] and all(0 < value < 1 for value in stored), (logged, stored)


def test_rays_processes_show_no_bars_train_info_or_warnings_of_ours(cli_run):
    from rayseg.jobs.terminal import NATIVE_NOISE

    _, ray_lines, _ = cli_run
    # Ray Train's print patch tees a worker's print to stdout: results only, there.
    assert ray_lines["out"] == []
    err = [line for line in ray_lines["err"] if not any(text in line for text in NATIVE_NOISE)]
    assert not [line for line in err if TQDM.search(line)], err
    for text in ("Reporting training result", "Starting execution of Dataset", "Setting up process group", "Warning"):
        assert not [line for line in err if text in line], (text, err)
    # Nor Ray Data's "execution finished" lines, nor its warning that its bars are off (the
    # console of its dataset coordinators, jobs/ray_data_logging.yaml).
    assert err == [], err


# --- instance output -------------------------------------------------------------------------


def test_two_blobs_of_one_class_are_two_instances_and_stuff_is_not_an_instance():
    categories = [Category(1, "circle", True), Category(2, "square", True), Category(9, "background", False)]
    labels = np.full((12, 12), 2, dtype=np.int64)  # background channel
    labels[1:4, 1:4] = 0  # circle, 9 px
    labels[6:10, 6:10] = 0  # circle, 16 px
    labels[0:2, 9:12] = 1  # square, 6 px: below min_area
    probabilities = np.full((12, 12), 0.5)
    probabilities[1:4, 1:4] = 0.9
    probabilities[6:10, 6:10] = 0.7
    segments = semantic_to_instances(labels, probabilities, categories, min_area=8)
    assert [s.category_id for s in segments] == [1, 1]
    assert [int(s.mask.sum()) for s in segments] == [9, 16]
    assert [s.score for s in segments] == pytest.approx([0.9, 0.7])
    assert len(semantic_to_instances(labels, probabilities, categories, min_area=1)) == 3
    assert semantic_to_instances(labels, probabilities, categories, min_area=8, score_threshold=0.8)[0].score == pytest.approx(0.9)
    # Diagonal neighbours are one instance (8-connectivity).
    diagonal = np.full((4, 4), 2)
    diagonal[0, 0] = diagonal[1, 1] = 0
    assert len(semantic_to_instances(diagonal, np.ones((4, 4)), categories, min_area=1)) == 1


def test_unet_instance_output_option():
    assert {"task", "min_area"} <= set(REGISTRY["unet"].options.model_fields)
    with pytest.raises(ValueError, match="task"):
        build_unet("random", task="panoptic")
    torch.manual_seed(3)
    network = UNet(UNetConfig(width=4, depth=2)).eval()
    with torch.no_grad():
        network.head.weight.mul_(30)
    images = [np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(2)]
    semantic = UNetSegmenter(network)
    instance = UNetSegmenter(network, UNetOptions(task="instance", min_area=1))
    assert instance.task == "instance" and semantic.task == "semantic"
    raw = semantic.forward(semantic.preprocess(images))
    by_class = semantic.postprocess(raw, [(20, 24)] * 2)
    instances = instance.postprocess(instance.forward(instance.preprocess(images)), [(20, 24)] * 2)
    things = {c.id for c in SHAPES if c.isthing}
    for segments, semantic_segments in zip(instances, by_class):
        assert all(isinstance(s, Segment) and s.category_id in things for s in segments)
        # The instances of a class tile exactly its semantic mask.
        for semantic_segment in semantic_segments:
            parts = [s.mask for s in segments if s.category_id == semantic_segment.category_id]
            if semantic_segment.category_id in things:
                assert parts
                np.testing.assert_array_equal(np.logical_or.reduce(parts), semantic_segment.mask)
                assert not (np.sum(parts, axis=0) > 1).any()
            else:
                assert not parts
