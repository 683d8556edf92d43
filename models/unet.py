"""U-Net (Ronneberger et al., 2015): our own semantic segmentation network.

A contracting path (two 3×3 conv blocks, 2×2 max-pool, channels doubling) and an
expanding path (2×2 transposed-convolution upsampling, concatenation with the skip
connection from the same level, two 3×3 conv blocks), then a 1×1 head with one channel
per class. Convolutions are padded ("same"), so the output has the input's size; any input
size is accepted by padding to a multiple of 2**depth and cropping back — the FCN property.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .categories import SHAPES, Category, parse_categories
from .checkpoint_files import CONFIG_FILE, unet_weights_file
from .checkpoint_files import SAFETENSORS_FILE as WEIGHTS_FILE
from .device import DeviceModel, autocast, pins, to_device
from .options import UNetOptions
from .segments import Segments
from .semantic import SizeGroupOutput, class_segments, size_groups
from .unet_instances import semantic_to_instances
from .weights import (
    RANDOM,
    WeightsError,
    random_network,
    read_bytes,
    read_checkpoint,
    stream_sha256,
)

# Inputs are scaled to [0, 1] and normalised with ImageNet statistics, the usual choice.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one axis: ⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(
    size: int, kernel: int, stride: int = 1, padding: int = 0, output_padding: int = 0, dilation: int = 1
) -> int:
    """Output length of a transposed convolution along one axis: (n − 1)s − 2p + d(k − 1) + op + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def padded_size(size: int, depth: int) -> int:
    """Smallest multiple of 2**depth ≥ size: what `depth` poolings halve exactly."""
    multiple = 2**depth
    return -(-size // multiple) * multiple


@dataclass
class UNetConfig:
    """Everything needed to rebuild the network; saved as config.json beside the weights.

    categories: one per output channel, in channel order.
    width: channels of the first level; level i has width * 2**i.
    depth: number of poolings (the bottleneck is at 1 / 2**depth resolution).
    """

    categories: list[Category] = field(default_factory=lambda: list(SHAPES))
    width: int = 16
    depth: int = 4
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1 or self.in_channels < 1:
            raise ValueError(f"U-Net width, depth and in_channels must be ≥ 1, got {self}")
        if not self.categories:
            raise ValueError("U-Net needs at least one category")

    def to_json(self) -> str:
        data = asdict(self)
        data["categories"] = [c.to_dict() for c in self.categories]
        return json.dumps({"architecture": "unet", **data}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> UNetConfig:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise WeightsError(f"U-Net config is not valid JSON: {e}") from e
        if not isinstance(data, dict) or "categories" not in data:
            raise WeightsError(f"U-Net config must be a JSON object with 'categories', got {text[:200]!r}")
        if data.pop("architecture", "unet") != "unet":
            raise WeightsError(f"config is not a U-Net config: {data}")
        categories = parse_categories(data.pop("categories"))
        unknown = set(data) - {"width", "depth", "in_channels"}
        if unknown:
            raise WeightsError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(categories=categories, **data)


class ConvBlock(nn.Sequential):
    """Two 3×3 same-padded convolutions, each followed by batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Transposed convolution ×2 upsampling, concatenation with the skip, conv block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """float (N, C_in, H, W) → logits float (N, num_classes, H, W), for any H, W ≥ 1."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths = [config.width * 2**level for level in range(config.depth + 1)]
        self.stem = ConvBlock(config.in_channels, widths[0])
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1]) for i in range(config.depth))
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i]) for i in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], len(config.categories), kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        depth = self.config.depth
        x = F.pad(x, (0, padded_size(width, depth) - width, 0, padded_size(height, depth) - height))
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)[..., :height, :width]


def load_unet(weights: str, *, sha256: str | None = None, storage_options: dict | None = None) -> tuple[UNet, str | None]:
    """Builds a U-Net from `weights` and returns it with the weights file's sha256.

    weights: "random" (the shapes-dataset config, random init), a checkpoint directory
    holding config.json + model.safetensors, or the .safetensors file itself with
    config.json beside it — each a local path or an fsspec URI.
    """
    if weights == RANDOM:
        return random_network("unet", lambda: UNet(UNetConfig())).eval(), None
    weights_uri = unet_weights_file(weights)
    config_uri = posixpath.join(posixpath.dirname(weights_uri), CONFIG_FILE)
    config = UNetConfig.from_json(read_bytes(config_uri, storage_options).decode())
    data, digest = read_checkpoint(weights_uri, sha256, storage_options)
    try:
        state = load_safetensors(data)
    except Exception as e:  # safetensors raises SafetensorError, which is no ValueError
        raise WeightsError(f"{weights_uri} is not a valid safetensors file: {e}") from e
    model = UNet(config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"{weights_uri} does not match its config {config_uri}: {e}") from e
    return model.eval(), digest


def save_unet(model: UNet, directory: str, storage_options: dict | None = None) -> str:
    """Writes config.json + model.safetensors under `directory`; returns the weights' sha256."""
    fs, root = fsspec.core.url_to_fs(directory, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save_safetensors(state)
    with fs.open(f"{root}/{WEIGHTS_FILE}", "wb") as f:
        f.write(data)
    with fs.open(f"{root}/{CONFIG_FILE}", "w") as f:
        f.write(model.config.to_json())
    return stream_sha256(io.BytesIO(data))[0]


class UNetSegmenter(DeviceModel):
    """The U-Net behind the model protocol: semantic output, one segment per class present.

    A segment's score is the mean softmax probability of its class over its pixels.
    options.task="instance": one segment per connected component (≥ min_area pixels) of
    each thing class instead, scored by its class's mean probability; stuff classes are
    left out (models/unet_instances.py).
    """

    name = "unet"

    def __init__(self, network: UNet, options: UNetOptions | None = None, **placement):
        super().__init__(network, options or UNetOptions(), channels_last=True, **placement)
        self.task = self.options.task
        self.score_threshold = self.score_threshold or 0.0
        self.categories = network.config.categories
        self._mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1) * 255

    def preprocess(self, images: list[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
        """uint8 (H, W, 3) images → size groups (models/semantic.py)."""
        return size_groups(images, pins(self.device))

    @torch.inference_mode()
    def forward(self, batch: list[tuple[list[int], torch.Tensor]]) -> list[SizeGroupOutput]:
        """Per size group: (indices, labels int64 (N, H, W), max probability float (N, H, W))."""
        outputs = []
        for indices, pixels in batch:
            x = (to_device(pixels, self.device).float() - self._mean) / self._std
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp_dtype):
                logits = self.network(x)
            probabilities, labels = logits.float().softmax(dim=1).max(dim=1)
            outputs.append((indices, labels, probabilities))
        return outputs

    @torch.inference_mode()
    def postprocess(self, raw: list[SizeGroupOutput], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Per image: one segment per class present (models/semantic.py), its mask made on
        the device; the instance task's components are found on the host."""
        if self.task == "instance":
            return self._instances(raw, sizes)
        return class_segments(raw, len(sizes), [c.id for c in self.categories], self.score_threshold)

    def _instances(self, raw: list[SizeGroupOutput], sizes: list[tuple[int, int]]) -> list[Segments]:
        """Connected components of the thing classes, on the host (scipy)."""
        results: list[Segments] = [Segments.empty(size) for size in sizes]
        for indices, labels, probabilities in raw:
            labels_host, probabilities_host = labels.cpu().numpy(), probabilities.float().cpu().numpy()
            for row, index in enumerate(indices):
                results[index] = semantic_to_instances(
                    labels_host[row], probabilities_host[row], self.categories,
                    min_area=self.options.min_area, score_threshold=self.score_threshold,
                )  # fmt: skip
        return results


def build_unet(
    weights: str = RANDOM,
    *,
    weights_sha256: str | None = None,
    device: str = "cpu",
    storage_options: dict | None = None,
    score_threshold: float | None = None,
    **options,
) -> UNetSegmenter:
    """The U-Net from `weights` (`load_unet`); options: UNetOptions (models/options.py)."""
    parsed = UNetOptions.parse("unet", options)
    network, digest = load_unet(weights, sha256=weights_sha256, storage_options=storage_options)
    return UNetSegmenter(
        network, parsed, device=device, score_threshold=score_threshold, weights=weights, weights_sha256=digest
    )
