"""FakeCluster (tests/fakecluster.py): the autoscaling multi-node cluster that job tests run on.

Each test starts its own head (0 CPUs, no worker up) and talks to it the way a job does: a driver
subprocess with `cluster.env()`. Node facts come from two sides: what the driver's tasks saw
(node id, RAY_NODE_TYPE_NAME, GPU ids) and what the GCS reports to the fixture.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fakecluster import DEFAULT_NODE_TYPES, FakeCluster, fake_cluster, fake_cluster_factory  # noqa: F401


# What a task or actor reports about where it runs.
_WHERE = """
    def where() -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_type": os.environ.get("RAY_NODE_TYPE_NAME"),
                "gpu_ids": ray.get_gpu_ids(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
"""


def _client(cluster: FakeCluster, body: str, *args: str, timeout: float = 90) -> dict:
    """Run `body` as a driver of the cluster (with `where()` defined); it prints one JSON object
    on its last line."""
    code = ("import json, os, sys, ray\nray.init(log_to_driver=False, namespace='fakecluster')\n"
            + textwrap.dedent(_WHERE) + textwrap.dedent(body))
    result = cluster.run([sys.executable, "-c", code, *args], timeout=timeout, check=True)
    lines = result.stdout.strip().splitlines()
    assert lines, f"the driver printed nothing; stderr:\n{result.stderr[-2000:]}"
    return json.loads(lines[-1])


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"  # a zombie has died; its parent has not reaped it yet


def test_config_has_the_shape_of_cluster_yaml(tmp_path):
    cluster = FakeCluster(DEFAULT_NODE_TYPES, tmp=tmp_path)  # not started: nothing runs
    types = cluster.config["available_node_types"]
    assert types["ray.head.default"]["resources"] == {"CPU": 0} and types["ray.head.default"]["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != "ray.head.default"}
    assert {name: t["min_workers"] for name, t in workers.items()} == {"cpu_2": 0, "gpu_1": 0}
    assert types["gpu_1"]["resources"]["GPU"] == 1
    assert cluster.config["provider"]["type"] == "fake_multinode"
    with pytest.raises(ValueError, match="min_workers"):
        FakeCluster({"cpu_2": {"resources": {"CPU": 2}, "min_workers": 3, "max_workers": 1}}, tmp=tmp_path)
    with pytest.raises(ValueError, match="head"):
        FakeCluster({"ray.head.default": {"CPU": 2}}, tmp=tmp_path)


@pytest.mark.slow
def test_task_on_an_empty_cluster_launches_a_cpu_node_and_runs_there(fake_cluster):
    assert fake_cluster.worker_nodes() == []
    (head,) = fake_cluster.nodes()
    assert head.is_head and head.resources.get("CPU", 0) == 0

    ran = _client(fake_cluster, """
        print(json.dumps(ray.get(ray.remote(num_cpus=1)(where).remote())))
    """)

    workers = fake_cluster.worker_nodes()
    assert [(n.node_id, n.node_type, n.resources) for n in workers] == [(ran["node_id"], "cpu_2", {"CPU": 2})]
    assert ran["node_type"] == "cpu_2"  # the node's own view agrees with the GCS's
    # Idle nodes go away (idle_timeout_s), so later tests see the cluster scale down too.
    fake_cluster.wait_for_workers(0, timeout=60)
    assert not fake_cluster.node(ran["node_id"]).alive


@pytest.mark.slow
def test_gpu_actor_lands_on_the_gpu_node_type_and_teardown_leaves_nothing(fake_cluster_factory):
    cluster = fake_cluster_factory()
    ran = _client(cluster, """
        @ray.remote(num_cpus=1, num_gpus=1)
        class Holder:
            def where(self):
                return where()  # no torch, no CUDA: the GPU is a logical resource only

        print(json.dumps(ray.get(Holder.remote().where.remote())))
    """)
    assert ran["gpu_ids"] == [0] and ran["cuda_visible_devices"] == "0"
    node = cluster.node(ran["node_id"])
    assert (node.node_type, node.resources) == ("gpu_1", {"CPU": 2, "GPU": 1}) and ran["node_type"] == "gpu_1"
    assert [n.node_type for n in cluster.worker_nodes()] == ["gpu_1"]

    ray_tmpdir = cluster.ray_tmpdir
    assert cluster.pids()
    cluster.shutdown()
    assert cluster.pids() == []
    assert not ray_tmpdir.exists()
    assert "Adding 1 node(s) of type gpu_1" in (cluster.log_dir / "monitor.log").read_text()  # the copied logs


@pytest.mark.slow
def test_killed_node_is_reported_dead_and_its_actor_restarts_on_a_replacement(fake_cluster):
    actor = """
        @ray.remote(num_cpus=1, max_restarts=1, max_task_retries=-1)
        class Holder:
            def where(self):
                return where()

        if sys.argv[1] == "create":
            holder = Holder.options(name="holder", lifetime="detached").remote()
        else:
            holder = ray.get_actor("holder")
        print(json.dumps({**ray.get(holder.where.remote()), "alive": {n["NodeID"]: n["Alive"] for n in ray.nodes()}}))
    """
    before = _client(fake_cluster, actor, "create")
    lost = before["node_id"]

    killed = fake_cluster.kill_node(lost)
    assert killed and not any(_running(pid) for pid in killed)
    dead = fake_cluster.wait_for_dead(lost, timeout=30)
    assert dead.death.startswith("UNEXPECTED_TERMINATION"), dead.death

    # The actor's next call waits for its restart, on a node the autoscaler launches once it has
    # released the dead one (idle_timeout_s after the death; see kill_node).
    after = _client(fake_cluster, actor, "get", timeout=90)
    assert after["alive"][lost] is False  # Ray's own view, from a driver
    assert after["node_id"] != lost and after["node_type"] == "cpu_2"
    assert [n.node_id for n in fake_cluster.worker_nodes()] == [after["node_id"]]


@pytest.mark.slow
def test_cluster_of_a_test_process_killed_outright_is_torn_down_by_its_watchdog(tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from fakecluster import FakeCluster

        cluster = FakeCluster(tmp=Path({str(tmp_path)!r})).start()
        print(json.dumps({{"pids": cluster.pids(), "ray_tmpdir": str(cluster.ray_tmpdir)}}), flush=True)
        time.sleep(300)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(owner.stdout.readline())
    finally:
        owner.kill()  # SIGKILL: no finalizer, no atexit
        owner.wait()
    assert started["pids"]
    deadline = time.monotonic() + 30
    while (any(_running(pid) for pid in started["pids"]) or Path(started["ray_tmpdir"]).exists()) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [pid for pid in started["pids"] if _running(pid)] == []
    assert not Path(started["ray_tmpdir"]).exists()
