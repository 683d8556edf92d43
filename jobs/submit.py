"""Submitting specs to a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from .cluster import storage_env
from .spec import RelabelSpec, SegmentSpec, dump_spec

SPEC_FILE = "spec.yaml"


def entrypoint(spec: SegmentSpec | RelabelSpec) -> str:
    """The command the job runs on the cluster, in the job's working directory."""
    return f"rayseg {'relabel' if isinstance(spec, RelabelSpec) else 'run'} {SPEC_FILE}"


def job_env(spec: SegmentSpec | RelabelSpec, environ: dict | None = None) -> dict[str, str]:
    """What the job's processes need from this environment: the variables the spec's storage
    section references, and the standard storage configuration (AWS_*, GOOGLE_*, ...)."""
    environ = os.environ if environ is None else environ
    referenced = {name: environ[name] for name in spec.storage.env.values() if name in environ}
    return {**storage_env(environ), **referenced}


def submit_spec(
    spec: SegmentSpec | RelabelSpec, address: str, *, submission_id: str | None = None
) -> tuple[JobSubmissionClient, str]:
    """Submits `spec` as a Ray job; returns the client and the submission id.

    The validated spec travels as the job's working directory; storage settings travel in
    its runtime environment's env vars (transported by Ray, never written to the spec).
    """
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="rayseg-job-") as workdir:
        (Path(workdir) / SPEC_FILE).write_text(dump_spec(spec))
        job_id = client.submit_job(
            entrypoint=entrypoint(spec),
            submission_id=submission_id,
            runtime_env={"working_dir": workdir, "env_vars": job_env(spec)},
            metadata={"rayseg_kind": spec.kind, "rayseg_model": spec.model.name},
        )
    return client, job_id


def wait_for(
    client: JobSubmissionClient, job_id: str, *, on_logs: Callable[[str], None] = print, poll: float = 1.0
) -> JobStatus:
    """Follows the job's logs until it ends; returns its final status."""
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            on_logs(logs[shown:])
            shown = len(logs)
        if status.is_terminal():
            return status
        time.sleep(poll)
