"""Resource planning: sensible defaults per cluster, and requests that would hang refused up front."""

import pytest

from rayseg.models.registry import DATA_PARALLEL, REGISTRY, THREADED
from rayseg.pipeline.resources import ResourceError, parse_actors, plan_resources


def test_two_core_cpu_machine_gets_one_single_threaded_actor_per_core():
    plan = plan_resources({"CPU": 2.0})
    assert (plan.min_actors, plan.max_actors) == (1, 2)
    assert plan.gpus_per_actor == 0
    assert plan.torch_threads == 1, "two actors' single torch threads fill the two cores"
    assert plan.cpus_per_actor == 0.25 and plan.task_cpus == 0.25
    # A manifest reader (1 CPU), both actors, a decode and an encode task all fit at once.
    assert 1.0 + plan.max_actors * plan.cpus_per_actor + 2 * plan.task_cpus <= 2


def test_a_default_pool_starts_whole_and_an_explicit_one_at_its_minimum():
    assert plan_resources({"CPU": 2.0}).initial_actors == 2
    assert plan_resources({"CPU": 32.0, "GPU": 4.0}).initial_actors == 4
    assert plan_resources({"CPU": 16.0}, actors=(2, 6)).initial_actors == 2
    assert plan_resources({"CPU": 16.0}, actors=(3, 3)).initial_actors == 3


def test_a_small_input_starts_no_more_actors_than_it_has_model_batches():
    plan = plan_resources({"CPU": 32.0, "GPU": 4.0})  # batch 16, 4 actors
    assert [plan.for_rows(rows).initial_actors for rows in (1, 16, 17, 48, 64, 10_000)] == [1, 1, 2, 3, 4, 4]
    assert (plan.for_rows(1).min_actors, plan.for_rows(1).max_actors) == (1, 4), "the pool may still grow"
    explicit = plan_resources({"CPU": 16.0}, actors=(3, 6))
    assert explicit.for_rows(1).initial_actors == 3, "never below the minimum asked for"


def test_larger_cpu_machines_cap_the_model_copies_per_node_and_thread_the_rest():
    four = plan_resources({"CPU": 4.0})
    assert (four.max_actors, four.cpus_per_actor, four.torch_threads) == (4, 0.5, 1)
    sixteen = plan_resources({"CPU": 16.0})
    assert (sixteen.max_actors, sixteen.cpus_per_actor, sixteen.torch_threads) == (8, 1.0, 2)
    plan = plan_resources({"CPU": 64.0}, nodes=4)
    assert (plan.max_actors, plan.cpus_per_actor, plan.torch_threads, plan.task_cpus) == (32, 1.0, 1, 1.0)


def test_threaded_models_get_one_actor_per_node_with_a_thread_per_core():
    two = plan_resources({"CPU": 2.0}, cpu_parallelism=THREADED)
    assert (two.max_actors, two.cpus_per_actor, two.torch_threads) == (1, 0.5, 2)
    big = plan_resources({"CPU": 64.0}, cpu_parallelism=THREADED)
    assert (big.max_actors, big.cpus_per_actor, big.torch_threads) == (8, 4.0, 8)
    assert two.cpu_stages_in_actors


def test_each_model_family_says_how_it_runs_on_cpus():
    assert REGISTRY["unet"].cpu_parallelism == DATA_PARALLEL
    assert REGISTRY["maskrcnn"].cpu_parallelism == DATA_PARALLEL
    assert REGISTRY["sam"].cpu_parallelism == THREADED
    assert {entry.cpu_parallelism for entry in REGISTRY.values()} == {DATA_PARALLEL, THREADED}


def test_cpus_per_actor_given_sets_the_pool_size():
    plan = plan_resources({"CPU": 16.0}, cpus_per_actor=4.0)
    assert (plan.max_actors, plan.torch_threads) == (2, 8)


def test_cpu_actors_decode_and_encode_themselves_and_gpu_actors_leave_it_to_cpu_tasks():
    cpu = plan_resources({"CPU": 2.0})
    assert cpu.cpu_stages_in_actors
    gpu = plan_resources({"CPU": 8.0, "GPU": 1.0})
    assert not gpu.cpu_stages_in_actors


def test_gpu_cluster_gets_one_actor_per_gpu():
    plan = plan_resources({"CPU": 32.0, "GPU": 4.0}, nodes=2)
    assert (plan.min_actors, plan.max_actors) == (1, 4)
    assert plan.gpus_per_actor == 1.0 and plan.cpus_per_actor == 1.0
    assert plan.batch_size == 16


def test_fractional_gpus_pack_several_actors_per_gpu():
    plan = plan_resources({"CPU": 8.0, "GPU": 1.0}, gpus_per_actor=0.5)
    assert plan.max_actors == 2


def test_asking_for_gpus_on_a_cluster_without_any_fails_fast():
    with pytest.raises(ResourceError, match=r"cluster has none \(2 CPU, 0 GPU, 4.0 GiB memory\)"):
        plan_resources({"CPU": 2.0, "memory": 4 * 2**30}, gpus_per_actor=1)


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


def test_a_cluster_that_never_scales_up_is_refused_after_the_scale_up_timeout(ray_cluster):
    import time

    from rayseg.jobs.runner import plan_on_cluster
    from rayseg.jobs.spec import ResourcesSection

    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"cluster has none .*after waiting 2 s for the autoscaler"):
        plan_on_cluster(ResourcesSection(gpus_per_actor=1, scale_up_timeout_s=2), "unet")
    assert 2 <= time.monotonic() - started < 30


def test_an_explicit_cpu_share_still_starts_at_most_eight_actors_per_node():
    assert plan_resources({"CPU": 2.0}, cpus_per_actor=0.001).max_actors == 8
    assert plan_resources({"CPU": 64.0}, nodes=4, cpus_per_actor=0.01).max_actors == 32


def test_an_actor_that_fits_on_no_one_node_is_refused():
    two_nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    with pytest.raises(ResourceError, match=r"an actor of 1 CPUs and 2 GPUs fits on no node \(nodes: 2 CPUs 1 GPUs\)"):
        plan_resources({"CPU": 4.0, "GPU": 2.0}, nodes=2, gpus_per_actor=2, node_shapes=two_nodes)
    with pytest.raises(ResourceError, match="an actor of 3 CPUs and 0 GPUs fits on no node"):
        plan_resources({"CPU": 8.0}, nodes=4, cpus_per_actor=3, actors=(1, 1), node_shapes=[{"CPU": 2.0}] * 4)
    assert plan_resources({"CPU": 6.0}, nodes=2, cpus_per_actor=3, actors=(1, 1), node_shapes=[{"CPU": 4.0}, {"CPU": 2.0}])
    assert plan_resources({"CPU": 4.0, "GPU": 2.0}, nodes=2, node_shapes=two_nodes).max_actors == 2


def test_a_streamed_manifest_s_reader_keeps_its_cpu():
    plan_resources({"CPU": 2.0}, actors=(1, 1), cpus_per_actor=1.5)  # a listing: the pool may take that much
    with pytest.raises(ResourceError, match="and 1 for the manifest's reader on a cluster of 2 CPUs"):
        plan_resources({"CPU": 2.0}, actors=(1, 1), cpus_per_actor=1.5, reader_cpus=1.0)


def test_a_scale_up_request_asks_for_the_pool_as_planned_and_is_withdrawn(ray_cluster, monkeypatch):
    from ray.autoscaler import sdk

    from rayseg.jobs.runner import plan_on_cluster
    from rayseg.jobs.spec import ResourcesSection

    requests = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles: requests.append(bundles))
    with pytest.raises(ResourceError):
        plan_on_cluster(ResourcesSection(actors="1:3", cpus_per_actor=40, scale_up_timeout_s=1), "unet")
    assert requests == [[{"CPU": 40.0}] * 3, []], "CPU actors ask no GPU; the request does not outlive the plan"
