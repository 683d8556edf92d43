"""Job specs: every error reported with its field path before any cluster work; flags and
specs are the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rayseg.jobs.cli import app
from rayseg.jobs.spec import RelabelSpec, SegmentSpec, SpecError, load_spec, parse_spec
from rayseg.models.registry import REGISTRY

runner = CliRunner()

GOOD = {
    "input": "s3://bucket/manifests/images.parquet",
    "output": "s3://bucket/masks/2026-11",
    "model": {"name": "unet", "weights": "s3://bucket/unet/", "score_threshold": 0.2},
    "resources": {"actors": "1:4", "gpus_per_actor": 1, "batch_size": 16},
    "storage": {"options": {"endpoint_url": "https://minio:9000"}, "env": {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}},
}


def write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_good_spec_parses_with_defaults_filled():
    spec = parse_spec(GOOD)
    assert isinstance(spec, SegmentSpec) and spec.kind == "segment"
    assert spec.model.weights == "s3://bucket/unet/" and spec.resources.actors == "1:4"
    assert spec.limit is None and spec.resume is False


def test_every_error_is_reported_with_its_field_path(tmp_path):
    bad = {
        "input": 3,
        "model": {"name": "nope", "weights": "random"},
        "resources": {"actors": "4:1", "batch_size": 0, "gpus": 1},
        "storage": {"options": {"secret": "hunter2"}},
    }
    with pytest.raises(SpecError) as raised:
        parse_spec(bad)
    errors = "\n".join(raised.value.errors)
    for expected in (
        "input: Input should be a valid string",
        "output: Field required",
        "model.name: unknown model 'nope'",
        "resources.actors:",
        "resources.batch_size:",
        "resources.gpus: Extra inputs are not permitted",
        "storage.options: inline secret(s) secret",
    ):
        assert expected in errors, expected
    assert "hunter2" not in str(raised.value), "a rejected secret is not echoed back"


def test_an_unknown_model_is_the_only_error_about_the_model():
    with pytest.raises(SpecError) as raised:
        parse_spec({"input": "a", "output": "b", "model": {"name": "nope"}})
    assert [e for e in raised.value.errors if e.startswith("model")] == [
        f"model.name: unknown model 'nope'; registered: {', '.join(sorted(REGISTRY))}"
    ]


@pytest.mark.parametrize("option", ["secret", "key", "token", "aws_secret_access_key", "password", "session_token"])
def test_inline_secrets_are_refused_whatever_they_are_called(option):
    with pytest.raises(SpecError, match="inline secret"):
        parse_spec({**GOOD, "storage": {"options": {option: "x"}}})


def test_inline_secrets_are_refused_however_deeply_nested():
    options = {"client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "hunter2"}}
    with pytest.raises(SpecError) as raised:
        parse_spec({**GOOD, "storage": {"options": options}})
    assert "inline secret(s) client_kwargs.aws_secret_access_key" in str(raised.value)
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"resume": True}, "resume: needs the run_id (--run-id)"),
        ({"model": {"name": "unet", "weights": "random", "score_threshold": 5}}, "model.score_threshold:"),
        ({"model": {"name": "unet", "weights": "random", "score_threshold": -0.1}}, "model.score_threshold:"),
        ({"model": {"name": "maskrcnn", "weights": "random", "score_threshold": 1.5}}, "must be 0 to 1 (its scores are the detection's class probability)"),
    ],
)
def test_what_only_a_run_would_find_wrong_is_found_by_validation(change, error):
    with pytest.raises(SpecError) as raised:
        parse_spec({**GOOD, **change})
    assert any(error in e for e in raised.value.errors), raised.value.errors


def test_a_score_threshold_is_taken_in_the_range_of_the_models_own_scores():
    # SAM's scores are predicted IoUs, not probabilities: a negative cut is a real choice.
    sam = parse_spec({**GOOD, "model": {"name": "sam", "weights": "random", "score_threshold": -2.5}})
    assert sam.model.score_threshold == -2.5
    with pytest.raises(SpecError) as raised:
        parse_spec({**GOOD, "model": {"name": "unet", "weights": "random", "score_threshold": -2.5}})
    assert any("model.score_threshold:" in e and "must be 0 to 1" in e for e in raised.value.errors), raised.value.errors


@pytest.mark.parametrize(
    ("schedule", "error"),
    [
        ("a b c d e", "minute 'a' is not a number, name, range, list or step"),
        ("0 24 * * *", "hour '24' is outside 0-23"),
        ("0 3 * 13 *", "month '13' is outside 1-12"),
        ("0 3 * * mon-funday", "day of week 'mon-funday' is not"),
        ("0 3 * *", "is not a 5-field cron expression"),
    ],
)
def test_a_relabel_schedule_is_checked_field_by_field(schedule, error):
    relabel = {"kind": "relabel", "source": "s3://b/i", "output_root": "s3://b/r", "model": {"name": "unet", "weights": "random"}}
    assert parse_spec({**relabel, "schedule": "*/15 0-6 1,15 jan-mar mon-fri"}).schedule
    with pytest.raises(SpecError) as raised:
        parse_spec({**relabel, "schedule": schedule})
    assert any(e.startswith("schedule:") and error in e for e in raised.value.errors), raised.value.errors


def test_secrets_come_from_the_environment_by_reference(monkeypatch):
    spec = parse_spec(GOOD)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")
    assert spec.storage.resolve() == {"endpoint_url": "https://minio:9000", "key": "id", "secret": "shh"}
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SpecError, match="AWS_SECRET_ACCESS_KEY"):
        spec.storage.resolve()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_detections": 5}, "does not take option"),
        ({"amp_dtype": "fp8"}, "amp_dtype"),
        ({"task": "panoptic"}, "model 'unet': option task must be one of semantic, instance, got 'panoptic'"),
        ({"min_area": -3}, "model 'unet': option min_area must be at least 0, got -3"),
        ({"min_area": "abc"}, "model 'unet': option min_area must be an integer, got 'abc'"),
    ],
)
def test_model_options_and_their_values_are_checked_against_the_model(options, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**GOOD, "model": {"name": "unet", "weights": "random", "options": options}})


@pytest.mark.parametrize("name", ["maskformer", "mask2former", "oneformer"])
def test_a_universal_models_task_is_checked_before_any_work(name):
    with pytest.raises(SpecError, match="task must be one of semantic, instance, panoptic, got 'depth'"):
        parse_spec({**GOOD, "model": {"name": name, "weights": "/w", "options": {"task": "depth"}}})


def test_relabel_specs_need_a_source_and_an_output_root_and_a_valid_schedule():
    spec = parse_spec({"kind": "relabel", "source": "s3://b/images", "output_root": "s3://b/relabel", "schedule": "0 3 * * *", "model": {"name": "unet", "weights": "random"}})
    assert isinstance(spec, RelabelSpec)
    with pytest.raises(SpecError) as raised:
        parse_spec({"kind": "relabel", "source": "s3://b/images", "schedule": "daily", "model": {"name": "unet", "weights": "random"}})
    assert any(e.startswith("output_root:") for e in raised.value.errors)
    assert any(e.startswith("schedule:") for e in raised.value.errors)


def test_an_unquoted_actor_range_in_yaml_stays_a_range(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("input: a\noutput: b\nmodel: {name: unet}\nresources: {actors: 1:8, batch_size: 4}\n")
    spec = load_spec(str(path))
    assert spec.resources.actors == "1:8" and spec.resources.batch_size == 4, "not 68, YAML 1.1's base-60 reading"


def test_validate_command_exits_2_listing_errors_and_0_for_a_good_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")
    good = runner.invoke(app, ["validate", str(write(tmp_path, GOOD))])
    assert good.exit_code == 0 and "valid segment spec" in good.output
    bad = runner.invoke(app, ["validate", str(write(tmp_path, {"model": {"name": "sam"}}, "bad.yaml"))])
    assert bad.exit_code == 2
    for field in ("input", "output", "model: weights"):
        assert f"{field}:" in bad.output
    assert "'sam' has no bundled weights" in bad.output
    missing = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert missing.exit_code == 2 and "not found" in missing.output


@pytest.mark.parametrize("shipped", sorted((Path(__file__).resolve().parents[1] / "infra" / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_a_shipped_spec_validates_as_shipped_and_names_the_variables_its_job_needs(shipped, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["validate", str(shipped)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout and "not set here: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in result.stderr
    strict = runner.invoke(app, ["validate", "--strict", str(shipped)])
    assert strict.exit_code == 2 and "error: storage.env: environment variable(s) not set here" in strict.stderr
    assert strict.stdout == ""


def test_a_spec_file_round_trips_through_yaml(tmp_path):
    spec = load_spec(str(write(tmp_path, GOOD)))
    assert spec == parse_spec(GOOD)


def test_command_line_flags_are_checked_as_a_spec():
    result = runner.invoke(app, ["segment", "in", "out", "--model", "unet", "--weights", "random", "--batch-size", "0", "--actors", "3:1"])
    assert result.exit_code == 2
    assert "resources.batch_size" in result.output and "resources.actors" in result.output
