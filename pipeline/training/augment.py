"""A training batch on its way into the network: random augmentation, then normalisation."""

from __future__ import annotations

import numpy as np


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


def normalise(images):
    """uint8 (N, H, W, 3) tensor → float (N, 3, H, W) exactly as UNetSegmenter.forward does."""
    import torch

    from ...models.unet import _MEAN, _STD

    mean = torch.tensor(_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.permute(0, 3, 1, 2).float() - mean) / std
