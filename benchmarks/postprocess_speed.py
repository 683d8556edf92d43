"""MaskFormer / Mask2Former post-processing at 1024×1024: ours vs the image processor's.

A network with a COCO-panoptic-sized head (100 queries, 133 classes: 80 things, 53 stuff)
on a tiny Swin backbone, random weights sharpened so that masks and classes are decisive
(segments exist in every task). One 1024×1024 image, resized as the published checkpoints'
processors do (PROCESSOR_SIZE), one forward pass; then, per task
and round, one after the other on the same outputs:

- ours: `model.postprocess(raw, [(1024, 1024)])` → Segments with full-size bool masks;
- transformers: `processor.post_process_{semantic,instance,panoptic}_segmentation(outputs,
  target_sizes=[(1024, 1024)])` → a segmentation map (panoptic, semantic) or binary maps
  (instance) and segments_info — not yet one mask per segment, which ours already are.

Both sides are checked to find the same segments (labels; mask IoU ≥ 0.99; scores within 1e-4)
before any time counts. Goal: ours ≥ 3× faster, same output.

Run: .venv/bin/python -m benchmarks.postprocess_speed [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

SIZE = (1024, 1024)
# The published checkpoints' settings: MaskFormer's COCO models resize to shortest edge 800;
# Mask2Former's to 384×384 (its post-processing assumes that size for all models).
PROCESSOR_SIZE = {"maskformer": {"shortest_edge": 800, "longest_edge": 1333}, "mask2former": {"height": 384, "width": 384}}
NUM_QUERIES = 100
THINGS, STUFF = 80, 53
TASKS = ("semantic", "instance", "panoptic")
# Semantic output keeps every class present (no threshold), as the processor does.
THRESHOLD = {"semantic": 0.0, "instance": 0.5, "panoptic": 0.5}


def network_config(name: str):
    """Tiny backbone, COCO panoptic-sized head."""
    from transformers import DetrConfig, Mask2FormerConfig, MaskFormerConfig, SwinConfig

    swin = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=224,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    id2label = {i: f"{'thing' if i < THINGS else 'stuff'}_{i}" for i in range(THINGS + STUFF)}
    common = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if name == "maskformer":
        decoder = DetrConfig(d_model=32, decoder_layers=1, decoder_ffn_dim=64, decoder_attention_heads=4, encoder_layers=1, num_queries=NUM_QUERIES)
        return MaskFormerConfig(backbone_config=swin, decoder_config=decoder, mask_feature_size=32, fpn_feature_size=32, num_queries=NUM_QUERIES, **common)
    return Mask2FormerConfig(
        backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=1, num_attention_heads=4, num_queries=NUM_QUERIES, **common,
    )  # fmt: skip


def sharpen(network, num_labels: int) -> None:
    """Random heads give near-uniform classes and blurry masks: make both decisive."""
    torch.manual_seed(1)
    mask_linears = []
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == num_labels + 1:
                module.weight.normal_(0, 3.0)
                module.bias.zero_()
            if isinstance(module, torch.nn.Linear) and "mask_embed" in name:
                mask_linears.append(module)
        mask_linears[-1].weight.mul_(20)


def checkpoint(name: str, directory: str) -> str:
    import transformers

    network_cls = {"maskformer": transformers.MaskFormerForInstanceSegmentation, "mask2former": transformers.Mask2FormerForUniversalSegmentation}[name]
    processor_cls = {"maskformer": transformers.MaskFormerImageProcessor, "mask2former": transformers.Mask2FormerImageProcessor}[name]
    torch.manual_seed(0)
    network = network_cls(network_config(name)).eval()
    sharpen(network, THINGS + STUFF)
    network.save_pretrained(directory)
    processor_cls(size=PROCESSOR_SIZE[name]).save_pretrained(directory)
    categories = [{"id": i, "name": f"c{i}", "isthing": i < THINGS} for i in range(THINGS + STUFF)]
    with open(os.path.join(directory, "categories.json"), "w") as f:
        json.dump(categories, f)
    return directory


def image() -> np.ndarray:
    """A 1024×1024 picture of flat regions and a gradient, so masks follow structure."""
    rng = np.random.default_rng(0)
    picture = np.zeros((*SIZE, 3), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, SIZE[0], 2)
        h, w = rng.integers(64, 512, 2)
        picture[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    picture[..., 2] = np.linspace(0, 255, SIZE[1], dtype=np.uint8)[None, :]
    return picture


def structured_outputs(raw, regions: int = 16, seed: int = 0):
    """Outputs shaped like the network's but as a trained model gives them: `regions` queries
    each own one rectangle of a random layout (mask logits ±6, smooth at the edges) with a
    confident class; the other queries say "no object". Returns (class_logits, mask_logits)."""
    generator = torch.Generator().manual_seed(seed)
    batch, queries, height, width = raw.mask_logits.shape
    num_labels = raw.class_logits.shape[-1] - 1
    owner = torch.zeros(height, width, dtype=torch.long)  # query 0: the background region
    for query in range(1, regions):
        top, left = (int(torch.randint(0, n - n // 8, (1,), generator=generator)) for n in (height, width))
        h, w = (int(torch.randint(n // 8, n // 2, (1,), generator=generator)) for n in (height, width))
        owner[top : top + h, left : left + w] = query
    inside = torch.nn.functional.one_hot(owner, queries).permute(2, 0, 1).float()
    smooth = torch.nn.functional.avg_pool2d(inside[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    mask_logits = (12 * smooth - 6 + 0.5 * torch.randn(queries, height, width, generator=generator))[None].expand(batch, -1, -1, -1)
    class_logits = torch.zeros(batch, queries, num_labels + 1)
    labels = torch.randint(0, num_labels, (regions,), generator=generator)
    labels[0] = THINGS  # the background region is stuff
    class_logits[:, torch.arange(regions), labels] = 9.0
    class_logits[:, regions:, num_labels] = 9.0  # no object
    return class_logits.contiguous(), mask_logits.contiguous()


def reference(processor, outputs, task: str, stuff: set[int]):
    if task == "semantic":
        return processor.post_process_semantic_segmentation(outputs, target_sizes=[SIZE])
    if task == "instance":
        return processor.post_process_instance_segmentation(outputs, threshold=THRESHOLD[task], target_sizes=[SIZE], return_binary_maps=True)
    return processor.post_process_panoptic_segmentation(
        outputs, threshold=THRESHOLD[task], mask_threshold=0.5, overlap_mask_area_threshold=0.8, label_ids_to_fuse=stuff, target_sizes=[SIZE]
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def same_output(task: str, segments, ref) -> int:
    """Asserts both sides found the same segments; returns their number."""
    (ref,) = ref
    if task == "semantic":
        semantic = ref.numpy()
        assert sorted(s.category_id for s in segments) == sorted(int(c) for c in np.unique(semantic)), (
            sorted(s.category_id for s in segments), np.unique(semantic))
        assert all(iou(s.mask, semantic == s.category_id) >= 0.99 for s in segments)
        return len(segments)
    infos = ref["segments_info"]
    if task == "panoptic":
        infos = list({info["id"]: info for info in reversed(infos)}.values())[::-1]  # fused stuff: one
    assert len(segments) == len(infos), (len(segments), len(infos))
    seg_map = ref["segmentation"]
    for info in infos:
        mask = (seg_map[infos.index(info)] > 0.5).numpy() if task == "instance" else (seg_map == info["id"]).numpy()
        assert any(
            s.category_id == info["label_id"] and abs(s.score - info["score"]) < 1e-4 and iou(s.mask, mask) >= 0.99 for s in segments
        ), f"no segment of ours matches {info}"
    return len(segments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="maskformer,mask2former")
    parser.add_argument(
        "--outputs", choices=("structured", "network"), default="structured",
        help="structured: a trained model's kind of outputs (16 regions); network: the random network's own",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rayseg.models.maskformer import build_mask2former, build_maskformer

    builders = {"maskformer": build_maskformer, "mask2former": build_mask2former}
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, {args.outputs} outputs, load average {os.getloadavg()[0]:.1f}")
    picture = image()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            directory = checkpoint(name, os.path.join(work, name))
            for task in TASKS:
                model = builders[name](
                    directory, task=task, score_threshold=THRESHOLD[task], category_file=os.path.join(directory, "categories.json")
                )
                groups = model.preprocess([picture])  # one image: one group
                ((_, batch),) = groups
                with torch.inference_mode():
                    ((indices, group),) = model.forward(groups)
                    outputs = model.network(**model._inputs(batch))
                if args.outputs == "structured":
                    class_logits, mask_logits = structured_outputs(group)
                    group = dataclasses.replace(group, class_logits=class_logits, mask_logits=mask_logits)
                    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
                raw = [(indices, group)]
                stuff = {i for i in range(THINGS, THINGS + STUFF)}
                ours = model.postprocess(raw, [SIZE])[0]
                count = same_output(task, ours, reference(model.processor, outputs, task, stuff))
                mine, theirs = [], []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    model.postprocess(raw, [SIZE])
                    mine.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    reference(model.processor, outputs, task, stuff)
                    theirs.append(time.perf_counter() - started)
                ours_s, theirs_s = statistics.median(mine), statistics.median(theirs)
                rows.append((name, task, count, ours_s, theirs_s))
                print(
                    f"{name:12s} {task:9s} segments {count:3d}  ours {ours_s * 1000:8.1f} ms  "
                    f"transformers {theirs_s * 1000:8.1f} ms  speed-up {theirs_s / ours_s:5.1f}×",
                    flush=True,
                )
    print(f"input {tuple(batch['pixel_values'].shape)}, mask logits {tuple(group.mask_logits.shape)}")


if __name__ == "__main__":
    main()
