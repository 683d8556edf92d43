"""Resource planning: sensible defaults per cluster, and requests that would hang refused up front."""

import pytest

from rayseg.pipeline.resources import TASK_CPUS, ResourceError, parse_actors, plan_resources


def test_two_core_cpu_machine_gets_one_actor_leaving_a_core_for_decode_and_encode():
    plan = plan_resources({"CPU": 2.0})
    assert (plan.min_actors, plan.max_actors) == (1, 1)
    assert plan.gpus_per_actor == 0
    assert plan.cpus_per_actor == 1.0
    assert plan.max_actors * plan.cpus_per_actor + TASK_CPUS <= 2
    assert plan.torch_threads == 2


def test_gpu_cluster_gets_one_actor_per_gpu():
    plan = plan_resources({"CPU": 32.0, "GPU": 4.0}, nodes=2)
    assert (plan.min_actors, plan.max_actors) == (1, 4)
    assert plan.gpus_per_actor == 1.0 and plan.cpus_per_actor == 1.0
    assert plan.batch_size == 16


def test_fractional_gpus_pack_several_actors_per_gpu():
    plan = plan_resources({"CPU": 8.0, "GPU": 1.0}, gpus_per_actor=0.5)
    assert plan.max_actors == 2


def test_asking_for_gpus_on_a_cluster_without_any_fails_fast():
    with pytest.raises(ResourceError, match="cluster has none"):
        plan_resources({"CPU": 2.0}, gpus_per_actor=1)


def test_actors_that_would_take_every_cpu_are_refused():
    with pytest.raises(ResourceError, match="leaves no CPU"):
        plan_resources({"CPU": 2.0}, actors=(2, 2), cpus_per_actor=1.0)
    plan = plan_resources({"CPU": 2.0}, actors=(1, 2), cpus_per_actor=0.5)
    assert plan.max_actors == 2


def test_more_actors_than_gpus_at_minimum_is_refused():
    with pytest.raises(ResourceError, match="exceeds the cluster's 1 GPUs"):
        plan_resources({"CPU": 8.0, "GPU": 1.0}, actors=(2, 2))


@pytest.mark.parametrize("text,bounds", [("3", (3, 3)), ("1:4", (1, 4)), (None, None), (2, (2, 2))])
def test_actors_parse_as_n_or_min_max(text, bounds):
    assert parse_actors(text) == bounds


@pytest.mark.parametrize("text", ["0", "3:1", "x", "1:y"])
def test_bad_actor_counts_are_refused(text):
    with pytest.raises(ResourceError):
        parse_actors(text)
