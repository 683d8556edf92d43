"""The learning-rate schedule: linear warm-up, then cosine decay."""

from __future__ import annotations

import math

# Learning rate at the last step, as a fraction of --lr (cosine decay in between).
FINAL_LR_FRACTION = 0.05
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 200


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
