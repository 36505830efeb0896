"""An autoscaling multi-node Ray cluster made of local processes, for tests.

Shaped like cluster.yaml: a head with 0 CPUs and worker node types that start at 0 nodes. Ray's
fake node provider (`provider: {type: fake_multinode}`, how Ray tests its own autoscaler) makes
the autoscaler, which runs in the head's `monitor.py` process, launch each "node" as a raylet with
its own resources on this machine; GPUs are logical only (an actor on a GPU node gets
`ray.get_gpu_ids() == [0]` and CUDA_VISIBLE_DEVICES, never a CUDA device).

    with FakeCluster({"cpu_2": {"CPU": 2}, "gpu_1": {"CPU": 2, "GPU": 1}}, tmp=tmp_path) as cluster:
        job = cluster.popen(["capray", "train", ...])        # a driver with cluster.env()
        (gpu,) = cluster.wait_for_workers(1, node_type="gpu_1", timeout=60)
        cluster.kill_node(gpu.node_id)                         # a lost (spot) node
        ...
        result = cluster.run(["capray", "caption", ...], timeout=300, check=True)
        print(cluster.timeline_text())

In a test module: `from fakecluster import fake_cluster  # noqa: F401` (tests/ is on sys.path),
then `@pytest.mark.slow def test_x(fake_cluster): ...`; `fake_cluster_factory(node_types, ...)`
for other node types. For a module-scoped cluster (several jobs in a row), use `FakeCluster` as
a context manager in your own fixture with `tmp_path_factory.mktemp(...)`.

Clients are subprocesses that connect with `cluster.env()` (RAY_ADDRESS and friends): a process
can hold one Ray connection only, and the pytest process may already hold the session's `ray_local`.
The pytest process itself reads node states straight from the GCS (`GcsClient`, no `ray.init`).

Everything lives in a private RAY_TMPDIR (/tmp/rfc-*, short because Unix socket paths are limited)
on free ports. Teardown SIGKILLs exactly this cluster's processes (raylet and GCS ignore SIGTERM),
found by a marker variable they inherit (see `pids()`) — never `ray stop`, which stops every Ray
of the user. Ray's logs are copied to `tmp/ray-logs` on teardown.

Measured on the 2-core test machine (Ray 2.60), each phase while other tests ran beside it:
- start: `ray start --head` until the autoscaler runs, 4-8 s; teardown 0.5-0.7 s.
- scale-up: a driver's first request is queued ~2 s after the driver starts, the node registers
  2-4 s later (the provider starts nodes one after another, ~2-4 s each), and the work runs ~1 s
  after that: a one-task driver on an empty cluster takes ~6 s end to end.
- scale-down: an idle node goes `idle_timeout_s` (15 s) after its last work.
- a lost node (kill_node): reported dead after ~5 s; its replacement registers 17-25 s after
  that (the dead node keeps its slot until the idle timeout; see kill_node).
- memory: the head ~0.65 GiB RSS; each worker node ~0.3 GiB plus ~0.12 GiB per worker process.
The autoscaler launches a GPU type only for GPU demand, but Ray's scheduler also puts CPU-only
work on a GPU node that has spare CPUs (as on a real cluster).

Linux only (reads /proc, through tests/killers.py). Tests that use the fixtures must be marked `@pytest.mark.slow`.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import pytest

from killers import comm, descendants, environ, free_port, is_dead, kill, kill_group, pids, session_id

T = TypeVar("T")

HEAD_NODE_TYPE = "ray.head.default"
# Resources every node reports that say nothing about its type.
_BOOKKEEPING_RESOURCES = ("memory", "object_store_memory")

# cluster.yaml's shape on a small scale: one CPU type, one (fake) GPU type, both from 0 nodes.
DEFAULT_NODE_TYPES: dict[str, dict[str, Any]] = {
    "cpu_2": {"resources": {"CPU": 2}, "max_workers": 2},
    "gpu_1": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 2},
}

# GCS health checks: a SIGKILLed raylet is declared dead after ~5 s instead of ~12 s (Ray's defaults).
FAST_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

_VENV_BIN = Path(sys.executable).parent
_MARKER = "CAPRAY_FAKECLUSTER"
_TERMINATING = re.compile(r"id (\w+) .*\((.*)\)\.?$")  # "Terminating the node with id X and ip X. (idle)"
# monitor.log lines that say nothing about a failure: they repeat every second.
_MONITOR_NOISE = ("Autoscaler status", "The autoscaler took", "fetch the list of non-terminated nodes",
                  "has not yet received load metrics")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+(\w+) (\S+) -- (.*)$")


class ClusterTimeout(TimeoutError):
    """A wait on the cluster or a command run against it took longer than its timeout."""


class ClusterCommandError(RuntimeError):
    """A command run with `check=True` exited non-zero."""


@dataclass(frozen=True)
class Node:
    """One node as the GCS reports it."""

    node_id: str
    node_type: str
    """The worker node type from the config, or `ray.head.default`."""
    resources: dict[str, float]
    """Logical resources (CPU, GPU, custom); memory, object store and `node:<ip>` left out."""
    alive: bool
    is_head: bool
    start_time: float
    """Unix time the node registered with the GCS."""
    end_time: float | None
    """Unix time the GCS declared it dead; None while alive."""
    death: str | None
    """Why it died: `REASON: message`, e.g. `UNEXPECTED_TERMINATION: ...missed too many heartbeats`."""

    @property
    def short_id(self) -> str:
        return "…" + self.node_id[-5:]

    def __str__(self) -> str:
        resources = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items()))
        state = "alive" if self.alive else "dead"
        return f"{self.short_id} {self.node_type} {{{resources}}} {state}"


@dataclass(frozen=True, order=True)
class Event:
    """One line of the timeline."""

    time: float
    """Unix time."""
    source: str
    """`test` (this object's actions), `gcs` (node joined / died) or `autoscaler` (its log)."""
    text: str = field(compare=False)


class FakeCluster:
    """A Ray head with 0 CPUs whose autoscaler launches worker nodes as local processes.

    `node_types` maps a node type name to either a cluster.yaml `available_node_types` entry
    (`resources`, `min_workers` default 0, `max_workers` default 2) or a bare resources mapping.
    Each node is a raylet and its agents (~0.35 GiB): keep `max_workers` at 2-3 per type.
    """

    def __init__(
        self,
        node_types: Mapping[str, Mapping[str, Any]] = DEFAULT_NODE_TYPES,
        *,
        tmp: Path,
        idle_timeout_s: float = 15.0,
        object_store_memory: int = 512 * 2**20,
        system_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 120.0,
        job_server: bool = False,
    ) -> None:
        """
        Args:
            tmp: a folder for the config, copied logs and scratch files (pytest's tmp_path).
            idle_timeout_s: an idle worker node is released after this long (Ray counts minutes;
                fractions work). Small, so that tests see nodes go away.
            object_store_memory: bytes of object store per node (head and each worker type that
                does not set its own). Ray's default is 30% of RAM per node.
            system_config: Ray system config for every node (`ray start --system-config`),
                merged over FAST_FAILURE_DETECTION.
            env: variables for the cluster's processes on top of os.environ at start().
            job_server: run the head's dashboard, whose job server `ray job submit` talks to
                (`job_server_url`), as a cluster launched by `ray up` does.
        """
        from ray.autoscaler._private.util import validate_config

        if idle_timeout_s < 0:
            raise ValueError(f"idle_timeout_s must be >= 0, got {idle_timeout_s}")
        self.tmp = Path(tmp)
        self.node_types = {name: _node_type(name, spec, object_store_memory) for name, spec in node_types.items()}
        self._object_store_memory = object_store_memory
        self._system_config = {**FAST_FAILURE_DETECTION, **(system_config or {})}
        self._extra_env = dict(env or {})
        self._start_timeout_s = start_timeout_s
        self._job_server = job_server
        self._dashboard_port = 0
        self._marker = uuid.uuid4().hex
        self._ip = _node_ip()
        self._port = 0
        self._sid = -1
        self._ray_tmp: Path | None = None
        self._logs_copy: Path | None = None
        self._gcs = None
        self._clients: list[subprocess.Popen] = []
        self._watchdog: subprocess.Popen | None = None
        self._events: list[Event] = []
        self._seen: dict[str, Node] = {}
        self.t0 = time.time()
        self.timings: dict[str, float] = {}
        """Seconds per phase: `start` (ray start to autoscaler ready), `shutdown`."""
        self.config: dict[str, Any] = {
            "cluster_name": "fake",
            "max_workers": sum(t["max_workers"] for t in self.node_types.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "docker": {},
            "auth": {},
            "provider": {
                "type": "fake_multinode",
                "gcs_address": None,  # set in start(), once the port is picked
                # Without these three every launched node is torn down after ~2 s as "launch failed".
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                # Otherwise the provider launches one node per request, whatever the count asked.
                "launch_multiple": True,
            },
            "available_node_types": {
                HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **self.node_types,
            },
            "head_node_type": HEAD_NODE_TYPE,
            # The fields `ray up` fills in; the autoscaler reads them.
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        try:
            validate_config({**self.config, "provider": {**self.config["provider"], "gcs_address": "0.0.0.0:1"}})
        except Exception as e:  # jsonschema's ValidationError, or ValueError for bad node types
            raise ValueError(f"invalid node types {dict(node_types)}: {e}") from e

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def address(self) -> str:
        """`ip:port` of the GCS, what RAY_ADDRESS holds."""
        if not self._port:
            raise RuntimeError("the cluster is not started")
        return f"{self._ip}:{self._port}"

    @property
    def job_server_url(self) -> str:
        """The head's job server, for `ray job submit --address` (only with ``job_server=True``)."""
        if not self._job_server:
            raise RuntimeError("this cluster was started without its job server (job_server=True)")
        return f"http://127.0.0.1:{self._dashboard_port}"

    @property
    def ray_tmpdir(self) -> Path:
        assert self._ray_tmp is not None, "the cluster is not started"
        return self._ray_tmp

    @property
    def log_dir(self) -> Path:
        """Ray's logs of this cluster (all nodes share one session); after shutdown, their copy."""
        if self._logs_copy is not None:
            return self._logs_copy
        return self.ray_tmpdir / "session_latest" / "logs"

    def start(self) -> FakeCluster:
        """Start the head and wait until its autoscaler runs; on failure, leaves nothing behind."""
        if self._port:
            raise RuntimeError("the cluster is already started")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._ray_tmp = Path(tempfile.mkdtemp(prefix="rfc-", dir="/tmp"))  # short: socket paths <= 107 bytes
        self._port, self._dashboard_port = free_port(), free_port()
        self.config["provider"]["gcs_address"] = self.address
        config_path = self.tmp / "autoscaling.json"
        config_path.write_text(json.dumps(self.config, indent=1))
        env = {
            **os.environ,
            **self._extra_env,
            # The nodes run `python` from PATH and sys.executable of the monitor: this venv's.
            "PATH": f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "AUTOSCALER_METRIC_PORT": str(free_port()),  # a fixed 44217 by default
            "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": str(self._ray_tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
            _MARKER: self._marker,
        }
        env.pop("RAY_ADDRESS", None)
        argv = [
            str(_VENV_BIN / "ray"), "start", "--head", "--num-cpus=0", f"--port={self._port}",
            f"--autoscaling-config={config_path}", f"--temp-dir={self._ray_tmp}",
            f"--object-store-memory={self._object_store_memory}",
            f"--include-dashboard={str(self._job_server).lower()}", "--dashboard-host=127.0.0.1",
            # The headless API server starts anyway, and the head's agent listens on a fixed port
            # (52365) by default: free ports, so that other Rays on this machine do not collide.
            f"--dashboard-port={self._dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",  # always started (ray[client]); default 10001
            "--min-worker-port=0", "--max-worker-port=0",  # random worker ports
            f"--system-config={json.dumps(self._system_config, separators=(',', ':'))}",
            "--disable-usage-stats",
        ]
        self.t0 = time.time()
        self._record("test", f"ray start --head at {self.address} (RAY_TMPDIR {self._ray_tmp})")
        atexit.register(self.shutdown)
        self._watchdog = _start_watchdog(self._marker, self._ray_tmp)
        try:
            # A session of its own: every process of the cluster is in it (its id is ray start's pid).
            starter = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True, stdin=subprocess.DEVNULL)
            self._sid = starter.pid
            self._watchdog.stdin.write(f"{self._sid}\n")
            self._watchdog.stdin.flush()
            try:
                _, stderr = starter.communicate(timeout=self._start_timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(starter)
                raise RuntimeError(f"ray start --head took over {self._start_timeout_s:g} s") from None
            if starter.returncode != 0:
                raise RuntimeError(f"ray start --head failed ({starter.returncode}):\n{stderr[-3000:]}")
            from ray._raylet import GcsClient

            self._gcs = GcsClient(address=self.address)
            # The monitor writes its first status after its first update: from then on it scales.
            self.wait_until(lambda: self._gcs.internal_kv_get(b"__autoscaling_status", None, timeout=5),
                            timeout=self._start_timeout_s, what="the autoscaler's first status report")
        except BaseException:
            self.shutdown()
            raise
        self.timings["start"] = time.time() - self.t0
        self._record("test", f"head up, autoscaler running ({self.timings['start']:.1f} s)")
        return self

    def shutdown(self) -> None:
        """SIGKILL every process of this cluster and its clients; copy the logs to tmp/ray-logs."""
        if self._ray_tmp is None or self._logs_copy is not None:
            return
        atexit.unregister(self.shutdown)
        began = time.time()
        if self._gcs is not None:
            try:
                self.nodes()  # the last look, for the timeline
            except Exception as e:  # a broken GCS must not stop the teardown
                self._record("test", f"GCS unreachable at shutdown: {_shorten(str(e))}")
        self._gcs = None  # before the GCS goes: a client left behind would retry and log
        self._record("test", "shutdown")
        for proc in self._clients:
            kill_group(proc)
        self._clients.clear()
        left = _sweep(self._marker, self._sid)
        if self._watchdog is not None:
            self._watchdog.communicate("done\n")  # a normal teardown: it has nothing to do
            self._watchdog = None
        logs = self._ray_tmp / "session_latest" / "logs"
        copy = self.tmp / "ray-logs"
        try:
            shutil.copytree(logs, copy, symlinks=True, dirs_exist_ok=True)
        except (OSError, shutil.Error) as e:  # best effort: the logs only explain a failure
            self._record("test", f"could not copy Ray's logs: {_shorten(str(e))}")
        self._logs_copy = copy
        shutil.rmtree(self._ray_tmp, ignore_errors=True)
        self.timings["shutdown"] = time.time() - began
        if left:
            raise RuntimeError(f"processes of the fake cluster survived SIGKILL: {left}")

    # --- clients --------------------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a client (a driver) of this cluster: os.environ, the cluster's
        address and settings, then `extra`."""
        env = {
            **os.environ,
            "PATH": f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": str(self.ray_tmpdir),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            **(extra or {}),
        }
        for name in (_MARKER, "RAY_FAKE_CLUSTER", "RAY_OVERRIDE_NODE_ID_FOR_TESTING"):
            env.pop(name, None)
        return env

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start a client in its own process group with `env()`; it is killed at shutdown."""
        proc = subprocess.Popen(list(argv), env=self.env(env), cwd=cwd, start_new_session=True, **kwargs)
        self._clients.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = False, env: Mapping[str, str] | None = None,
            cwd: Path | str | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a client to completion with `env()`, output captured as text.

        On timeout its process group is killed and ClusterTimeout says what it printed, the
        timeline and the autoscaler's log; with `check=True` a non-zero exit raises
        ClusterCommandError with the same.
        """
        command = shlex.join(str(a) for a in argv)
        began = time.time()
        self._record("test", f"run: {_shorten(command)}")
        proc = self.popen(argv, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            stdout, stderr = proc.communicate()
            self._record("test", f"run timed out after {timeout:g} s: {_shorten(command)}")
            raise ClusterTimeout(f"`{command}` still running after {timeout:g} s\n"
                                 f"{_tails(stdout, stderr)}\n{self.report()}") from None
        finally:
            if proc in self._clients:
                self._clients.remove(proc)
        self._record("test", f"run exited {proc.returncode} after {time.time() - began:.1f} s: {_shorten(command)}")
        result = subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise ClusterCommandError(f"`{command}` exited {result.returncode}\n"
                                      f"{_tails(stdout, stderr)}\n{self.report()}")
        return result

    def python(self, code: str, *, timeout: float, check: bool = True,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `python -c code` (this venv's) as a client; `check` defaults to True here."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check, env=env)

    # --- nodes ----------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        """Every node the GCS knows, head and dead ones included, in launch order."""
        if self._gcs is None:
            raise RuntimeError("the cluster is not running")
        from ray.core.generated import gcs_pb2

        nodes = []
        for node_id, info in self._gcs.get_all_node_info(timeout=10).items():
            resources = {k: v for k, v in info.resources_total.items()
                         if k not in _BOOKKEEPING_RESOURCES and not k.startswith("node:")}
            dead = info.state == gcs_pb2.GcsNodeInfo.DEAD
            death = None
            if dead and info.HasField("death_info"):
                reason = type(info.death_info).Reason.Name(info.death_info.reason)
                death = f"{reason}: {info.death_info.reason_message}"
            node = Node(node_id=node_id.hex(), node_type=info.node_type_name or HEAD_NODE_TYPE,
                        resources=resources, alive=not dead, is_head=info.is_head_node,
                        start_time=info.start_time_ms / 1000, end_time=info.end_time_ms / 1000 if dead else None,
                        death=death)
            self._seen[node.node_id] = node
            nodes.append(node)
        return sorted(nodes, key=lambda n: n.node_id)

    def node(self, node_id: str) -> Node:
        """One node by id (dead ones too)."""
        for node in self.nodes():
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node {node_id} in {[n.node_id for n in self.nodes()]}")

    def worker_nodes(self, node_type: str | None = None) -> list[Node]:
        """Alive worker (non-head) nodes, of one type if given."""
        return [n for n in self.nodes()
                if n.alive and not n.is_head and (node_type is None or n.node_type == node_type)]

    def wait_until(self, condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.5) -> T:
        """Poll `condition()` until it returns something truthy, and return that.

        After `timeout` seconds raise ClusterTimeout naming `what`, with the nodes, the timeline
        and the tail of the autoscaler's log.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ClusterTimeout(f"timed out after {timeout:g} s waiting for {what}\n{self.report()}")
            time.sleep(interval)

    def wait_for_workers(self, count: int, *, node_type: str | None = None, timeout: float) -> list[Node]:
        """Wait until exactly `count` worker nodes (of `node_type`, if given) are alive; return them."""
        def check() -> list[list[Node]] | None:
            nodes = self.worker_nodes(node_type)
            return [nodes] if len(nodes) == count else None  # boxed: [] is a valid answer

        kind = f" of type {node_type}" if node_type else ""
        return self.wait_until(check, timeout=timeout, what=f"exactly {count} alive worker node(s){kind}")[0]

    def wait_for_dead(self, node_id: str, *, timeout: float) -> Node:
        """Wait until the GCS declares the node dead; return it."""
        def check() -> Node | None:
            node = self.node(node_id)
            return None if node.alive else node

        return self.wait_until(check, timeout=timeout, what=f"node …{node_id[-5:]} to be reported dead")

    def kill_node(self, node_id: str) -> list[int]:
        """Lose a worker node as a reclaimed spot instance is lost: SIGKILL its raylet and
        everything under it (workers, agents). Returns the killed pids, once they are dead.

        The GCS declares the node dead ~5 s later. The fake provider's nodes never leave the
        "uninitialized" status, so the autoscaler's liveness check skips them: it keeps counting
        the dead node's resources as free and launches a replacement only when it terminates the
        node as idle, `idle_timeout_s` after the death.
        """
        node = self.node(node_id)  # KeyError if unknown
        if node.is_head:
            raise ValueError("kill_node takes a worker node; the head holds the GCS")
        raylets = [pid for pid in self.pids()
                   if comm(pid) == "raylet" and environ(pid).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id]
        if not raylets:
            raise ValueError(f"no running raylet for node {node_id}; alive: {[str(n) for n in self.worker_nodes()]}")
        victims = raylets + [pid for raylet in raylets for pid in descendants(raylet)]
        for pid in victims:  # the raylet first, so that it starts nothing new
            kill(pid)
        self.wait_until(lambda: all(is_dead(pid) for pid in victims), timeout=10, interval=0.1,
                        what=f"the processes of node {node.short_id} to die of SIGKILL")
        self._record("test", f"killed node {node.short_id} ({node.node_type}): "
                             f"raylet {raylets[0]} and {len(victims) - 1} processes under it")
        return victims

    def pids(self) -> list[int]:
        """This cluster's live processes: those that inherited its marker variable, and Ray's
        agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, started by each raylet with an
        environment of their own) in the session that `ray start` opened."""
        return _cluster_pids(self._marker, self._sid)

    # --- reporting ------------------------------------------------------------------------------

    def timeline(self) -> list[Event]:
        """This object's actions, nodes joining and dying (GCS) and the autoscaler's decisions."""
        events = list(self._events)
        for node in self._seen.values():
            if node.is_head:
                continue
            resources = ", ".join(f"{k}: {v:g}" for k, v in sorted(node.resources.items()))
            name = f"node {node.short_id}"
            events.append(Event(node.start_time, "gcs", f"{name} joined: {node.node_type} {{{resources}}}"))
            if node.end_time is not None:
                events.append(Event(node.end_time, "gcs", f"{name} ({node.node_type}) dead: {node.death}"))
        events.extend(self._autoscaler_events())
        return sorted(events)

    def timeline_text(self) -> str:
        return "\n".join(f"{e.time - self.t0:+8.1f}s  {e.source:<10} {e.text}" for e in self.timeline())

    def monitor_log_tail(self, num_records: int = 30) -> str:
        """The autoscaler's log, readable: its once-a-second status blocks and loop timings left
        out (the last status kept), long records cut, repeats counted; then monitor.err."""
        records = list(_log_records(self.log_dir / "monitor.log"))
        status = [r for r in records if "Autoscaler status" in r]
        kept: list[list] = []  # [message, first record, repeats]
        for record in records:
            if any(noise in record for noise in _MONITOR_NOISE):
                continue
            match = _LOG_LINE.match(record)
            message = match.group(4) if match else record
            if kept and kept[-1][0] == message:
                kept[-1][2] += 1
                continue
            lines = [_shorten(line, 300) for line in record.splitlines()]
            if len(lines) > 4:  # a traceback: where it starts and what it raised
                lines = lines[:2] + ["  ..."] + lines[-1:]
            kept.append([message, "\n".join(lines), 1])
        text = "\n".join(r + (f"  (x{n})" if n > 1 else "") for _, r, n in kept[-num_records:])
        text += "\n" + "\n".join(status[-1:])
        err = self.log_dir / "monitor.err"
        if err.exists() and err.stat().st_size:
            text += "\n--- monitor.err\n" + "\n".join(err.read_text(errors="replace").splitlines()[-num_records:])
        return text

    def report(self) -> str:
        """What a failure message needs: nodes, timeline, autoscaler log tail."""
        try:
            nodes = "\n".join(f"  {n}" for n in self.nodes()) if self._gcs is not None else "  (cluster down)"
        except Exception as e:
            nodes = f"  (GCS unreachable: {e})"
        try:
            monitor = self.monitor_log_tail()
        except OSError as e:
            monitor = f"(no monitor log: {e})"
        return (f"--- nodes of {self._port and self.address}\n{nodes}\n--- timeline\n{self.timeline_text()}\n"
                f"--- autoscaler log ({self.log_dir / 'monitor.log'}), tail\n{monitor}")

    # --- internals ------------------------------------------------------------------------------

    def _record(self, source: str, text: str) -> None:
        self._events.append(Event(time.time(), source, text))

    def _autoscaler_events(self) -> Iterator[Event]:
        seen_warnings: set[str] = set()
        for record in _log_records(self.log_dir / "monitor.log"):
            match = _LOG_LINE.match(record.splitlines()[0])
            if not match:
                continue
            stamp, level, _, message = match.groups()
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "new nodes for launch" in message:  # "StandardAutoscaler: Queue 1 new nodes for launch"
                yield Event(when, "autoscaler", message.split(": ", 1)[-1])
            elif ":event_summary:" in message:
                yield Event(when, "autoscaler", message.split(":event_summary:", 1)[1])
            elif "Terminating the node with id" in message:
                found = _TERMINATING.search(message)
                node_id, reason = found.groups() if found else ("?????", message)
                yield Event(when, "autoscaler", f"terminating node …{node_id[-5:]} ({reason})")
            elif level in ("WARNING", "ERROR") and message not in seen_warnings:
                seen_warnings.add(message)  # some repeat every second
                yield Event(when, "autoscaler", f"{level}: {_shorten(message, 200)}")


# --- pytest fixtures ---------------------------------------------------------------------------


SHARED_NODE_TYPES = {
    "cpu_2": {"resources": {"CPU": 2}, "max_workers": 3},
    "gpu_1": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 2},
}
"""The node types of the shared cluster (``shared_cluster`` in tests/conftest.py)."""


def _require_slow(request: pytest.FixtureRequest) -> None:
    # A fixture cannot add a mark that `-m "not slow"` sees (selection happens before setup).
    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} starts a FakeCluster (tens of seconds): mark it @pytest.mark.slow",
                    pytrace=False)


@pytest.fixture
def fake_cluster_factory(request, tmp_path, s3_server):
    """Start FakeClusters with your node types: `fake_cluster_factory({"cpu_4": {"CPU": 4}})`.

    Depends on `s3_server` so that the nodes inherit AWS_ENDPOINT_URL. Each cluster is shut down
    at teardown, which prints its timeline (shown with a failing test's output).
    """
    _require_slow(request)
    clusters: list[FakeCluster] = []

    def make(node_types: Mapping[str, Mapping[str, Any]] = DEFAULT_NODE_TYPES, **kwargs: Any) -> FakeCluster:
        cluster = FakeCluster(node_types, tmp=tmp_path / f"fakecluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    errors = []
    for cluster in clusters:
        try:
            cluster.shutdown()
        except Exception as e:  # shut the others down all the same
            errors.append(e)
        print(f"fake cluster {cluster.tmp}: timings {cluster.timings}\n{cluster.timeline_text()}")
    if errors:
        raise errors[0]


@pytest.fixture
def fake_cluster(fake_cluster_factory) -> FakeCluster:
    """A fresh cluster of DEFAULT_NODE_TYPES (cpu_2, gpu_1; 0 to 2 nodes each) for one test."""
    return fake_cluster_factory()


# --- helpers -----------------------------------------------------------------------------------


def _node_type(name: str, spec: Mapping[str, Any], object_store_memory: int) -> dict[str, Any]:
    if name == HEAD_NODE_TYPE:
        raise ValueError(f"{HEAD_NODE_TYPE} is the head's type; name worker types otherwise")
    spec = dict(spec) if "resources" in spec else {"resources": dict(spec)}
    unknown = set(spec) - {"resources", "min_workers", "max_workers", "node_config"}
    if unknown:
        raise ValueError(f"node type {name}: unknown keys {sorted(unknown)}")
    resources = {"object_store_memory": object_store_memory, **spec["resources"]}
    min_workers, max_workers = spec.get("min_workers", 0), spec.get("max_workers", 2)
    if not 0 <= min_workers <= max_workers:
        raise ValueError(f"node type {name}: need 0 <= min_workers <= max_workers, got {min_workers}, {max_workers}")
    return {"resources": resources, "node_config": {}, "min_workers": min_workers, "max_workers": max_workers}


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tails(stdout: str | None, stderr: str | None, limit: int = 3000) -> str:
    return f"--- stdout (tail)\n{(stdout or '')[-limit:]}\n--- stderr (tail)\n{(stderr or '')[-limit:]}"


def _log_records(path: Path) -> Iterator[str]:
    """A Ray log's records: a timestamped line and the lines that continue it."""
    if not path.exists():
        return
    record: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if _LOG_LINE.match(line) and record:
            yield "\n".join(record)
            record = []
        record.append(line)
    if record:
        yield "\n".join(record)


def _cluster_pids(marker: str, sid: int) -> list[int]:
    found = []
    for pid in pids():
        if pid == os.getpid() or is_dead(pid):
            continue
        if environ(pid).get(_MARKER) == marker or (session_id(pid) == sid and comm(pid).startswith("ray::")):
            found.append(pid)
    return found


def _sweep(marker: str, sid: int) -> list[int]:
    """SIGKILL a cluster's processes until none is left; return those that survived."""
    left: list[int] = []
    for _ in range(20):  # the monitor may launch a node between two sweeps
        left = _cluster_pids(marker, sid)
        for pid in left:
            kill(pid)
        if not left:
            break
        time.sleep(0.5)
    return left


# Runs beside the test process and tears the cluster down if that process dies without doing so
# (SIGKILL, a CI timeout): its stdin is a pipe from the test process, which ends with "done" on
# a normal teardown and at EOF otherwise.
_WATCHDOG = """
import shutil, sys
sys.path.insert(0, {tests!r})
from fakecluster import _sweep
words = sys.stdin.read().split()
if "done" not in words:
    _sweep({marker!r}, int(words[0]) if words else -1)
    shutil.rmtree({ray_tmp!r}, ignore_errors=True)
"""


def _start_watchdog(marker: str, ray_tmp: Path) -> subprocess.Popen:
    code = _WATCHDOG.format(tests=str(Path(__file__).parent), marker=marker, ray_tmp=str(ray_tmp))
    # Its own session: a Ctrl-C to the test's process group must not stop it first.
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True,
                            start_new_session=True, stdout=subprocess.DEVNULL)
