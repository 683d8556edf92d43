"""Instances from a semantic map: one scored instance per connected component of a thing class.

A semantic network (our U-Net) labels every pixel with a class; objects of a thing class
(`isthing`) that do not touch each other are separate connected components of that class's
pixels (8-connectivity: pixels touching at a corner belong together). Each component of at
least `min_area` pixels becomes an instance whose score is the mean probability of its class
over the component. Stuff classes (`isthing` false: background, sky, road) have no
instances and are left out. Touching objects of the same class merge into one instance:
the price of deriving instances from a semantic map.
"""

from __future__ import annotations

import numpy as np

from .categories import Category
from .segments import Segments

# 8-connectivity: diagonal neighbours are connected.
_STRUCTURE = np.ones((3, 3), dtype=bool)


def semantic_to_instances(
    labels: np.ndarray,
    probabilities: np.ndarray,
    categories: list[Category],
    *,
    min_area: int,
    score_threshold: float = 0.0,
) -> Segments:
    """One image's (H, W) channel indices and (H, W) probability of each pixel's class → instances.

    labels: int (H, W), index into `categories` (the network's argmax).
    probabilities: float (H, W), the softmax probability of the pixel's own class (so the
    mean over a component is the mean probability of its class).
    Returns segments of thing classes only, by class (in channel order), then by component
    (in raster order of their first pixel); each with a bool (H, W) mask.
    """
    # Imported here: scipy adds ~0.2 s to every actor's start, and only instance mode needs it.
    from scipy import ndimage

    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    masks, ids, scores = [], [], []
    present = np.unique(labels)
    for channel, category in enumerate(categories):
        if not category.isthing or channel not in present:
            continue
        components, count = ndimage.label(labels == channel, structure=_STRUCTURE)
        if count == 0:
            continue
        flat = components.ravel()
        areas = np.bincount(flat, minlength=count + 1)
        sums = np.bincount(flat, weights=probabilities.ravel(), minlength=count + 1)
        for component in range(1, count + 1):
            if areas[component] < max(min_area, 1):
                continue
            score = float(sums[component] / areas[component])
            if score < score_threshold:
                continue
            masks.append(components == component)
            ids.append(category.id)
            scores.append(score)
    if not masks:
        return Segments.empty(labels.shape)
    return Segments.of(np.stack(masks), ids, scores)
