"""The training loss: cross-entropy plus soft dice, unlabelled pixels left out."""

from __future__ import annotations

from .data import IGNORE


def segmentation_loss(logits, labels, dice_weight: float = 1.0):
    """Cross-entropy (IGNORE pixels skipped) + dice_weight × soft multi-class dice loss.

    logits float (N, C, H, W), labels int64 (N, H, W) channel indices; a scalar tensor.
    """
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
