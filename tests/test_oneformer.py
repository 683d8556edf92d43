"""OneFormer: a tiny random checkpoint directory with its processor, a char-level CLIP
tokenizer and class info, loaded offline; post-processing equals OneFormerImageProcessor's
for every task; incomplete directories fail naming the missing file."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch

from rayseg.models.oneformer import build_oneformer
from rayseg.models.weights import WeightsError

from .test_maskformer import (
    MASK_THRESHOLD,
    SIZES,
    assert_independent_of_batch_neighbours,
    check_map,
    check_semantic,
    images,
    sharpen,
)

CLASS_INFO = {"0": {"name": "class_0", "isthing": 1}, "1": {"name": "class_1", "isthing": 1},
              "2": {"name": "class_2", "isthing": 0}, "3": {"name": "class_3", "isthing": 0}}  # fmt: skip
SEQ = 16
# The random queries overlap a lot: a low overlap ratio keeps segments to compare.
OVERLAP = 0.1


def tiny_config():
    from transformers import OneFormerConfig, SwinConfig

    swin = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    id2label = {i: f"class_{i}" for i in range(4)}
    return OneFormerConfig(
        backbone_config=swin, hidden_dim=32, mask_dim=32, conv_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
        encoder_layers=1, decoder_layers=2, num_attention_heads=4, num_queries=8, text_encoder_width=32,
        text_encoder_num_layers=1, text_encoder_context_length=SEQ, text_encoder_proj_layers=1, text_encoder_n_ctx=4,
        text_encoder_vocab_size=64, task_seq_len=SEQ, max_seq_len=SEQ, id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import (
        CLIPTokenizer,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
    )

    work = tmp_path_factory.mktemp("oneformer-parts")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase:
            vocab[char + suffix] = len(vocab)
    (work / "class_info.json").write_text(json.dumps(CLASS_INFO))
    # transformers 5 builds the tokenizer from `vocab` and `merges` (it ignores vocab_file /
    # merges_file: every word would be the unknown token and the three tasks' prompts equal).
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = OneFormerImageProcessor(
        class_info_file="class_info.json", repo_path=str(work), num_text=2, size={"shortest_edge": 64, "longest_edge": 128}
    )
    processor = OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer, max_seq_length=SEQ, task_seq_length=SEQ)
    torch.manual_seed(0)
    network = OneFormerForUniversalSegmentation(tiny_config()).eval()
    sharpen(network, 4)
    with torch.no_grad():  # distinct queries, so that they do not split every mask evenly
        network.model.transformer_module.queries_embedder.weight.normal_(0, 1.0)
    directory = tmp_path_factory.mktemp("oneformer")
    network.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def reference_outputs(model, image):
    """The network run directly on OneFormerProcessor's inputs for `image` alone, its task
    tokens included."""
    encoded = model.processor(images=[image], task_inputs=[model.task], return_tensors="pt")
    with torch.no_grad():
        return model.network(pixel_values=encoded["pixel_values"], task_inputs=encoded["task_inputs"])


def test_all_tasks_equal_the_image_processor_post_processing(checkpoint):
    """A mixed-size batch, each image against the processor and network run on it alone."""
    sizes = SIZES["maskformer"]  # the same resizing rule: each alone without padding
    batch_images = images(sizes, seed=2)
    counts = {}
    for task in ("semantic", "instance", "panoptic"):
        threshold = None if task != "panoptic" else 0.3
        model = build_oneformer(str(checkpoint), task=task, score_threshold=threshold, overlap_mask_area_threshold=OVERLAP)
        assert [c.isthing for c in model.categories] == [True, True, False, False]
        mine = model.postprocess(model.forward(model.preprocess(batch_images)), sizes)
        processor = model.processor.image_processor
        counts[task] = 0
        for image, size, segments in zip(batch_images, sizes, mine):
            outputs = reference_outputs(model, image)
            if task == "semantic":
                counts[task] += check_semantic(model, processor, outputs, [size], [segments])
            elif task == "instance":
                reference = processor.post_process_instance_segmentation(
                    outputs, task_type="instance", mask_threshold=MASK_THRESHOLD, overlap_mask_area_threshold=OVERLAP,
                    target_sizes=[size],
                )  # fmt: skip
                counts[task] += check_map(reference, [segments], panoptic=False)
            else:
                reference = processor.post_process_panoptic_segmentation(
                    outputs, threshold=threshold, mask_threshold=MASK_THRESHOLD, overlap_mask_area_threshold=OVERLAP,
                    label_ids_to_fuse={2, 3}, target_sizes=[size],
                )  # fmt: skip
                counts[task] += check_map(reference, [segments], panoptic=True)
    assert all(counts.values()), f"random weights must give segments to compare: {counts}"


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_a_prediction_never_depends_on_its_batch_neighbours(checkpoint, task):
    assert_independent_of_batch_neighbours(build_oneformer(str(checkpoint), task=task, overlap_mask_area_threshold=OVERLAP))


def test_task_tokens_come_from_the_checkpoint_tokenizer_and_differ_per_task(checkpoint):
    tokens = {}
    for task in ("semantic", "instance", "panoptic"):
        model = build_oneformer(str(checkpoint), task=task)
        assert model.task_tokens.shape == (1, SEQ)
        # What OneFormerProcessor itself gives as this task's input.
        expected = model.processor(images=[images([(48, 72)])[0]], task_inputs=[task], return_tensors="pt")["task_inputs"]
        assert torch.equal(model.task_tokens, expected)
        tokens[task] = model.task_tokens
    assert not torch.equal(tokens["semantic"], tokens["instance"])
    assert not torch.equal(tokens["semantic"], tokens["panoptic"])
    assert not torch.equal(tokens["instance"], tokens["panoptic"])


@pytest.mark.parametrize(
    "remove, named",
    [
        (["tokenizer.json"], "tokenizer.json"),
        (["processor_config.json"], "preprocessor_config.json"),
        (["model.safetensors"], "model.safetensors"),
    ],
)
def test_incomplete_directory_names_the_missing_file(checkpoint, tmp_path, remove, named):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    for name in remove:
        (broken / name).unlink()
    with pytest.raises(WeightsError, match=named.replace(".", r"\.")):
        build_oneformer(str(broken))


def test_class_info_file_is_read_locally_never_downloaded(checkpoint, tmp_path):
    """A hub-style directory: preprocessor_config.json naming a class_info_file (no saved
    metadata, repo_path on the hub). Without the file: an error naming it; with it: used."""
    hub_style = tmp_path / "hub"
    shutil.copytree(checkpoint, hub_style)
    saved = json.loads((hub_style / "processor_config.json").read_text())
    settings = {k: v for k, v in saved["image_processor"].items() if k != "metadata"}
    settings["repo_path"] = "shi-labs/oneformer_demo"
    settings["class_info_file"] = "shapes_panoptic.json"
    (hub_style / "processor_config.json").unlink()
    (hub_style / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(WeightsError, match=r"shapes_panoptic\.json"):
        build_oneformer(str(hub_style))
    info = {**CLASS_INFO, "1": {"name": "class_1", "isthing": 0}}
    (hub_style / "shapes_panoptic.json").write_text(json.dumps(info))
    model = build_oneformer(str(hub_style), task="semantic")
    assert [c.isthing for c in model.categories] == [True, False, False, False]


def test_random_weights_are_refused():
    with pytest.raises(WeightsError, match="tokenizer"):
        build_oneformer("random")
