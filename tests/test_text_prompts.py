"""Text prompts on the command line and in specs: `--text`, `--text-file` and `text:` give a
text-prompted model its phrases; every bad phrase list is refused with exit 2 before any
work (an empty list, a phrase too long for the checkpoint's tokenizer, a category file that
lacks a phrase, text for a model that takes none); each phrase is a category of the run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rayseg.jobs.cli import app, read_phrases
from rayseg.jobs.spec import SpecError, parse_spec
from rayseg.models.text_prompts import read_text_file, split_text, text_categories
from rayseg.models.weights import WeightsError
from rayseg.pipeline.model_spec import ModelSpec
from rayseg.pipeline.segment import declared_categories, pin_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def sam3_checkpoint(tmp_path_factory) -> str:
    from rayseg.models.sam3 import random_parts

    directory = tmp_path_factory.mktemp("sam3-text")
    network, processor = random_parts()
    network.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


@pytest.fixture(autouse=True)
def no_cluster_work(monkeypatch):
    """Every refusal here comes before the run connects to Ray."""
    from rayseg.jobs import cluster

    def connect(address):
        raise AssertionError("the run reached the cluster")

    monkeypatch.setattr(cluster, "connect", connect)


def refused(args: list[str], message: str) -> None:
    """`rayseg segment` with `args` exits 2 naming `message`."""
    result = runner.invoke(app, ["segment", "in/", "out/", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_text_is_comma_separated_and_a_text_file_is_one_phrase_a_line():
    assert split_text(" car, person ,bicycle") == ["car", "person", "bicycle"]
    assert read_text_file("# classes\ncar\n\nred car, parked\n", "f.txt") == ["car", "red car, parked"]
    with pytest.raises(ValueError, match="text file f.txt holds no phrases"):
        read_text_file("# nothing\n\n", "f.txt")


def test_an_empty_phrase_list_is_refused_before_any_work(tmp_path):
    refused(["--model", "sam3", "--weights", "random", "--text", ""], "phrase 1 of 1 is empty")
    refused(["--model", "sam3", "--weights", "random", "--text", "car,,person"], "phrase 2 of 3 is empty")
    refused(["--model", "sam3", "--weights", "random"], "give the phrases to find")
    empty = tmp_path / "phrases.txt"
    empty.write_text("\n# none\n")
    refused(["--model", "sam3", "--weights", "random", "--text-file", str(empty)], "holds no phrases")
    refused(["--model", "sam3", "--weights", "random", "--text-file", str(tmp_path / "missing.txt")], "text file not found")
    with pytest.raises(SpecError, match="the phrase list is empty"):
        parse_spec({"input": "in/", "output": "out/", "model": {"name": "sam3", "weights": "random", "text": []}})


def test_a_phrase_too_long_for_the_tokenizer_is_refused_before_any_work(sam3_checkpoint):
    long_phrase = "a very small red and white striped circle"  # 41 bytes: 43 tokens of the byte tokenizer
    refused(["--model", "sam3", "--weights", "random", "--text", f"car, {long_phrase}"], "is 43 tokens long")
    refused(["--model", "sam3", "--weights", sam3_checkpoint, "--text", long_phrase], "the model's text encoder takes 32")
    assert pin_weights(ModelSpec("sam3", sam3_checkpoint, options={"text": ["car"]})).weights_sha256


def test_a_checkpoint_without_a_tokenizer_file_is_refused_for_text(sam3_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "no-tokenizer"
    shutil.copytree(sam3_checkpoint, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        pin_weights(ModelSpec("sam3", str(copy), options={"text": ["car"]}))


def test_a_category_file_that_lacks_a_phrase_is_refused_before_any_work(tmp_path):
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"id": 3, "name": "car"}, {"id": 7, "name": "person"}]))
    refused(
        ["--model", "sam3", "--weights", "random", "--text", "car, bicycle", "--category-file", str(categories)],
        "the category file names no category 'bicycle'",
    )
    spec = ModelSpec("sam3", options={"text": ["person", "car"], "category_file": str(categories)})
    assert declared_categories(spec) == {
        "categories": [{"id": 7, "name": "person", "isthing": True}, {"id": 3, "name": "car", "isthing": True}]
    }
    assert [c.name for c in text_categories(None, text_categories(["car", "person"]))] == ["car", "person"]


def test_text_for_a_model_that_takes_none_and_text_given_twice_are_refused():
    refused(["--model", "unet", "--text", "car"], "does not take option(s) text")
    refused(["--model", "sam3", "--weights", "random", "--text", "car", "--text-file", "f.txt"], "give --text or --text-file, not both")
    refused(["--model", "sam3", "--weights", "random", "--text", "car", "--model-option", 'text=["bus"]'], "disagree")
    with pytest.raises(SpecError, match="disagree"):
        parse_spec({"input": "i", "output": "o", "model": {"name": "sam3", "weights": "random", "text": "car", "options": {"text": ["bus"]}}})


def test_a_spec_takes_text_as_a_string_or_a_list_and_it_is_the_models_text_option():
    for text in ("car, person", ["car", "person"]):
        spec = parse_spec({"input": "in/", "output": "out/", "model": {"name": "sam3", "weights": "random", "text": text}})
        assert spec.model.options == {"text": ["car", "person"]}
    assert read_phrases("car, bus", None, {}) == ["car", "bus"] and read_phrases(None, None, {}) is None
