"""A segment run over a directory holding one image that kills any process decoding it.

    RAY_TMPDIR=/tmp/short python -m rayseg.tests.poison_run IMAGES OUTPUT GPUS

Run by tests/test_reliability.py in a subprocess, with a local Ray of its own: every Ray
worker runs `kill_on_poison` when it starts (Ray's `worker_process_setup_hook`), so the
inference actor or decode task that decodes the poisoned file SIGKILLs itself, as the
kernel's or Ray's out-of-memory killer would. Prints a JSON summary as its last line of stdout (exit
status 1 when the run failed or stalled).

RAY_TMPDIR must be set (to a short private directory): see tests/node_loss_run.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from rayseg.tests.own_ray_script import run_script

# Without the fix the run never ends; with it, three actor restarts take ~20 s here.
RUN_DEADLINE_S = 150


POISON = b"rayseg-test-poison"


def kill_on_poison() -> None:
    """Makes this process SIGKILL itself when it decodes a file holding POISON (a PNG text
    chunk, say)."""
    from rayseg.pipeline import decode

    decode_content = decode._decode_content

    def killing_decode_content(content, *args, **kwargs):
        if isinstance(content, bytes) and POISON in content:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode_content(content, *args, **kwargs)

    decode._decode_content = killing_decode_content


def main(images: str, output: str, gpus: str = "0") -> dict:
    """gpus: "1" fakes a GPU for scheduling, so images decode in tasks and reach the
    inference actor decoded, as on GPU clusters; "0" decodes in the (CPU) actors."""
    import ray

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    ray.init(
        num_cpus=2,
        num_gpus=int(gpus),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "rayseg.tests.poison_run.kill_on_poison"},
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        plan = plan_resources(ray.cluster_resources(), batch_size=4)
        assert plan.cpu_stages_in_actors == (gpus == "0"), plan
        rows = segment(read_source(images), ModelSpec("unet"), plan)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = write_run(rows, output, run_id="poison", run_info={}, write_cpus=plan.task_cpus)
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
                outcome["error"] = f"{type(e).__name__}: {e}"

        started = time.monotonic()
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(RUN_DEADLINE_S)
        if runner.is_alive():
            outcome["error"] = f"no result after {RUN_DEADLINE_S} s"
        summary = outcome.get("summary")
        return {
            "error": outcome.get("error"),
            "images": summary and summary.images,
            "ok": summary and summary.ok,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        ray.shutdown()


if __name__ == "__main__":
    run_script(main)
