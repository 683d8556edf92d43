"""`rayseg train unet DATA --out WEIGHTS`: train or fine-tune our U-Net on Ray Train.

The data path mirrors `rayseg segment`'s: the driver lists (image, label) pairs once, Ray
Data decodes them in `map_batches` tasks (fractional CPUs, so they run beside the training
workers on a small machine), and each Ray Train worker (`TorchTrainer`, DDP over gloo on
CPUs, NCCL on GPUs) reads its shard with `ray.train.get_dataset_shard`.

DATA is a fixtures-style root (`rayseg fixtures`):

- `images/` + `annotations/semantic/*.png` label PNGs (pixel = category id, 0 = unlabelled,
  ignored by the loss), categories from `--categories`, else `annotations/panoptic.json`,
  else `annotations/instances.json`; or
- `images/` + `annotations/instances.json` (COCO, RLE or polygons): instances are
  rasterised to a semantic map with pycocotools; pixels outside every instance are the
  `background` category when the json has one, else a class 0 "background" added first;
  crowd regions are ignored.

Output channels are the categories in config order; labels are mapped from category ids
to channel indices on decode (IGNORE for anything else).

WEIGHTS (a path or fsspec URI) receives after every epoch::

    WEIGHTS/config.json, model.safetensors   the latest epoch (what `--weights` takes)
    WEIGHTS/training_state.pt                epoch + optimizer state (tensors/ints only;
                                             read back with torch.load(weights_only=True))
    WEIGHTS/metrics.json                     the run's per-epoch history (loss, val mIoU)
    WEIGHTS/epochs/epoch-NNNN/               the same four files for every epoch
    WEIGHTS/_ray_train/RUN_ID/               Ray Train's own run state (latest checkpoint,
                                             used to restart failed workers)

`--resume-from CKPT` continues a run from a checkpoint directory: with its
training_state.pt the epoch counter and optimizer state are restored and training goes on
up to `--epochs` in total; without one (e.g. the demo weights) the weights are fine-tuned
from epoch 0 with a fresh optimizer.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..models.categories import Category, load_category_file, parse_categories
from ..models.weights import WeightsError

log = logging.getLogger("rayseg")

IGNORE = 255  # label value the loss and validation skip (unlabelled, crowd, unknown ids)
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.json"
EPOCHS_DIR = "epochs"
RAY_TRAIN_DIR = "_ray_train"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_WIDTH = 16
DEFAULT_DEPTH = 4
# Learning rate at the last step, as a fraction of --lr (cosine decay in between).
FINAL_LR_FRACTION = 0.05
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 200


class TrainingError(ValueError):
    """Bad training arguments or data: reported before any cluster work (exit 2)."""


# --- data ------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What the driver found under DATA: one item per image, and the classes in channel order.

    items: {"image_id", "image_uri", "label_uri" (semantic PNG, or ""), "annotations" (json
    list of {category_id, segmentation, iscrowd}, or "")}.
    """

    items: list[dict]
    categories: list[Category]
    source: str  # "semantic" | "instances"
    skipped: int = 0  # images without a label


def _fs(uri: str, storage_options: dict | None):
    from ..pipeline.storage import filesystem, full_uri

    fs, path = filesystem(uri, storage_options)
    return fs, path, lambda p: full_uri(fs, p)


def _read_json(uri: str, storage_options: dict | None) -> Any:
    fs, path, _ = _fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        return json.load(f)


def _exists(uri: str, storage_options: dict | None) -> bool:
    fs, path, _ = _fs(uri, storage_options)
    return fs.exists(path)


def instance_categories(entries: list[dict]) -> tuple[list[Category], int]:
    """COCO instances categories + the background class; returns (categories, background channel).

    The category named "background" (any case) is the background when there is one; else a
    stuff class 0 "background" is added as channel 0.
    """
    categories = parse_categories(entries)
    for channel, category in enumerate(categories):
        if category.name.lower() == "background":
            categories[channel] = Category(category.id, category.name, False)
            return categories, channel
    if any(c.id == 0 for c in categories):
        raise TrainingError("the COCO categories use id 0 and have no 'background' category: add one")
    return [Category(0, "background", False)] + categories, 0


def find_training_data(data: str, storage_options: dict | None = None, categories_file: str | None = None) -> TrainingData:
    """Lists DATA's images and their labels (see the module docstring for the layouts)."""
    root = data.rstrip("/")
    images_root = posixpath.join(root, "images")
    semantic_root = posixpath.join(root, "annotations", "semantic")
    instances_json = posixpath.join(root, "annotations", "instances.json")
    panoptic_json = posixpath.join(root, "annotations", "panoptic.json")
    if not _exists(images_root, storage_options):
        raise TrainingError(f"{data} has no images/ directory (expected a `rayseg fixtures`-style root)")

    if _exists(semantic_root, storage_options):
        if categories_file:
            categories = load_category_file(categories_file, storage_options)
        elif _exists(panoptic_json, storage_options):
            categories = parse_categories(_read_json(panoptic_json, storage_options)["categories"])
        elif _exists(instances_json, storage_options):
            categories = parse_categories(_read_json(instances_json, storage_options)["categories"])
        else:
            raise TrainingError(
                f"{data}: label PNGs need category names: pass --categories, or put a COCO "
                "panoptic.json or instances.json in annotations/"
            )
        fs, images_path, uri = _fs(images_root, storage_options)
        _, semantic_path, _ = _fs(semantic_root, storage_options)
        labels = {posixpath.splitext(posixpath.relpath(p, semantic_path))[0]: p for p in fs.find(semantic_path) if p.lower().endswith(".png")}
        items, skipped = [], 0
        for path in sorted(fs.find(images_path)):
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image_id = posixpath.relpath(path, images_path)
            label = labels.get(posixpath.splitext(image_id)[0])
            if label is None:
                skipped += 1
                continue
            items.append({"image_id": image_id, "image_uri": uri(path), "label_uri": uri(label), "annotations": ""})
        source = "semantic"
    elif _exists(instances_json, storage_options):
        coco = _read_json(instances_json, storage_options)
        categories, _ = instance_categories(coco.get("categories", []))
        if categories_file:
            raise TrainingError("--categories applies to label PNGs; COCO instances bring their own categories")
        by_image: dict[Any, list[dict]] = {}
        for annotation in coco.get("annotations", []):
            by_image.setdefault(annotation["image_id"], []).append(
                {
                    "category_id": annotation["category_id"],
                    "segmentation": annotation["segmentation"],
                    "iscrowd": int(annotation.get("iscrowd", 0)),
                }
            )
        items = [
            {
                "image_id": str(image["id"]),
                "image_uri": posixpath.join(images_root, image["file_name"]),
                "label_uri": "",
                "annotations": json.dumps(by_image.get(image["id"], [])),
            }
            for image in sorted(coco.get("images", []), key=lambda i: str(i["file_name"]))
        ]
        skipped = 0
        source = "instances"
    else:
        raise TrainingError(f"{data} has neither annotations/semantic/*.png nor annotations/instances.json")
    if not items:
        raise TrainingError(f"{data}: no images with labels found")
    if len(categories) >= IGNORE:
        raise TrainingError(f"at most {IGNORE - 1} categories are supported, got {len(categories)}")
    return TrainingData(items=items, categories=categories, source=source, skipped=skipped)


def split_items(items: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random held-out split: (train, val); val is empty when val_fraction is 0."""
    if not 0 <= val_fraction < 1:
        raise TrainingError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    count = 0 if val_fraction == 0 else min(len(shuffled) - 1, max(1, round(len(shuffled) * val_fraction)))
    if val_fraction > 0 and count < 1:
        raise TrainingError(f"--val-fraction {val_fraction} needs at least 2 images, found {len(items)}")
    return sorted(shuffled[count:], key=lambda i: i["image_id"]), sorted(shuffled[:count], key=lambda i: i["image_id"])


def label_lookup(categories: list[Category]) -> np.ndarray:
    """Category id → channel index for ids 0..max; IGNORE for any other id."""
    table = np.full(max([c.id for c in categories] + [255]) + 1, IGNORE, dtype=np.uint8)
    for channel, category in enumerate(categories):
        if category.id >= 0:
            table[category.id] = channel
    return table


def map_label_ids(ids: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """(H, W) category ids → (H, W) uint8 channel indices (IGNORE for unknown ids)."""
    ids = ids.astype(np.int64)
    inside = (ids >= 0) & (ids < len(lookup))
    return np.where(inside, lookup[np.clip(ids, 0, len(lookup) - 1)], IGNORE).astype(np.uint8)


def rasterise_instances(annotations: list[dict], height: int, width: int, categories: list[Category], background: int) -> np.ndarray:
    """COCO instance annotations → (H, W) uint8 channel indices; crowd and unknown ids → IGNORE."""
    from pycocotools import mask as mask_utils

    channels = {c.id: channel for channel, c in enumerate(categories)}
    label = np.full((height, width), background, dtype=np.uint8)
    for annotation in annotations:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode() if isinstance(segmentation["counts"], str) else segmentation["counts"]}
        mask = mask_utils.decode(rle).astype(bool)
        if mask.shape != (height, width):
            raise ValueError(f"annotation mask {mask.shape} does not match its image ({height}, {width})")
        channel = channels.get(annotation["category_id"])
        label[mask] = IGNORE if annotation.get("iscrowd") or channel is None else channel
    return label


class DecodePairs:
    """Ray Data map_batches function: (image uri, label uri | annotations) → uint8 arrays.

    image (N, H, W, 3) and label (N, H, W) channel indices, resized to `size` (bilinear for
    the image, nearest for the label).
    """

    def __init__(self, categories: list[dict], size: tuple[int, int], storage_options: dict | None = None):
        self.categories = parse_categories(categories)
        self.lookup = label_lookup(self.categories)
        self.background = next((i for i, c in enumerate(self.categories) if c.name.lower() == "background"), 0)
        self.size = tuple(size)
        self.storage_options = storage_options

    def _read(self, uri: str) -> bytes:
        from ..pipeline.storage import filesystem

        fs, path = filesystem(uri, self.storage_options)
        with fs.open(path, "rb") as f:
            return f.read()

    def _label(self, row_label_uri: str, annotations: str, height: int, width: int) -> np.ndarray:
        from PIL import Image

        if row_label_uri:
            with Image.open(io.BytesIO(self._read(row_label_uri))) as image:
                ids = np.asarray(image)
            if ids.ndim == 3:
                raise ValueError(f"{row_label_uri}: label PNGs must be single-channel (pixel = category id)")
            label = map_label_ids(ids, self.lookup)
        else:
            label = rasterise_instances(json.loads(annotations or "[]"), height, width, self.categories, self.background)
        if label.shape != (height, width):
            raise ValueError(f"label {label.shape} does not match its image ({height}, {width}): {row_label_uri}")
        return label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from ..pipeline.decode import decode_image

        height, width = self.size
        images, labels = [], []
        for image_uri, label_uri, coco_annotations in zip(batch["image_uri"], batch["label_uri"], batch["annotations"]):
            try:
                image = decode_image(self._read(image_uri))
                label = self._label(str(label_uri), str(coco_annotations), *image.shape[:2])
            except Exception as e:
                raise ValueError(f"cannot read training pair {image_uri}: {e}") from e
            if image.shape[:2] != (height, width):
                image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
                label = np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))
            images.append(image)
            labels.append(label)
        return {"image": np.stack(images), "label": np.stack(labels)}


def augment(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    colour_jitter: float = 0.1,
    crop: tuple[int, int] | None = None,
    colour_shuffle: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (optional), flips, 90° rotations (square crops) and a small colour jitter.

    images uint8 (N, H, W, 3), labels (N, H, W): every geometric transform is applied
    identically to an image and its label; the colour jitter (brightness, contrast, per-
    channel gain) touches only the image. `crop` (height, width) cuts a random window of
    that size from each image (no larger than the image): the network is fully
    convolutional, so it trains on windows and predicts whole images. `colour_shuffle`
    also permutes the RGB channels and inverts the image, each at random — for data whose
    colours say nothing about the class (the shapes fixtures), so the network cannot learn
    colour shortcuts and must learn shape.
    """
    out_images, out_labels = [], []
    height, width = images.shape[1:3]
    crop_h, crop_w = (min(crop[0], height), min(crop[1], width)) if crop else (height, width)
    square = crop_h == crop_w
    for image, label in zip(images, labels):
        if (crop_h, crop_w) != (height, width):
            top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
            image, label = image[top : top + crop_h, left : left + crop_w], label[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if rng.random() < 0.5:
            image, label = image[::-1], label[::-1]
        if square:
            turns = int(rng.integers(4))
            image, label = np.rot90(image, turns, axes=(0, 1)), np.rot90(label, turns, axes=(0, 1))
        if colour_shuffle:
            image = image[..., rng.permutation(3)]
            if rng.random() < 0.5:
                image = 255 - image
        if colour_jitter > 0:
            contrast = 1 + rng.uniform(-colour_jitter, colour_jitter)
            gain = 1 + rng.uniform(-colour_jitter, colour_jitter, size=3) / 2
            brightness = rng.uniform(-colour_jitter, colour_jitter) * 255
            mean = image.reshape(-1, 3).mean(axis=0)
            jittered = (image.astype(np.float32) - mean) * contrast + mean
            image = np.clip(jittered * gain + brightness, 0, 255).round().astype(np.uint8)
        out_images.append(np.ascontiguousarray(image))
        out_labels.append(np.ascontiguousarray(label))
    return np.stack(out_images), np.stack(out_labels)


# --- model, loss, metrics --------------------------------------------------------------------


def normalise(images):
    """uint8 (N, H, W, 3) tensor → float (N, 3, H, W) exactly as UNetSegmenter.forward does."""
    import torch

    from ..models.unet import _MEAN, _STD

    mean = torch.tensor(_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.permute(0, 3, 1, 2).float() - mean) / std


def segmentation_loss(logits, labels, dice_weight: float = 1.0):
    """Cross-entropy (IGNORE pixels skipped) + dice_weight × soft multi-class dice loss."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    if dice_weight > 0:
        valid = (labels != IGNORE).unsqueeze(1)
        probabilities = logits.softmax(dim=1) * valid
        one_hot = F.one_hot(labels.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * valid
        intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
        total = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
        present = one_hot.sum(dim=(0, 2, 3)) > 0
        dice = (2 * intersection + 1) / (total + 1)
        loss = loss + dice_weight * (1 - dice[present]).mean() if present.any() else loss + 0 * dice.sum()
    return loss


def confusion_matrix(predicted, labels, num_classes: int):
    """(C, C) int64 counts, rows ground truth, columns prediction; IGNORE pixels skipped."""
    import torch

    valid = labels != IGNORE
    index = labels[valid].long() * num_classes + predicted[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> tuple[float | None, list[float | None], float | None]:
    """(mIoU, per-class IoU, pixel accuracy); a class absent from ground truth and
    prediction has IoU None and is left out of the mean (the evaluator's convention)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    defined = [v for v in iou if v is not None]
    total = confusion.sum()
    return (float(np.mean(defined)) if defined else None), iou, (float(tp.sum() / total) if total else None)


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning rate of (0-based) optimizer `step`: linear warm-up over `warmup_steps` to
    base_lr, then cosine decay to FINAL_LR_FRACTION × base_lr at the last step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = min((step - warmup_steps) / decay_steps, 1.0) if decay_steps > 0 else 0.0
    return base_lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_steps(total_steps: int) -> int:
    """WARMUP_FRACTION of the steps, at most MAX_WARMUP_STEPS: Adam's first steps, with its
    moment estimates still empty, are the ones a full learning rate throws off course."""
    return min(MAX_WARMUP_STEPS, int(total_steps * WARMUP_FRACTION))


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(network, optimizer, epoch: int, history: list[dict], directory: str, storage_options: dict | None = None) -> str:
    """Our format under `directory` (path or URI): config.json + model.safetensors (save_unet),
    training_state.pt (completed epochs + optimizer state: tensors, numbers, strings only) and
    metrics.json. Returns the weights' sha256."""
    import torch

    from ..models.unet import save_unet

    digest = save_unet(network, directory, storage_options)
    buffer = io.BytesIO()
    torch.save({"epoch": int(epoch), "optimizer": optimizer.state_dict()}, buffer)
    fs, root, _ = _fs(directory, storage_options)
    with fs.open(f"{root}/{STATE_FILE}", "wb") as f:
        f.write(buffer.getvalue())
    with fs.open(f"{root}/{METRICS_FILE}", "w") as f:
        f.write(json.dumps({"epoch": epoch, "history": history}, indent=2))
    return digest


def load_training_state(directory: str, storage_options: dict | None = None) -> dict | None:
    """training_state.pt of a checkpoint ({"epoch", "optimizer"}), or None when it has none.

    Loaded with weights_only=True: tensors and plain values only, never pickled code.
    """
    import torch

    fs, root, _ = _fs(directory.rstrip("/"), storage_options)
    path = f"{root}/{STATE_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        raise WeightsError(f"{path} is not a rayseg training state")
    return state


def load_history(directory: str, storage_options: dict | None = None) -> list[dict]:
    fs, root, _ = _fs(directory.rstrip("/"), storage_options)
    path = f"{root}/{METRICS_FILE}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        return list(json.load(f).get("history", []))


def read_checkpoint_epoch(directory: str, storage_options: dict | None = None) -> int:
    """Completed epochs recorded in a checkpoint (0 without training_state.pt)."""
    state = load_training_state(directory, storage_options)
    return 0 if state is None else state["epoch"]


# --- the training loop (runs on every Ray Train worker) --------------------------------------


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build or restore the network, then per epoch train on this
    worker's shard, validate (confusion matrices all-reduced), checkpoint and report."""
    import ray.train
    import ray.train.torch
    import torch

    from ..models.unet import UNet, UNetConfig, load_unet

    torch.set_num_threads(max(1, int(config["torch_threads"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    storage_options = config.get("storage_options") or None
    categories = parse_categories(config["categories"])
    num_classes = len(categories)

    # Where to start: Ray Train's own checkpoint when it restarts a failed run, else
    # --resume-from, else a fresh network.
    optimizer_state, start_epoch, history = None, 0, []
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            network, _ = load_unet(directory)
            state = load_training_state(directory)
            history = load_history(directory)
    elif config.get("resume_from"):
        network, _ = load_unet(config["resume_from"], storage_options=storage_options)
        state = load_training_state(config["resume_from"], storage_options)
        history = load_history(config["resume_from"], storage_options) if state else []
    else:
        torch.manual_seed(config["seed"])
        network = UNet(UNetConfig(categories=categories, width=config["width"], depth=config["depth"]))
        state = None
    if (restored is not None or config.get("resume_from")) and state is not None:
        start_epoch, optimizer_state = state["epoch"], state["optimizer"]

    model = ray.train.torch.prepare_model(network)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    epochs = config["epochs"]
    for epoch in range(start_epoch, epochs):
        started = time.time()
        steps_per_epoch, total_steps = config["steps_per_epoch"], config["steps_per_epoch"] * epochs
        lr = cosine_lr(config["lr"], epoch * steps_per_epoch, total_steps, warmup_steps(total_steps))
        rng = np.random.default_rng([config["seed"], epoch, rank])
        model.train()
        losses, compute_seconds = [], 0.0
        for batch in train_shard.iter_batches(
            batch_size=config["batch_size"], batch_format="numpy", local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=config["seed"] * 1000 + epoch * 10 + rank,
        ):
            step_started = time.time()
            lr = cosine_lr(config["lr"], epoch * steps_per_epoch + len(losses), total_steps, warmup_steps(total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = augment(batch["image"], batch["label"], rng, config["colour_jitter"], config["crop"], config["colour_shuffle"])
            x = normalise(torch.from_numpy(images).to(device))
            y = torch.from_numpy(labels).to(device).long()
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
            loss = segmentation_loss(logits.float(), y, config["dice_weight"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            compute_seconds += time.time() - step_started
        totals = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)

        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        if val_shard is not None:
            model.eval()
            with torch.inference_mode():
                for batch in val_shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy"):
                    x = normalise(torch.from_numpy(batch["image"]).to(device))
                    predicted = model(x).argmax(dim=1).cpu()
                    confusion += confusion_matrix(predicted, torch.from_numpy(batch["label"]), num_classes)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(confusion)
            dist.all_reduce(totals)
        miou, per_class, pixel_accuracy = iou_from_confusion(confusion.numpy())
        metrics = {
            "epoch": epoch + 1,
            "loss": float(totals[0] / max(totals[1], 1)),
            "first_batch_loss": losses[0] if losses else None,
            "last_batch_loss": losses[-1] if losses else None,
            "batches": len(losses),
            "lr": lr,
            "val_mIoU": miou,
            "val_pixel_accuracy": pixel_accuracy,
            "val_IoU": {c.name: v for c, v in zip(categories, per_class)} if val_shard is not None else {},
            "seconds": round(time.time() - started, 2),
            "train_step_seconds": round(compute_seconds, 2),
        }
        history.append(metrics)
        if rank == 0:  # Ray forwards workers' stdout to the driver: one progress line per epoch
            print(
                f"epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f}, val mIoU "
                f"{'-' if miou is None else f'{miou:.3f}'}, {metrics['seconds']:.0f} s",
                flush=True,
            )

        with tempfile.TemporaryDirectory(prefix="rayseg-ckpt-") as local:
            checkpoint = None
            if rank == 0:
                network_host = _unwrap(model)
                save_checkpoint(network_host, optimizer, epoch + 1, history, local)
                name = f"epoch-{epoch + 1:04d}"
                save_checkpoint(network_host, optimizer, epoch + 1, history, posixpath.join(config["out"], EPOCHS_DIR, name), storage_options)
                save_checkpoint(network_host, optimizer, epoch + 1, history, config["out"], storage_options)
                checkpoint = ray.train.Checkpoint.from_directory(local)
            ray.train.report(
                {k: v for k, v in metrics.items() if k != "val_IoU"},
                checkpoint=checkpoint,
                checkpoint_dir_name=f"epoch-{epoch + 1:04d}",
            )


# --- the driver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResources:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    task_cpus: float
    torch_threads: int


def plan_train_resources(
    cluster: dict[str, float],
    *,
    nodes: int = 1,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
) -> TrainResources:
    """Training workers' CPUs/GPUs from the cluster (ray.cluster_resources()), refused early
    when impossible — GPUs on a cluster without any, or workers leaving no CPU for Ray
    Data's decode tasks (the run would hang instead of failing)."""
    from ..pipeline.resources import ResourceError, gpus_per, task_cpus

    cluster_cpus, cluster_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_worker = gpus_per(cluster, gpus_per_worker, cpus_per_worker, "worker")
    if workers is None:
        workers = max(1, math.floor(cluster_gpus / gpus_per_worker)) if gpus_per_worker > 0 else 1
    if workers < 1:
        raise ResourceError(f"--workers must be ≥ 1, got {workers}")
    if gpus_per_worker > 0 and workers * gpus_per_worker > cluster_gpus:
        raise ResourceError(f"{workers} workers × {gpus_per_worker:g} GPUs exceeds the cluster's {cluster_gpus:g} GPUs")
    tasks = task_cpus(cluster_cpus)
    if cpus_per_worker is None:
        # What two decode tasks leave, shared by the workers (at most 8 each): fractions
        # are scheduling tokens, so on a 2-CPU machine a worker and its data tasks share.
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else min(8.0, max(0.25, (cluster_cpus - 2 * tasks) / workers))
    if workers * cpus_per_worker + tasks > cluster_cpus:
        raise ResourceError(
            f"{workers} workers × {cpus_per_worker:g} CPUs leaves no CPU for Ray Data's decode tasks on a "
            f"cluster of {cluster_cpus:g} CPUs (the run would stall); lower --workers or --cpus-per-worker"
        )
    # A worker's torch threads: its CPUs rounded up — a CPU shared with the light decode tasks
    # is still mostly the worker's: a CPU-bound training step wants every core.
    return TrainResources(workers, float(cpus_per_worker), float(gpus_per_worker), tasks, max(1, math.ceil(cpus_per_worker)))


@dataclass
class TrainSummary:
    out: str
    run_id: str
    epochs: int
    start_epoch: int
    images: int
    train_images: int
    val_images: int
    categories: list[dict]
    resources: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def parse_size(text: str | None, option: str = "--size") -> tuple[int, int] | None:
    """'HxW' → (height, width)."""
    if text is None:
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise TrainingError(f"{option} takes HxW, e.g. 128x128, got {text!r}") from None
    if height < 1 or width < 1:
        raise TrainingError(f"{option} must be positive, got {text!r}")
    return height, width


def _first_image_size(uri: str, storage_options: dict | None) -> tuple[int, int]:
    from PIL import Image, ImageOps

    fs, path, _ = _fs(uri, storage_options)
    with fs.open(path, "rb") as f, Image.open(f) as image:
        width, height = ImageOps.exif_transpose(image).size
    return height, width


def train_unet(
    data: str,
    out: str,
    *,
    epochs: int = 10,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    batch_size: int = 8,
    lr: float = 2e-3,
    resume_from: str | None = None,
    val_fraction: float = 0.1,
    size: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    width: int | None = None,
    depth: int | None = None,
    dice_weight: float = 1.0,
    colour_jitter: float = 0.1,
    colour_shuffle: bool = False,
    seed: int = 0,
    categories_file: str | None = None,
    storage_options: dict | None = None,
    run_id: str | None = None,
    max_failures: int = 0,
) -> TrainSummary:
    """Trains (or resumes / fine-tunes) a U-Net on DATA with Ray Train; checkpoints go to OUT.

    Needs Ray initialised (the CLI connects). Argument, data and checkpoint errors raise
    TrainingError / WeightsError / ResourceError before any cluster work.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..models.unet import UNetConfig
    from ..pipeline.storage import absolute_uri, filesystem
    from .cluster import node_count
    from .runner import new_run_id

    started = time.time()
    storage_options = dict(storage_options or {})
    data, out = absolute_uri(data, storage_options), absolute_uri(out, storage_options)
    if resume_from:
        resume_from = absolute_uri(resume_from, storage_options)
    if epochs < 1:
        raise TrainingError(f"--epochs must be ≥ 1, got {epochs}")
    if batch_size < 1:
        raise TrainingError(f"--batch-size must be ≥ 1, got {batch_size}")
    if not lr > 0:
        raise TrainingError(f"--lr must be > 0, got {lr}")
    found = find_training_data(data, storage_options, categories_file)
    if found.skipped:
        log.warning("%d image(s) under %s/images have no label PNG and are left out of training", found.skipped, data.rstrip("/"))
    categories = found.categories

    start_epoch, history = 0, []
    if resume_from:
        from ..models.weights import read_bytes
        from ..models.unet import CONFIG_FILE, unet_weights_file

        weights_dir = posixpath.dirname(unet_weights_file(resume_from))
        saved = UNetConfig.from_json(read_bytes(posixpath.join(weights_dir, CONFIG_FILE), storage_options).decode())
        if [c.to_dict() for c in saved.categories] != [c.to_dict() for c in categories]:
            raise TrainingError(
                f"--resume-from {resume_from} predicts {[c.name for c in saved.categories]} but {data} has "
                f"{[c.name for c in categories]}; the classes and their order must match"
            )
        for name, given, stored in (("width", width, saved.width), ("depth", depth, saved.depth)):
            if given is not None and given != stored:
                raise TrainingError(f"--{name} {given} differs from the checkpoint's {stored}; leave it out when resuming")
        width, depth = saved.width, saved.depth
        start_epoch = read_checkpoint_epoch(weights_dir, storage_options)
        resume_from = weights_dir
        if start_epoch >= epochs:
            raise TrainingError(f"{resume_from} has already trained {start_epoch} epochs; ask for more with --epochs (the total)")
    width = DEFAULT_WIDTH if width is None else width
    depth = DEFAULT_DEPTH if depth is None else depth
    UNetConfig(categories=categories, width=width, depth=depth)  # validates

    train_items, val_items = split_items(found.items, val_fraction, seed)
    size = size or _first_image_size(found.items[0]["image_uri"], storage_options)
    resources = plan_train_resources(
        ray.cluster_resources(),
        nodes=node_count(),
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
    )
    if len(train_items) < resources.workers:
        raise TrainingError(f"{len(train_items)} training images cannot feed {resources.workers} workers")

    fs, out_path = filesystem(out, storage_options)
    fs.makedirs(out_path, exist_ok=True)
    run_id = run_id or new_run_id()
    storage_path = posixpath.join(out.rstrip("/"), RAY_TRAIN_DIR)

    decode = DecodePairs([c.to_dict() for c in categories], size, storage_options)

    def pairs(items: list[dict]):
        blocks = max(1, min(len(items) // 8, 64))
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            decode, batch_size=8, batch_format="numpy", num_cpus=resources.task_cpus
        )

    datasets = {"train": pairs(train_items).randomize_block_order(seed=seed)}
    if val_items:
        datasets["val"] = pairs(val_items)
    config = {
        "categories": [c.to_dict() for c in categories],
        "width": width,
        "depth": depth,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "dice_weight": dice_weight,
        "colour_jitter": colour_jitter,
        "crop": list(crop) if crop else None,
        "colour_shuffle": bool(colour_shuffle),
        "seed": seed,
        "resume_from": resume_from,
        "out": out.rstrip("/"),
        "storage_options": storage_options,
        "has_val": bool(val_items),
        "torch_threads": resources.torch_threads,
        "shuffle_buffer": max(batch_size, min(4 * batch_size, 64)),
        # Each worker's shard is an equal split of the training images (Ray's streaming_split).
        "steps_per_epoch": math.ceil(len(train_items) // resources.workers / batch_size),
    }
    worker_resources = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        worker_resources["GPU"] = resources.gpus_per_worker
    log.info(
        "training U-Net (width %d, depth %d, %d classes) on %d images (%d held out) at %dx%d: epochs %d→%d, "
        "%d worker(s) × %g CPU / %g GPU",
        width, depth, len(categories), len(train_items), len(val_items), size[0], size[1], start_epoch, epochs,
        resources.workers, resources.cpus_per_worker, resources.gpus_per_worker,
    )  # fmt: skip
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=worker_resources,
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
    )
    # Per-epoch bars of every dataset pass would bury the per-epoch metric lines.
    context = ray.data.DataContext.get_current()
    progress_bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        trainer.fit()
    finally:
        context.enable_progress_bars = progress_bars
    history = load_history(out, storage_options)
    return TrainSummary(
        out=out,
        run_id=run_id,
        epochs=epochs,
        start_epoch=start_epoch,
        images=len(found.items),
        train_images=len(train_items),
        val_images=len(val_items),
        categories=[c.to_dict() for c in categories],
        resources=asdict(resources),
        history=history,
        seconds=time.time() - started,
    )
