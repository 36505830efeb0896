"""capray.sizing, capray.autoscaler, capray.connect, capray.console: sizing for a local machine vs a cluster, waiting for the autoscaler, starting Ray."""
from __future__ import annotations

import time

import pytest

from capray.autoscaler import ResourceWaitTimeout, wait_for_resources
from capray.config import ActorPool
from capray.connect import is_local
from capray.sizing import ActorPlan, Machine, plan_actors, plan_pipeline, task_cpus, worker_cpus


def test_a_cluster_plan_asks_what_one_node_gives_and_scales_the_pool():
    plan = plan_actors(ActorPool(), machine=None)
    assert (plan.min_actors, plan.max_actors, plan.num_cpus, plan.threads) == (1, None, 1.0, 1)
    strategy = plan.strategy()
    assert (strategy.min_size, strategy.max_size) == (1, float("inf"))


def test_a_cluster_gpu_plan_is_one_gpu_and_one_cpu_per_actor_up_to_the_maximum():
    plan = plan_actors(ActorPool(max_actors=8, gpus_per_actor=1.0), machine=None)
    assert plan.bundle() == {"CPU": 1.0, "GPU": 1.0}
    assert (plan.min_actors, plan.max_actors) == (1, 8)
    assert plan.remote_args() == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_fixed_actors_and_cpus_per_actor_are_taken_as_given_on_a_cluster():
    plan = plan_actors(ActorPool(actors=3, cpus_per_actor=4.0), machine=None)
    assert (plan.min_actors, plan.max_actors, plan.num_cpus, plan.threads) == (3, 3, 4.0, 4)
    assert plan.strategy().min_size == plan.strategy().max_size == 3


def test_a_local_plan_shares_a_small_machine_with_the_decode_tasks():
    plan = plan_actors(ActorPool(actors=2), machine=Machine(cpus=2, gpus=0), reserve_cpus=0.5)
    assert (plan.min_actors, plan.max_actors) == (2, 2)
    assert plan.num_cpus * 2 <= 2 - 0.5 + 1e-9  # room is left for decoding: no deadlock on 2 cores


def test_a_local_plan_fills_a_big_machine_with_one_actor():
    plan = plan_actors(ActorPool(), machine=Machine(cpus=16, gpus=0), reserve_cpus=1.0)
    assert (plan.min_actors, plan.num_cpus, plan.threads) == (1, 15.0, 15)


def test_a_local_plan_puts_one_actor_on_each_gpu():
    plan = plan_actors(ActorPool(gpus_per_actor=1.0), machine=Machine(cpus=16, gpus=4))
    assert (plan.min_actors, plan.max_actors, plan.num_gpus, plan.num_cpus) == (4, 4, 1.0, 1.0)


@pytest.mark.parametrize("kwargs,message", [
    ({"gpus_per_actor": 1.0}, "this machine has 0 GPUs"),
    ({"actors": -1}, "must not be negative"),
    ({"actors": 4, "max_actors": 2}, "below --actors"),
    ({"actors": 3, "cpus_per_actor": 1.0}, "exceed this machine's 2 CPUs"),
])
def test_impossible_local_plans_are_user_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):  # a negative or crossed count: the pool itself refuses it
        plan_actors(ActorPool(**kwargs), machine=Machine(cpus=2, gpus=0))


def test_task_and_worker_shares_are_fractional_only_on_a_small_local_machine():
    assert task_cpus(Machine(cpus=2, gpus=0), small=0.4, cluster=1.0) == 0.4
    assert task_cpus(Machine(cpus=16, gpus=0), small=0.4, cluster=1.0) == 1.0
    assert task_cpus(None, small=0.4, cluster=1.0) == 1.0
    assert worker_cpus(workers=2, machine=Machine(cpus=2, gpus=0)) == 0.5
    assert worker_cpus(workers=2, machine=None) == 1.0


@pytest.mark.parametrize("pool", [ActorPool(), ActorPool(actors=2)])
def test_one_pipeline_policy_leaves_a_small_machine_room_for_a_read_and_a_write_beside_its_actors(pool):
    """prepare, caption and evaluate plan alike. On 2 cores the actors leave room for one read task and
    one write task at once (a write that cannot start holds every finished row until the end)."""
    shares = plan_pipeline(pool, machine=Machine(cpus=2, gpus=0))
    assert (shares.read_cpus, shares.write_cpus) == (0.4, 0.1)
    assert shares.actors.min_actors * shares.actors.num_cpus + shares.read_cpus + shares.write_cpus <= 2 + 1e-9
    assert plan_pipeline(pool, machine=Machine(cpus=2, gpus=0), writes=False).write_cpus == 0.0


def test_on_a_cluster_a_read_task_is_a_whole_cpu_and_a_write_task_a_quarter():
    shares = plan_pipeline(ActorPool(gpus_per_actor=1.0), machine=None)
    assert (shares.read_cpus, shares.write_cpus, shares.actors.num_cpus, shares.actors.num_gpus) == (1.0, 0.25, 1.0, 1.0)


def test_local_means_no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert is_local()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not is_local()


def test_describe_names_counts_and_shares():
    assert ActorPlan(1, None, 1.0, 1.0, 1).describe() == "1..any actor(s) × 1 CPU + 1 GPU"
    assert ActorPlan(2, 2, 0.75, 0.0, 1).describe() == "2 actor(s) × 0.75 CPU, 1 thread(s)"


def test_waiting_for_what_no_node_has_ends_in_a_one_line_timeout(ray_local):
    started = time.monotonic()
    with pytest.raises(ResourceWaitTimeout, match=r"no room for 1 × \{CPU: 1, GPU: 1\} after 2 s"):
        wait_for_resources([{"CPU": 1, "GPU": 1}], timeout_s=2, what="caption")
    assert time.monotonic() - started < 10
    assert not isinstance(ResourceWaitTimeout("x"), ValueError)  # exit 1 (try again), not 2


def test_waiting_for_what_is_there_returns_at_once_and_frees_it(ray_local):
    import ray

    before = ray.available_resources().get("CPU", 0)
    wait_for_resources([{"CPU": 0.5}, {"CPU": 0.5}], timeout_s=30, what="test")
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < before and time.monotonic() < deadline:
        time.sleep(0.1)  # the placement group's removal is asynchronous
    assert ray.available_resources().get("CPU", 0) == before


def test_ray_datas_lagging_no_free_cpu_warning_stays_off_the_console_and_other_warnings_do_not(monkeypatch):
    import logging

    from capray.console import VERBOSE_ENV, quiet_ray_data

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    quiet_ray_data()
    quiet_ray_data()  # twice: one filter, not two
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    dataset_log = logging.getLogger("ray.data.dataset")
    dataset_log.addHandler(handler)
    try:
        dataset_log.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job "
                            "will hang unless more CPUs are freed up.")
        dataset_log.warning("a block could not be read")
    finally:
        dataset_log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["a block could not be read"]
    assert [getattr(f, "__name__", "") for f in dataset_log.filters].count("_no_free_cpu_warning") == 1


def test_a_job_servers_http_address_is_not_a_cluster_to_join(monkeypatch):
    """`export RAY_ADDRESS=http://localhost:8265` is for `ray job submit`; a command run in that shell is local."""
    for address in ("http://localhost:8265", "https://ray.example.com"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert is_local()
    for address in ("10.0.0.1:6379", "ray://head:10001", "auto"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert not is_local()
