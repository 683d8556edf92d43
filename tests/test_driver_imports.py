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
        "    check_options(name, {'amp_dtype': 'bf16'})\n"
        "    entry.weights_file('checkpoints/' + name)\n"
        "pinned = pin_weights(ModelSpec('unet', REGISTRY['unet'].default_weights))\n"
        "assert len(pinned.weights_sha256) == 64\n"
    )
    assert driver_modules_after(code) == "[]"


def test_exporting_predictions_imports_no_evaluation_module():
    code = "import rayseg.pipeline.export, rayseg.pipeline.panoptic_export\n"
    assert driver_modules_after(code, EVALUATION) == "[]"
