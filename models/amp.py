"""The `amp_dtype` option's values (models/device.py turns them into autocast dtypes).

Importable without torch: the driver checks a run's options before any model code loads.
"""

from __future__ import annotations

from typing import Literal, get_args

# auto: float16 on CUDA, full precision elsewhere; fp16/bf16: that autocast dtype anywhere;
# none: full precision everywhere.
AmpDtype = Literal["auto", "fp16", "bf16", "none"]
AMP_CHOICES: tuple[str, ...] = get_args(AmpDtype)
AMP_AUTO = AMP_CHOICES[0]


def check_amp_dtype(amp_dtype: str) -> str:
    """`amp_dtype` itself when it names an autocast setting; else ValueError naming the choices."""
    if amp_dtype not in AMP_CHOICES:
        raise ValueError(f"amp_dtype must be one of {', '.join(AMP_CHOICES)}, got {amp_dtype!r}")
    return amp_dtype
