"""The driver plans runs without torch: only the inference actors load it (pipeline/actor.py)."""

import subprocess
import sys


def test_planning_a_run_imports_no_torch_in_the_driver():
    probe = (
        "import sys\n"
        "import rayseg.jobs.cli, rayseg.jobs.runner, rayseg.pipeline.segment\n"
        "from rayseg.pipeline.actor import SegmentImages\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
