"""Peak memory of one large image's masks brought to full size and encoded, whole or in chunks.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.full_size_masks_memory whole|chunked

100 masks at the 4-megapixel size a model sees of a 24-megapixel (6000×4000) image, each a
box, brought to full size and RLE-encoded by an inference actor's `_masks_out`. "whole"
sets MASK_CHUNK_BYTES beyond any image (all masks at once, as before chunking); "chunked"
keeps the default. Prints the time, and the process's peak RSS before and after.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from rayseg.pipeline import masks as masks_module
from rayseg.pipeline.inference import EncodedMasks, ImageSegmenter
from rayseg.pipeline.model_spec import ModelSpec


def main(mode: str) -> None:
    if mode == "whole":
        masks_module.MASK_CHUNK_BYTES = 1 << 60
    segmenter = ImageSegmenter(ModelSpec("unet"), EncodedMasks(), torch_threads=1)
    small = torch.zeros((100, 1633, 2449), dtype=torch.bool)
    for i in range(100):
        small[i, (i * 13) % 1500 : (i * 13) % 1500 + 120, (i * 23) % 2300 : (i * 23) % 2300 + 140] = True
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    started = time.perf_counter()
    counts, areas, _ = segmenter._masks_out(small, (4000, 6000))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{mode}: {seconds:.2f} s, peak RSS {peak} MiB (before {before} MiB), {len(counts)} masks, area {int(areas.sum())}")


if __name__ == "__main__":
    main(sys.argv[1])
