"""Shared fixtures: one local Ray for the whole session, and generated shapes datasets."""

from __future__ import annotations

import logging
import os

import pytest

from rayseg.jobs.fixtures import make_fixtures

# A credential the tests plant to prove it never reaches an output file or a log.
PLANTED_SECRET = "rayseg-test-secret-7f3a9c1e"
BUCKET = "rayseg-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, configured through the standard AWS_* env.

    Started before Ray so that local Ray workers inherit the same environment.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="rayseg-test-key",
        AWS_SECRET_ACCESS_KEY=PLANTED_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_endpoint):
    """Local Ray (2 CPUs, no dashboard) in a temp dir, shut down at the end of the session."""
    import ray

    from rayseg.jobs.ray_data_console import LOGGING_CONFIG, LOGGING_CONFIG_ENV

    os.environ.pop("RAY_ADDRESS", None)
    # Ray Data's console in Ray's processes as `rayseg` sets it for the local Ray it starts.
    os.environ.setdefault(LOGGING_CONFIG_ENV, str(LOGGING_CONFIG))
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


@pytest.fixture(scope="session")
def varied_unet(tmp_path_factory):
    """A small random U-Net saved in our format; its head is scaled up so that the predicted
    classes vary across each image instead of one class winning everywhere."""
    import torch

    from rayseg.models.unet import UNet, UNetConfig, save_unet

    torch.manual_seed(0)
    network = UNet(UNetConfig(width=4, depth=2))
    with torch.no_grad():
        network.head.weight.mul_(100)
    directory = tmp_path_factory.mktemp("unet")
    save_unet(network, str(directory))
    return directory


def same_segments(got: list[dict], want: list[dict]) -> None:
    """Output segments equal but for the rounding of scores: runs that batch images
    differently get different oneDNN kernels, whose float sums round differently."""
    assert [{**s, "score": None} for s in got] == [{**s, "score": None} for s in want]
    assert [s["score"] for s in got] == pytest.approx([s["score"] for s in want], abs=1e-5)
