"""The driver plans runs without torch: only the inference actors load it (pipeline/actor.py).
Exports read committed runs through pipeline/run_reader.py, without evaluation code."""

import subprocess
import sys

HEAVY = "print(sorted(m for m in ('torch', 'torchvision', 'transformers', 'scipy') if m in sys.modules))\n"
EVALUATION = "print(sorted(m for m in sys.modules if m.startswith('rayseg.pipeline.evaluation')))\n"


def driver_modules_after(code: str, probe: str = HEAVY) -> str:
    """What `probe` prints in a fresh interpreter after running `code`: by default the heavy
    modules it holds."""
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code + probe], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_planning_a_run_imports_no_torch_in_the_driver():
    code = "import rayseg.jobs.cli, rayseg.jobs.runner, rayseg.pipeline.segment\nfrom rayseg.pipeline.actor import SegmentImages\n"
    assert driver_modules_after(code) == "[]"


def test_checking_every_model_s_options_and_pinning_weights_imports_no_model_code():
    code = (
        "from rayseg.models.registry import REGISTRY, check_options\n"
        "from rayseg.pipeline.segment import ModelSpec, pin_weights\n"
        "for name, entry in REGISTRY.items():\n"
        "    phrases = {'text': ['car']} if 'text' in entry.options.model_fields else {}\n"
        "    check_options(name, {'amp_dtype': 'bf16', **phrases})\n"
        "    entry.weights_file('checkpoints/' + name)\n"
        "pinned = pin_weights(ModelSpec('unet', REGISTRY['unet'].default_weights))\n"
        "assert len(pinned.weights_sha256) == 64\n"
        "pin_weights(ModelSpec('sam3', 'random', options={'text': ['car']}))  # phrases counted in tokens\n"
    )
    assert driver_modules_after(code) == "[]"


def test_exporting_predictions_imports_no_evaluation_module():
    code = "import rayseg.pipeline.export, rayseg.pipeline.panoptic_export\n"
    assert driver_modules_after(code, EVALUATION) == "[]"


def _module_imports() -> dict[str, set[str]]:
    """rayseg module → the rayseg modules it imports, at its top level or deferred into a
    function (a deferred import is still a dependency)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0] not in ("models", "pipeline", "jobs"):
            continue
        parts = ["rayseg", *relative.with_suffix("").parts]
        package = parts if parts[-1] == "__init__" else parts[:-1]
        name = ".".join(p for p in parts if p != "__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = [p for p in base if p != "__init__"]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                imported.add(target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rayseg."):
                imported.add(node.module)
        graph[name] = imported
    return graph


def test_the_layers_import_downwards_only_and_without_cycles():
    graph = _module_imports()
    for module, imported in graph.items():
        if module.startswith("rayseg.models"):
            assert not {m for m in imported if m.startswith(("rayseg.pipeline", "rayseg.jobs"))}, module
        if module.startswith("rayseg.pipeline"):
            assert not {m for m in imported if m.startswith("rayseg.jobs")}, module
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " → ".join([*path, module, target]))
            if target in graph and target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
