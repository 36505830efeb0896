"""FakeCluster (tests/fakecluster.py): the autoscaling multi-node cluster that job tests run on.

Each test starts its own head (0 CPUs, no worker up) and talks to it the way a job does: a driver
subprocess with `cluster.env()`. Scale-up from an empty cluster and lost nodes are exercised by
capray's own jobs in test_cluster_jobs.py; these tests cover what the fixture itself promises. Node facts come from two sides: what the driver's tasks saw
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

pytestmark = pytest.mark.extended  # the harness's own tests: make test-all, and CI when the harness changes

from killers import is_dead
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
    while (any(not is_dead(pid) for pid in started["pids"]) or Path(started["ray_tmpdir"]).exists()) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [pid for pid in started["pids"] if not is_dead(pid)] == []
    assert not Path(started["ray_tmpdir"]).exists()
