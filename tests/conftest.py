"""Shared fixtures: one local Ray for the whole session, and generated shapes datasets."""

from __future__ import annotations

import os

import pytest

from rayseg.jobs.fixtures import make_fixtures


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Local Ray (2 CPUs, no dashboard) in a temp dir, shut down at the end of the session."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        object_store_memory=512 * 1024 * 1024,
        log_to_driver=False,
    )
    # Ray Data's progress bars only add noise to test output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """20 synthetic 64×64 shapes images with COCO / semantic / panoptic ground truth."""
    return make_fixtures(tmp_path_factory.mktemp("shapes"), images=20, size=(64, 64), seed=0)
