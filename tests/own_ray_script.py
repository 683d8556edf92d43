"""The command-line end of the scripts that start a Ray cluster of their own
(tests/node_loss_run.py, tests/poison_run.py), which tests/test_reliability.py runs in a
subprocess: a process holds one Ray, and the test session already runs one."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


def run_script(main: Callable[..., dict]) -> None:
    """Runs `main(*arguments)` from the command line and prints its JSON summary as the
    last line of stdout; exit status 1 when the summary holds an error (the test then shows
    stderr: progress, diagnostics).

    RAY_TMPDIR must be set (to a short private directory): the cluster writes its address to
    RAY_TMPDIR/ray_current_cluster, which every `ray.init()` on the machine would otherwise
    find and join.
    """
    if "RAY_TMPDIR" not in os.environ:
        sys.exit("set RAY_TMPDIR to a private directory: the cluster's address is written there")
    # Without this, a Ray call after ray.shutdown() (a stalled run's thread) would join
    # whichever other Ray instance runs on this machine.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    result = main(*sys.argv[1:])
    print(json.dumps(result), flush=True)
    sys.exit(1 if result["error"] else 0)
