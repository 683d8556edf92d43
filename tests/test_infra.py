"""infra/ against the package: the Dockerfile, the KubeRay and Kubernetes manifests, the
cluster-launcher YAML and the example specs parse, and the fields that matter agree with
rayseg itself — one image, Ray/Python/torch versions, real `rayseg` commands, embedded specs,
GPU/CPU counts, schedules, credentials only from the Secret. No cluster, no network."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import shlex
from copy import deepcopy
from importlib.metadata import metadata
from pathlib import Path
from urllib.parse import urlparse

import pytest
import ray
import typer
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from rayseg.jobs.cli import app
from rayseg.jobs.cron import parse_cron
from rayseg.jobs.spec import RelabelSpec, SegmentSpec, load_spec
from rayseg.jobs.submit import job_env
from rayseg.pipeline.resources import parse_actors, plan_resources

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = INFRA / "Dockerfile"
SPECS = {path.name: path for path in sorted((INFRA / "specs").glob("*.yaml"))}
KUBE_FILES = sorted([*(INFRA / "kuberay").glob("*.yaml"), *(INFRA / "kubernetes").glob("*.yaml")])
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
SECRET_NAME = "rayseg-storage"
DASHBOARD_PORT = 8265
# RayJobSpec's fields (ray-project/kuberay ray-operator/apis/ray/v1/rayjob_types.go; the
# RayCronJob CRD's spec.jobTemplate is the same struct).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
# RayCronJobSpec (raycronjob_types.go): schedule and jobTemplate required, suspend optional.
RAYCRONJOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend"}
# EC2 instance types the launcher YAML may use: (vCPUs, GPUs).
EC2_SHAPES = {
    "m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.12xlarge": (48, 4),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.4xlarge": (16, 1),
}  # fmt: skip


# --- reading ---------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


KUBE_DOCS = [(path, doc) for path in KUBE_FILES for doc in yaml_docs(path)]


def only(kind: str) -> tuple[Path, dict]:
    found = [(path, doc) for path, doc in KUBE_DOCS if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/, found {len(found)}"
    return found[0]


def cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in infra/: the RayCluster's and those RayJob/RayCronJob create."""
    return {
        "RayCluster": only("RayCluster")[1]["spec"],
        "RayJob": only("RayJob")[1]["spec"]["rayClusterSpec"],
        "RayCronJob": only("RayCronJob")[1]["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in dockerfile() if word == "ARG" and "=" in arg)


def walk(node, path=()):
    """Every (path, key, value) of nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, index))


def quantity(value) -> float:
    """A Kubernetes quantity ('7', '500m', '28Gi') as a number."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def pod(template: dict) -> dict:
    return template["template"]["spec"]


def container(template: dict) -> dict:
    containers = pod(template)["containers"]
    return containers[0]


def head_of(spec: dict) -> dict:
    return spec["headGroupSpec"]


def gpu_group(spec: dict) -> dict:
    groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in container(g)["resources"].get("limits", {})]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    return groups[0]


def secret_env(pod_spec: dict) -> dict[str, str]:
    """The env vars a Pod's first container gets from Secrets, with placeholder values."""
    env = {}
    for entry in pod_spec["containers"][0].get("env", []):
        if "secretKeyRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = "from-secret"
    return env


def registered_commands() -> dict:
    return typer.main.get_command(app).commands


def argv_of(value) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def mounted_spec(argv: list[str], pod_spec: dict, manifest: Path) -> Path:
    """The infra/specs file the command's SPEC argument names, after checking that the Pod
    mounts it from a ConfigMap of the same manifest that holds that file verbatim."""
    spec_path = Path(next(arg for arg in argv[2:] if arg.endswith(".yaml")))
    mounts = {m["mountPath"]: m["name"] for m in pod_spec["containers"][0].get("volumeMounts", [])}
    assert str(spec_path.parent) in mounts, f"{manifest.name}: {spec_path} is not mounted in the Pod that runs it"
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mounts[str(spec_path.parent)])
    configmaps = {doc["metadata"]["name"]: doc for path, doc in KUBE_DOCS if path == manifest and doc["kind"] == "ConfigMap"}
    assert volume["configMap"]["name"] in configmaps, f"{manifest.name}: ConfigMap {volume['configMap']['name']} not in the file"
    data = configmaps[volume["configMap"]["name"]]["data"]
    assert spec_path.name in data, f"{manifest.name}: ConfigMap has no key {spec_path.name}"
    assert spec_path.name in SPECS, f"{spec_path.name} is not one of infra/specs"
    assert data[spec_path.name] == SPECS[spec_path.name].read_text()
    return SPECS[spec_path.name]


def entrypoints() -> list[tuple[Path, list[str], dict]]:
    """(manifest, argv, Pod spec that runs it) for every rayseg command the manifests run."""
    path, rayjob = only("RayJob")
    found = [(path, argv_of(rayjob["spec"]["entrypoint"]), pod(head_of(rayjob["spec"]["rayClusterSpec"])))]
    path, cron = only("RayCronJob")
    template = cron["spec"]["jobTemplate"]
    found.append((path, argv_of(template["entrypoint"]), pod(head_of(template["rayClusterSpec"]))))
    path, cronjob = only("CronJob")
    job_pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    found.append((path, argv_of(job_pod["containers"][0]["command"]), job_pod))
    return found


# --- cron ------------------------------------------------------------------------------------

def cron_times(expression: str, days: int = 400) -> list[dt.datetime]:
    """When the schedule fires in `days` days from 2026-01-01 (Vixie cron's day rule)."""
    minutes, hours, doms, months, dows = parse_cron(expression)
    dom_any, dow_any = expression.split()[2] == "*", expression.split()[4] == "*"
    times = []
    for offset in range(days):
        day = dt.datetime(2026, 1, 1) + dt.timedelta(days=offset)
        dom_ok, dow_ok = day.day in doms, (day.weekday() + 1) % 7 in dows
        day_ok = dom_ok and dow_ok if (dom_any or dow_any) else dom_ok or dow_ok
        if day.month in months and day_ok:
            times += [day.replace(hour=h, minute=m) for h in sorted(hours) for m in sorted(minutes)]
    return times


def test_cron_parser_rejects_and_accepts():
    assert parse_cron("0 3 * * *")[1] == {3}
    assert parse_cron("*/15 0-6 1,15 jan-mar mon-fri")[0] == {0, 15, 30, 45}
    for bad in ("0 3 * *", "60 3 * * *", "0 24 * * *", "0 3 0 * *", "@daily"):
        with pytest.raises(ValueError):
            parse_cron(bad)
    gaps = {b - a for a, b in zip(cron_times("0 3 * * *"), cron_times("0 3 * * *")[1:])}
    assert gaps == {dt.timedelta(days=1)}


# --- files parse -----------------------------------------------------------------------------


def test_every_manifest_parses_with_the_kinds_infra_promises():
    kinds = sorted((doc["apiVersion"], doc["kind"]) for _, doc in KUBE_DOCS)
    assert kinds == sorted([
        ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCronJob"),
        ("batch/v1", "CronJob"), ("v1", "ConfigMap"), ("v1", "ConfigMap"), ("v1", "ConfigMap"),
    ])  # fmt: skip
    for path, doc in KUBE_DOCS:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path
    assert set(SPECS) == {"segment.yaml", "relabel.yaml"}
    assert yaml_docs(LAUNCHER)[0]["provider"]["type"] == "aws"


def test_example_specs_are_valid_specs_of_their_kind():
    assert isinstance(load_spec(str(SPECS["segment.yaml"])), SegmentSpec)
    assert isinstance(load_spec(str(SPECS["relabel.yaml"])), RelabelSpec)


def test_configmaps_embed_the_spec_files_verbatim():
    embedded = 0
    for path, doc in KUBE_DOCS:
        if doc["kind"] != "ConfigMap":
            continue
        for key, text in doc["data"].items():
            assert key in SPECS, f"{path.name}: ConfigMap key {key} is not a file of infra/specs"
            assert text == SPECS[key].read_text(), f"{path.name}: {key} differs from infra/specs/{key}"
            embedded += 1
    assert embedded == 3  # segment in the RayJob; relabel in the RayCronJob and the CronJob


# --- one image, the right versions -----------------------------------------------------------


def image_name() -> str:
    match = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "infra/Dockerfile's header gives the build command and the image name"
    return match.group(1)


def test_one_image_everywhere_tagged_with_the_package_version():
    image = image_name()
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    used = {(path.name, value) for path, doc in KUBE_DOCS for _, key, value in walk(doc) if key == "image"}
    launcher = yaml_docs(LAUNCHER)[0]
    used |= {(LAUNCHER.name, value) for _, key, value in walk(launcher) if key in ("image", "head_image", "worker_image")}
    assert {name for name, _ in used} >= {"raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "aws.yaml"}
    assert {value for _, value in used} == {image}, sorted(used)
    assert f"docker build -f infra/Dockerfile -t {image} ." in (INFRA / "README.md").read_text()


def test_base_image_is_the_installed_ray_on_a_supported_python_with_cuda():
    (base,) = [arg for word, arg in dockerfile() if word == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", base)
    assert match, f"FROM {base}: expected rayproject/ray:X.Y.Z-py3NN-gpu (or -cuNNN)"
    ray_version, minor = match.group(1), int(match.group(2))
    assert ray_version == ray.__version__
    (ray_requirement,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray_requirement.specifier.contains(ray_version)
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"3.{minor}")
    assert f"Programming Language :: Python :: 3.{minor}" in metadata("ray").get_all("Classifier")
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray_version, name


def test_dockerfile_installs_pyprojects_torch_pins_as_cuda_wheels():
    import torch

    pins = {r.name: str(r.specifier) for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
    args = dockerfile_args()
    assert f"=={args['TORCH_VERSION']}" == pins["torch"]
    assert f"=={args['TORCHVISION_VERSION']}" == pins["torchvision"]
    match = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d+)", args["TORCH_INDEX_URL"])
    assert match, "torch must come from PyTorch's CUDA wheel index"
    if torch.version.cuda:  # the build the project tests with
        assert match.group(1) == "cu" + torch.version.cuda.replace(".", "")
    runs = " ".join(arg for word, arg in dockerfile() if word == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "torch==${TORCH_VERSION}" in runs


def test_dockerfile_installs_the_package_after_its_dependencies_as_non_root():
    steps = dockerfile()
    words = [word for word, _ in steps]
    assert "HEALTHCHECK" not in words
    copies = [(i, arg) for i, (word, arg) in enumerate(steps) if word == "COPY"]
    (pyproject_at,) = [i for i, arg in copies if arg.split()[-2:] == ["pyproject.toml", "./"]]
    (source_at,) = [i for i, arg in copies if arg.split()[-2:] == [".", "./"]]
    installs = [(i, arg) for i, (word, arg) in enumerate(steps) if word == "RUN" and "pip install" in arg]
    assert all("--no-cache-dir" in arg for _, arg in installs)
    deps_at = [i for i, arg in installs if "requirements.txt" in arg]
    package_at = [i for i, arg in installs if re.search(r"pip install [^&]*\s\.(\s|$)", arg)]
    assert pyproject_at < deps_at[0] < source_at < package_at[0], "deps layer before the source layer"
    assert "rayseg " in steps[package_at[0]][1], "the build runs the installed `rayseg` from PATH"
    users = [arg for word, arg in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert all("--chown=1000:100" in arg for _, arg in copies)


def dockerignore() -> list[str]:
    path = INFRA / "Dockerfile.dockerignore"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern.removeprefix("**/")) for pattern in dockerignore())


def test_dockerignore_keeps_the_package_and_drops_local_state():
    for name in (".venv", "build", "demo", ".git", ".pytest_cache", "rayseg.egg-info", "__pycache__"):
        assert ignored(name), f"{name} must not be sent to the build"
    package_dirs = {p.split("/")[0] for p in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    package_dirs |= {name.split(".")[1] for name in PYPROJECT["tool"]["setuptools"]["packages"] if "." in name}
    for name in package_dirs | {"pyproject.toml", "README.md", "__init__.py"}:
        assert not ignored(name), f"{name} is needed to build the package"


def test_pyproject_lists_every_subpackage_the_image_installs():
    """The image installs the package non-editably: a package directory missing from
    pyproject's `packages` is missing from the image (editable installs hide it)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    top = [name.split(".")[1] for name in listed if name.count(".") == 1]
    found = {
        "rayseg." + ".".join(init.parent.relative_to(ROOT).parts)
        for name in top
        for init in (ROOT / name).rglob("__init__.py")
    }
    assert found <= listed, f"not in pyproject [tool.setuptools] packages: {sorted(found - listed)}"


# --- commands --------------------------------------------------------------------------------


def test_manifests_run_real_rayseg_commands_on_their_mounted_specs():
    commands = registered_commands()
    kinds = {"run": {"segment", "relabel"}, "relabel": {"relabel"}, "submit": {"segment", "relabel"}}
    seen = set()
    for manifest, argv, pod_spec in entrypoints():
        assert argv[0] == "rayseg", f"{manifest.name}: {argv}"
        assert argv[1] in commands, f"{manifest.name}: `rayseg {argv[1]}` is not a command ({sorted(commands)})"
        commands[argv[1]].make_context(f"rayseg {argv[1]}", argv[2:])  # raises on unknown options
        spec = load_spec(str(mounted_spec(argv, pod_spec, manifest)))
        assert spec.kind in kinds[argv[1]], f"{manifest.name}: `rayseg {argv[1]}` given a {spec.kind} spec"
        seen.add((manifest.name, argv[1], spec.kind))
    assert seen == {("rayjob.yaml", "run", "segment"), ("raycronjob.yaml", "relabel", "relabel"),
                    ("cronjob.yaml", "submit", "relabel")}  # fmt: skip


def test_cronjob_submits_to_the_rayclusters_head_service_with_forbid():
    _, cronjob = only("CronJob")
    _, raycluster = only("RayCluster")
    argv = argv_of(cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"])
    address = urlparse(argv[argv.index("--address") + 1])
    assert address.scheme == "http"
    assert address.hostname == f"{raycluster['metadata']['name']}-head-svc"  # KubeRay's Service name
    head_ports = {p["containerPort"] for p in container(head_of(raycluster["spec"]))["ports"]}
    assert address.port == DASHBOARD_PORT and address.port in head_ports
    assert "--wait" in argv
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# --- schedules -------------------------------------------------------------------------------


def test_schedules_equal_the_relabel_specs_and_are_valid_cron():
    schedule = load_spec(str(SPECS["relabel.yaml"])).schedule
    parse_cron(schedule)
    assert only("RayCronJob")[1]["spec"]["schedule"] == schedule
    cronjob = only("CronJob")[1]["spec"]
    assert cronjob["schedule"] == schedule
    assert cronjob.get("timeZone") in ("Etc/UTC", "UTC")  # RayCronJob's operator runs in UTC


def test_raycronjob_uses_the_real_crd_fields_and_never_overlaps_itself():
    _, cron = only("RayCronJob")
    spec = cron["spec"]
    assert {"schedule", "jobTemplate"} <= set(spec) <= RAYCRONJOB_SPEC_FIELDS
    template = spec["jobTemplate"]
    assert set(template) <= RAYJOB_SPEC_FIELDS, sorted(set(template) - RAYJOB_SPEC_FIELDS)
    times = cron_times(spec["schedule"])
    shortest = min(b - a for a, b in zip(times, times[1:]))
    # No concurrencyPolicy in RayCronJob: a run must end before the next one can start.
    assert 0 < template["activeDeadlineSeconds"] < shortest.total_seconds()


def test_rayjobs_delete_their_clusters():
    templates = {"RayJob": only("RayJob")[1]["spec"], "RayCronJob": only("RayCronJob")[1]["spec"]["jobTemplate"]}
    for name, spec in templates.items():
        assert set(spec) <= RAYJOB_SPEC_FIELDS, (name, sorted(set(spec) - RAYJOB_SPEC_FIELDS))
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, name
        assert "clusterSelector" not in spec, name  # they bring their own cluster


# --- cluster shape ---------------------------------------------------------------------------


def without_spec_volumes(spec: dict) -> dict:
    spec = deepcopy(spec)
    head_pod = pod(head_of(spec))
    head_pod.pop("volumes", None)
    head_pod["containers"][0].pop("volumeMounts", None)
    return spec


def test_rayjob_and_raycronjob_clusters_are_the_rayclusters():
    specs = {name: without_spec_volumes(spec) for name, spec in cluster_specs().items()}
    assert specs["RayJob"] == specs["RayCluster"]
    assert specs["RayCronJob"] == specs["RayCluster"]


@pytest.mark.parametrize("name", ["RayCluster", "RayJob", "RayCronJob"])
def test_gpu_worker_group_autoscales_and_its_ray_resources_match_the_pod(name):
    spec = cluster_specs()[name]
    assert spec["enableInTreeAutoscaling"] is True
    group = gpu_group(spec)
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"], "no room to autoscale"
    params, resources = group["rayStartParams"], container(group)["resources"]
    assert resources["requests"] == resources["limits"], "Ray sizes itself by the limits; requests must match"
    limits = resources["limits"]
    assert quantity(params["num-gpus"]) == quantity(limits["nvidia.com/gpu"]) >= 1
    assert quantity(params["num-cpus"]) == quantity(limits["cpu"])
    assert 0 < int(params["object-store-memory"]) <= 0.5 * quantity(limits["memory"])
    for key in params:
        assert isinstance(params[key], str), f"rayStartParams.{key} must be a string"


@pytest.mark.parametrize("name", ["RayCluster", "RayJob", "RayCronJob"])
def test_head_has_no_gpu_exposes_the_dashboard_and_holds_no_tasks(name):
    head = head_of(cluster_specs()[name])
    params, main = head["rayStartParams"], container(head)
    assert "nvidia.com/gpu" not in main["resources"].get("limits", {})
    assert quantity(params.get("num-gpus", "0")) == 0
    assert quantity(params["num-cpus"]) == 0, "drivers only: tasks and actors go to the workers"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["dashboard"] == DASHBOARD_PORT
    assert 0 < int(params["object-store-memory"]) <= 0.5 * quantity(main["resources"]["limits"]["memory"])


def starting_clusters() -> dict[str, tuple[dict, int, float]]:
    """name → (cluster resources when a job starts, nodes, GPUs at maxReplicas)."""
    found = {}
    for name, spec in cluster_specs().items():
        group, head = gpu_group(spec), head_of(spec)
        warm = group["minReplicas"]
        cpus = quantity(head["rayStartParams"]["num-cpus"]) + warm * quantity(group["rayStartParams"]["num-cpus"])
        gpus = quantity(group["rayStartParams"]["num-gpus"])
        found[name] = ({"CPU": cpus, "GPU": warm * gpus}, 1 + warm, group["maxReplicas"] * gpus)
    launcher = yaml_docs(LAUNCHER)[0]
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    (worker,) = [t for n, t in types.items() if n != launcher["head_node_type"]]
    warm = worker["min_workers"]
    cpus = head["resources"].get("CPU", 0) + warm * worker["resources"]["CPU"]
    found["cluster-launcher"] = (
        {"CPU": cpus, "GPU": warm * worker["resources"]["GPU"]}, 1 + warm, worker["max_workers"] * worker["resources"]["GPU"]
    )
    return found


@pytest.mark.parametrize("spec_name", ["segment.yaml", "relabel.yaml"])
@pytest.mark.parametrize("cluster", ["RayCluster", "RayJob", "RayCronJob", "cluster-launcher"])
def test_spec_resources_pass_rayseg_checks_on_each_cluster_as_it_starts(cluster, spec_name):
    """rayseg checks a job against the cluster when it starts (head + warm workers) and refuses
    what does not fit; the actor pool's maximum must fit the cluster at its maximum size."""
    resources, nodes, max_gpus = starting_clusters()[cluster]
    asked = load_spec(str(SPECS[spec_name])).resources
    plan = plan_resources(
        resources,
        nodes=nodes,
        actors=parse_actors(asked.actors),
        cpus_per_actor=asked.cpus_per_actor,
        gpus_per_actor=asked.gpus_per_actor,
        batch_size=asked.batch_size,
    )
    assert plan.gpus_per_actor > 0, "the examples run on the GPUs"
    assert plan.max_actors * plan.gpus_per_actor <= max_gpus, "actors beyond the GPUs at maxReplicas never start"


def test_cluster_launcher_node_types_agree_with_their_instances():
    launcher = yaml_docs(LAUNCHER)[0]
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert len(workers) == 1
    (worker,) = workers
    vcpus, gpus = EC2_SHAPES[worker["node_config"]["InstanceType"]]
    assert 0 < worker["resources"]["CPU"] <= vcpus and worker["resources"]["GPU"] == gpus >= 1
    assert EC2_SHAPES[head["node_config"]["InstanceType"]][1] == 0
    assert 0 <= worker["min_workers"] < worker["max_workers"] <= launcher["max_workers"]
    assert not any("pip install" in c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                   for c in launcher.get(key) or [])  # fmt: skip


# --- credentials -----------------------------------------------------------------------------

SECRETISH = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE", re.IGNORECASE)


def test_no_inline_secrets_anywhere():
    for path, doc in KUBE_DOCS:
        assert doc["kind"] != "Secret", f"{path.name}: Secrets are created by the operator, never committed"
        for _where, key, value in walk(doc):
            if key == "env":
                for entry in value:
                    if SECRETISH.search(entry["name"]):
                        assert "value" not in entry, f"{path.name}: {entry['name']} has an inline value"
                        assert entry["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME, path.name
            if key == "envFrom":
                for entry in value:
                    assert set(entry) <= {"secretRef", "configMapRef", "prefix"}, path.name
            if key == "secretKeyRef":
                assert value["name"] == SECRET_NAME, path.name
    literal = re.compile(r"(AKIA[0-9A-Z]{16}|(SECRET|PASSWORD|TOKEN)[A-Z_]*\s*[=:]\s*['\"]?[A-Za-z0-9/+]{16,})", re.IGNORECASE)
    for path in [p for p in INFRA.rglob("*") if p.is_file()]:
        assert not literal.search(path.read_text()), f"{path.relative_to(ROOT)}: looks like an inline secret"
    for word, arg in dockerfile():
        if word in ("ENV", "ARG"):
            assert not SECRETISH.search(arg.split("=")[0]), f"Dockerfile {word} {arg}: secrets never go in images"


def test_drivers_get_every_variable_their_specs_reference_from_the_secret():
    specs = [load_spec(str(path)) for path in SPECS.values()]
    for name, cluster in cluster_specs().items():
        head_env = secret_env(pod(head_of(cluster)))
        for spec in specs:
            spec.storage.resolve(head_env)  # SpecError if a referenced variable is missing
        assert secret_env(pod(gpu_group(cluster))) == head_env, f"{name}: workers read storage too"


def test_cronjob_submitter_carries_no_credentials_into_the_job():
    _, cronjob = only("CronJob")
    job_pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    environ = {entry["name"]: "x" for entry in job_pod["containers"][0].get("env", [])}
    assert "envFrom" not in job_pod["containers"][0]
    spec = load_spec(str(SPECS["relabel.yaml"]))
    assert job_env(spec, environ) == {}, "rayseg submit would copy these into the job's runtime_env"


# --- docs ------------------------------------------------------------------------------------


def test_infra_readme_covers_every_file():
    readme = (INFRA / "README.md").read_text()
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name != "README.md":
            relative = path.relative_to(INFRA).as_posix()
            assert relative in readme or f"{relative.split('/')[0]}/" in readme, f"infra/README.md never mentions {relative}"
    assert "RayCronJob" in readme and "feature gate" in readme
