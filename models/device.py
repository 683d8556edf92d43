"""What every model does the same way on an accelerator: mixed precision, host→device copies.

- **Autocast.** Every builder takes `amp_dtype` (`--model-option amp_dtype=…`): `auto` (the
  default) runs the network under float16 autocast on CUDA and in full precision elsewhere;
  `fp16` or `bf16` ask for that autocast dtype on any device (bfloat16 keeps float32's
  range — prefer it on GPUs that have it, Ampere and later); `none` is full precision
  everywhere. Post-processing (thresholds, argmax, NMS) always runs in float32.
- **Copies.** Batches are assembled on the host directly in page-locked (pinned) memory when
  the model's device is CUDA — one copy from the decoded images, no second staging copy —
  and moved with `non_blocking=True`. torch's caching host allocator keeps freed pinned
  blocks, so same-sized batches reuse the same buffers. Images cross as uint8 (a quarter of
  float32's bytes) and become float on the device.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .amp import AMP_AUTO, check_amp_dtype
from .options import ModelOptions
from .weights import RANDOM

# --model-option amp_dtype values (models/amp.py) → the autocast dtype; "auto" is resolved per device.
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


def resolve_amp_dtype(amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `device` (None: full precision). `auto` → float16 on CUDA only."""
    check_amp_dtype(amp_dtype)
    if amp_dtype == AMP_AUTO:
        return torch.float16 if device.type == "cuda" else None
    return AMP_DTYPES[amp_dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` in `dtype`, or no autocast at all when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class DeviceModel:
    """What every model holds: its network in eval mode on its device, the autocast dtype
    its options ask there, the options themselves and the weights it was built from.

    channels_last: the network's memory format on CUDA, which cuDNN's convolutions prefer
    under autocast (convnets say so; transformers do not).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        options: ModelOptions,
        *,
        device: torch.device | str = "cpu",
        score_threshold: float | None = None,
        weights: str = RANDOM,
        weights_sha256: str | None = None,
        channels_last: bool = False,
    ):
        self.options = options
        self.device = torch.device(device)
        self.amp_dtype = resolve_amp_dtype(options.amp_dtype, self.device)
        self.network = network.to(self.device).eval()
        if channels_last and self.device.type == "cuda":
            self.network = self.network.to(memory_format=torch.channels_last)
        self.score_threshold = score_threshold
        self.weights = weights
        self.weights_sha256 = weights_sha256


def pins(device: torch.device) -> bool:
    """Whether host tensors bound for `device` should be page-locked: only for CUDA."""
    return device.type == "cuda"


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def host_batch(arrays: list[np.ndarray], pin: bool) -> torch.Tensor:
    """Same-shaped arrays → one tensor (N, *shape) of their dtype, on the host; page-locked
    when `pin`, written there directly (no intermediate stacked copy)."""
    first = arrays[0]
    batch = torch.empty((len(arrays), *first.shape), dtype=_torch_dtype(first.dtype), pin_memory=pin)
    np.stack(arrays, out=batch.numpy())
    return batch


def host_tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A host copy of `array` as a tensor (page-locked when `pin`): arrays from Ray's object
    store are read-only, which torch refuses to wrap without a copy."""
    tensor = torch.empty(array.shape, dtype=_torch_dtype(array.dtype), pin_memory=pin)
    tensor.numpy()[...] = array
    return tensor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: to CUDA from page-locked memory (pinned here if it is not yet),
    without blocking the host; strides are kept, so a permuted NHWC batch arrives as a
    channels_last NCHW tensor."""
    if tensor.device == device:
        return tensor
    if pins(device) and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
