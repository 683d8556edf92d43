"""Job specs: one YAML file says what a run is. `rayseg segment` flags build the same model.

    kind: segment                       # or: relabel
    input: s3://bucket/manifests/images.parquet
    output: s3://bucket/masks/2026-11
    image_root: s3://bucket/images      # for manifests / COCO json with relative names
    prompts: s3://bucket/labels/instances.json   # SAM box prompts (COCO json or a run's OUTPUT)
    model:
      name: unet
      weights: s3://bucket/models/unet/
      weights_sha256: null
      score_threshold: null
      options: {}                       # the model's own options (`rayseg models`)
      text: "car, person"               # text-prompted models (sam3, grounded-sam): options.text
    resources: {actors: "1:4", gpus_per_actor: 1, cpus_per_actor: 1, batch_size: 16, gpu_decode: false}
    storage:
      options: {endpoint_url: "https://minio.internal:9000"}   # never secrets
      env: {key: AWS_ACCESS_KEY_ID, secret: AWS_SECRET_ACCESS_KEY}  # option ← env var

A relabel spec names `source` and `output_root` (and an informational `schedule`) instead
of input and output. Secrets are only ever referenced by environment variable name.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..models.registry import (
    REGISTRY,
    check_options,
    check_score_threshold,
    get_entry,
    unknown_model,
)
from ..models.text_prompts import split_text
from ..models.weights import RANDOM
from ..pipeline.file_size import FILE_MIB
from ..pipeline.resources import parse_actors
from .cron import parse_cron

# Storage option names whose values are credentials: allowed only by env reference.
SECRET_OPTION = re.compile(r"(secret|password|passwd|token|credential|private|key$|^key|session)", re.IGNORECASE)


class SpecError(ValueError):
    """A spec that cannot run; `errors` lists every problem as 'field.path: message'."""

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Both kinds of spec write their rows through the same sink.
OutputFileMib = Annotated[
    float, Field(FILE_MIB, gt=0, description="MiB of rows (in memory) per output file; Parquet's file is smaller")
]


class ModelSection(Strict):
    name: str
    weights: str = Field(description="checkpoint path or URI, or 'random' [the model's bundled weights, if any]")
    weights_sha256: Optional[str] = None
    score_threshold: Optional[float] = Field(
        None, description="drop segments scoring below it (`rayseg models`: what each model's score is, its range)"
    )
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def default_weights(cls, data: Any) -> Any:
        """Weights left out mean the model's bundled weights (`rayseg models`), where it has any."""
        if isinstance(data, dict) and data.get("weights") is None and data.get("name") not in REGISTRY:
            # An unknown name is the error to report: no second one for the weights.
            return {**data, "weights": RANDOM}
        if isinstance(data, dict) and data.get("weights") is None:
            default = REGISTRY[data["name"]].default_weights
            if default is None:
                raise ValueError(
                    f"weights: model {data['name']!r} has no bundled weights; give a checkpoint path or URI, or 'random'"
                )
            data = {**data, "weights": default}
        return data

    @model_validator(mode="before")
    @classmethod
    def text_is_an_option(cls, data: Any) -> Any:
        """`text:` (a list of phrases, or one string "car, person") is the model's `text` option."""
        if not isinstance(data, dict) or data.get("text") is None:
            return data
        data = dict(data)
        text = data.pop("text")
        phrases = split_text(text) if isinstance(text, str) else text
        options = dict(data.get("options") or {})
        if options.setdefault("text", phrases) != phrases:
            raise ValueError(f"text {phrases} and options.text {options['text']} disagree: give one")
        return {**data, "options": options}

    @field_validator("name")
    @classmethod
    def registered(cls, name: str) -> str:
        if name not in REGISTRY:
            raise ValueError(unknown_model(name))
        return name

    @field_validator("score_threshold")
    @classmethod
    def within_the_models_scores(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        if "name" in info.data:  # else the name is the error to report
            check_score_threshold(info.data["name"], value)
        return value

    @field_validator("weights_sha256")
    @classmethod
    def hex_digest(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
            raise ValueError("must be 64 hexadecimal characters")
        return value

    @model_validator(mode="after")
    def known_options(self) -> ModelSection:
        check_options(self.name, self.options, self.weights)
        return self


class ResourcesSection(Strict):
    actors: Optional[Union[int, str]] = Field(None, description="N or 'MIN:MAX'")
    gpus_per_actor: Optional[float] = Field(None, ge=0)
    cpus_per_actor: Optional[float] = Field(None, gt=0)
    batch_size: Optional[int] = Field(None, ge=1)
    gpu_decode: bool = Field(
        False, description="GPU actors decode JPEGs with nvJPEG, in batches (ignored on CPU actors)"
    )
    scale_up_timeout_s: float = Field(
        0, ge=0, description="when the cluster lacks the resources asked, how long to let its autoscaler add them"
    )

    @field_validator("actors")
    @classmethod
    def actor_bounds(cls, value):
        parse_actors(value)
        return value


def _secret_paths(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the credential-named keys in `options`, nested mappings included."""
    found = []
    for key, value in options.items():
        path = f"{prefix}{key}"
        if SECRET_OPTION.search(str(key)):
            found.append(path)
        elif isinstance(value, dict):
            found += _secret_paths(value, f"{path}.")
    return found


class StorageSection(Strict):
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options, no secrets")
    env: dict[str, str] = Field(default_factory=dict, description="storage option ← environment variable name")

    @field_validator("options")
    @classmethod
    def no_inline_secrets(cls, options: dict[str, Any]) -> dict[str, Any]:
        secrets = sorted(_secret_paths(options))
        if secrets:
            example = (
                f"e.g. storage.env: {{{secrets[0]}: AWS_SECRET_ACCESS_KEY}}"
                if "." not in secrets[0]
                # storage.env fills top-level options only; nested ones come from the storage
                # library's own variables (AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...).
                else "or leave it to the storage library's own variables (AWS_SECRET_ACCESS_KEY, ...)"
            )
            raise ValueError(f"inline secret(s) {', '.join(secrets)}: reference an environment variable instead, {example}")
        return options

    def missing_env(self, environ: Optional[dict] = None) -> list[str]:
        """The environment variables `env` names that `environ` (this process's) lacks."""
        environ = os.environ if environ is None else environ
        return sorted(name for name in self.env.values() if name not in environ)

    def resolve(self, environ: Optional[dict] = None) -> dict[str, Any]:
        """The storage options with env references filled in; missing variables are an error."""
        environ = os.environ if environ is None else environ
        if missing := self.missing_env(environ):
            raise SpecError("storage.env", [f"storage.env: environment variable(s) not set: {', '.join(missing)}"])
        return {**self.options, **{option: environ[name] for option, name in self.env.items()}}


class SegmentSpec(Strict):
    kind: Literal["segment"] = "segment"
    input: str
    output: str
    image_root: Optional[str] = None
    model: ModelSection
    prompts: Optional[str] = Field(
        None, description="box prompts for a promptable model: a COCO json or a committed rayseg run's OUTPUT"
    )
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    limit: Optional[int] = Field(None, ge=1)
    output_file_mib: OutputFileMib
    run_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    resume: bool = False

    @model_validator(mode="after")
    def resume_needs_the_run_id(self) -> SegmentSpec:
        if self.resume and self.run_id is None:
            raise ValueError("resume: needs the run_id (--run-id) of the run to finish")
        return self

    @model_validator(mode="after")
    def prompts_need_a_promptable_model(self) -> SegmentSpec:
        if self.prompts is not None and get_entry(self.model.name).task != "promptable":
            promptable = ", ".join(sorted(n for n, e in REGISTRY.items() if e.task == "promptable"))
            raise ValueError(f"prompts: model {self.model.name!r} takes no prompts; promptable models: {promptable}")
        return self


class RelabelSpec(Strict):
    kind: Literal["relabel"]
    source: str
    output_root: str
    image_root: Optional[str] = None
    schedule: Optional[str] = Field(None, description="cron schedule, for the scheduler that runs it")
    model: ModelSection
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    output_file_mib: OutputFileMib

    @field_validator("schedule")
    @classmethod
    def cron(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parse_cron(value)
        return value


JobSpec = Annotated[Union[SegmentSpec, RelabelSpec], Field(discriminator="kind")]


class _Document(BaseModel):
    spec: JobSpec


def parse_spec(data: Any, source: str = "spec") -> SegmentSpec | RelabelSpec:
    """A validated spec from parsed YAML; SpecError lists every error with its field path."""
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): must be a mapping"])
    data = {"kind": "segment", **data}
    try:
        return _Document(spec=data).spec
    except ValidationError as e:
        errors = []
        for error in e.errors():
            # Drop pydantic's wrapper and union-branch names from the path.
            path = [str(p) for p in error["loc"][1:] if p not in ("segment", "relabel")]
            message = error["msg"].removeprefix("Value error, ")
            errors.append(f"{'.'.join(path) or '(top level)'}: {message}")
        raise SpecError(source, errors) from None


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, but `1:8` stays the string it looks like: YAML 1.1
    reads colon-separated digits as a base-60 number (`actors: 1:8` would be 68)."""


def _int_or_sexagesimal_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    text = loader.construct_scalar(node)
    return text if ":" in text else yaml.SafeLoader.construct_yaml_int(loader, node)


def _float_or_sexagesimal_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | str:
    text = loader.construct_scalar(node)
    return text if ":" in text else yaml.SafeLoader.construct_yaml_float(loader, node)


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _int_or_sexagesimal_text)
_SpecLoader.add_constructor("tag:yaml.org,2002:float", _float_or_sexagesimal_text)


def load_spec(path: str) -> SegmentSpec | RelabelSpec:
    """Reads and validates a YAML spec file (local path or fsspec URI)."""
    import fsspec

    try:
        with fsspec.open(path, "rt") as f:
            data = yaml.load(f, Loader=_SpecLoader)
    except FileNotFoundError:
        raise SpecError(path, [f"(file): not found: {path}"]) from None
    except yaml.YAMLError as e:
        raise SpecError(path, [f"(yaml): {e}"]) from None
    return parse_spec(data, path)


def dump_spec(spec: SegmentSpec | RelabelSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
