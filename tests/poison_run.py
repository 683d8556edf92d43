"""A segment run over a directory holding one image that kills any process decoding it.

    RAY_TMPDIR=/tmp/short python -m rayseg.tests.poison_run IMAGES OUTPUT

Run by tests/test_reliability.py in a subprocess, with a local Ray of its own: every Ray
worker runs `kill_on_poison` when it starts (Ray's `worker_process_setup_hook`), so an
inference actor that decodes a file named `poison*` SIGKILLs itself, as the kernel's or
Ray's out-of-memory killer would. Prints a JSON summary as its last line of stdout (exit
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


def kill_on_poison() -> None:
    """Makes this process SIGKILL itself when it is about to decode a file named poison*."""
    from rayseg.pipeline import decode

    decode_images = decode.decode_images

    def killing_decode_images(batch, *args, **kwargs):
        if any(os.path.basename(str(uri)).startswith("poison") for uri in batch["uri"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return decode_images(batch, *args, **kwargs)

    decode.decode_images = killing_decode_images


def main(images: str, output: str) -> dict:
    import ray

    from rayseg.pipeline.resources import plan_resources
    from rayseg.pipeline.segment import ModelSpec, segment
    from rayseg.pipeline.sink import write_run
    from rayseg.pipeline.sources import read_source

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "rayseg.tests.poison_run.kill_on_poison"},
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        plan = plan_resources(ray.cluster_resources(), batch_size=4)
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
