"""Connecting to Ray, and sizing actors, tasks and workers for where the job runs.

Two worlds, sized differently:

- **Local** (no ``RAY_ADDRESS``, or a job server's ``http://`` URL: capray starts Ray in-process on
  this machine). The world is this one machine and will not grow, so shares are derived from its
  CPUs. On a 2-core machine two actors at 1 CPU each take both cores and the read tasks feeding
  them never run (a silent hang), hence the fractional shares here — and only here.
- **Cluster** (``RAY_ADDRESS`` set, as ``ray job submit`` does). Nodes come and go: the head may
  have 0 CPUs, GPU nodes appear minutes after the job starts, spot nodes vanish. Nothing is sized
  from what is up at submit time or from the cluster's total: every actor and task asks for a
  fixed amount that one node can give (``--cpus-per-actor``, default 1 CPU), actor pools scale
  between a minimum and a maximum as work queues up, and the job waits (bounded, with a log line)
  until the autoscaler has made room for its minimum.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from capray.errors import ConfigError

log = logging.getLogger(__name__)

WAIT_LOG_EVERY_S = 30.0
"""While waiting for the autoscaler, a progress line this often."""
DASHBOARD_PORT = 8265
"""Ray's default dashboard port, used for a local Ray when it is free."""
DASHBOARD_WAIT_S = 60.0
"""How long a local Ray's dashboard may take to register (seconds; it is slow on a busy 2-core machine)."""


class ResourceWaitTimeout(TimeoutError):
    """The cluster did not make room for a job's minimum within ``--wait-timeout`` (exit 1: retry later)."""


VERBOSE_ENV = "CAPRAY_VERBOSE"
"""Set (to 1) by ``--verbose``: Ray's own console output (worker logs, Ray Data's progress) stays on."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_ray_data() -> None:
    """Ray Data's per-execution lines and progress go to Ray's log files, not the console (unless verbose).

    Applies to the datasets this process builds (the context travels with them). Ray Data logs to
    ``ray-data.log`` in the session's log folder either way; only its console handler is raised to WARNING.
    """
    if verbose():
        return
    import ray.data
    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data would warn once that we turned them off
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    dataset_log = logging.getLogger("ray.data.dataset")
    if _no_free_cpu_warning not in dataset_log.filters:
        dataset_log.addFilter(_no_free_cpu_warning)


def _no_free_cpu_warning(record: logging.LogRecord) -> bool:
    """False for Ray Data's "the cluster does not have any available CPUs ... will hang" warning.

    Ray Data gives it when an execution starts while ``ray.available_resources()`` shows no free CPU,
    a view that lags: locally it fires while capray's own actors start, though their shares always
    leave CPU for tasks. On a cluster the jobs wait for what they need with a line of their own
    (``wait_for_resources``) before any execution starts.
    """
    return "does not have any available CPUs" not in record.getMessage()


def map_with_retries(ds, fn, *, max_retries: int, retry_exceptions: list[type[BaseException]], **kwargs):
    """``ds.map_batches(fn, **kwargs)`` whose tasks Ray retries when they raise one of ``retry_exceptions``.

    Ray 2.60 takes task retries only through ``map_batches``'s ``**ray_remote_args``, which it already
    calls deprecated (no named parameter replaces them yet); the warning is silenced here, in one place.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(fn, max_retries=max_retries, retry_exceptions=retry_exceptions, **kwargs)


def ensure_ray(*, dashboard: bool = False) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray.

    An ``http(s)://`` ``RAY_ADDRESS`` is the job server's, left in the shell for ``ray job submit``
    (see ``job_server_address``): the command runs on a local Ray, with a warning that says so.

    ``dashboard``: whether a local Ray runs its dashboard. Training wants it: the dashboard serves the
    State API, which Ray Train's placement-group cleaner polls (without it, a warning a second). It
    costs memory and ~0.1 of a core while busy, which captioning on a small machine feels (its
    throughput fell from 0.95 to 0.89 of the model's on 2 cores), so the other jobs go without.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if job_server_address(address):
        log.warning("RAY_ADDRESS=%s is a Ray job server's address (for `ray job submit`), not a cluster to "
                    "join: this command runs on a local Ray; to run it on the cluster, submit it with "
                    "`ray job submit -- python jobs/<job>.py ...`", address)
        del os.environ["RAY_ADDRESS"]  # Ray's own code in this process must not try to reach it either
    quiet_ray_data()
    local = {}
    if dashboard and is_local() and not _dashboard_installed():
        log.warning("Ray's dashboard is not installed (ray[default]): starting without it; Ray Train may "
                    "warn that it cannot reach the State API")
        dashboard = False
    if is_local():
        # Ray keeps at most one idle worker process per CPU and kills the rest after a second; on a
        # small machine, where an actor holds one of them, every new task then starts a fresh Python
        # (about a CPU-second each, stolen from the model). Keep a few more. Fractional-CPU tasks start
        # more Pythons at once than there are cores, which is what they are for; the raylet's warning
        # about it (on the console, whatever log_to_driver says) counts against this concurrency.
        workers = max(8, 2 * (os.cpu_count() or 1))
        local = {"include_dashboard": dashboard, "dashboard_port": _dashboard_port(),
                 "_system_config": {"num_workers_soft_limit": workers, "worker_maximum_startup_concurrency": workers}}
    if local:
        _start_local(**local)
    else:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=verbose(), configure_logging=False)
    if local and dashboard:
        _wait_for_dashboard(timeout_s=DASHBOARD_WAIT_S)
        log.info("Ray's dashboard: http://127.0.0.1:%d", local["dashboard_port"])
    resources = ray.cluster_resources()
    log.info("Ray: %s (%g CPUs, %g GPUs up now)", "local" if local else os.environ["RAY_ADDRESS"],
             resources.get("CPU", 0), resources.get("GPU", 0))


def _dashboard_installed() -> bool:
    """Whether this Ray has its dashboard's packages (ray[default]); an offline bundle leaves them out."""
    import importlib.util

    try:  # Ray's own test: this module imports the dashboard's packages
        return importlib.util.find_spec("ray.dashboard.optional_deps") is not None and \
            importlib.import_module("ray.dashboard.optional_deps") is not None
    except ImportError:
        return False


def _start_local(**options) -> None:
    """``ray.init`` of a new local Ray whose workers know its address.

    Ray's own helpers that run in workers (Ray Train's ``PlacementGroupCleaner`` among them) find "the"
    cluster through ``RAY_ADDRESS`` or by looking for running GCS processes; with another Ray on the
    machine (another capray command, a test session) the search fails ("Found multiple active Ray
    instances") and the helper dies with a traceback on the console. So the GCS port is chosen
    here and handed to every worker of this Ray as ``RAY_ADDRESS``.
    """
    import ray
    from ray._private.services import get_node_ip_address

    port = _free_port(0)
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the GCS
    try:
        ray.init(address="local", log_to_driver=verbose(), configure_logging=False,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}}, **options)
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved


def _free_port(*preferred: int) -> int:
    """The first of ``preferred`` that is free on this machine, else any free port (0 means any)."""
    import socket

    for port in (*preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port")


def _dashboard_port() -> int:
    """Ray's usual 8265 if it is free, else any free port.

    Another Ray on this machine (another capray command, a test session) may hold 8265; a dashboard
    that cannot bind it never comes up, and Ray Train, which asks it for actor states, fails then.
    """
    return _free_port(DASHBOARD_PORT)


def _wait_for_dashboard(*, timeout_s: float) -> None:
    """Wait until the local dashboard has registered its address with the GCS.

    Ray Train's ``PlacementGroupCleaner`` looks the address up once when training starts; on a busy
    machine the dashboard can take longer than its retries, and the cleaner's thread then dies with a
    traceback on the console (seen on 2 cores under load).
    """
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + timeout_s
    while _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD) is None:
        if time.monotonic() > deadline:
            log.warning("Ray's dashboard did not come up within %.0f s", timeout_s)
            return
        time.sleep(0.2)


def is_local() -> bool:
    """Whether the job runs on a Ray that capray starts in-process on this machine: no ``RAY_ADDRESS``,
    or one that is a job server's URL (see ``job_server_address``), not a cluster to join."""
    address = os.environ.get("RAY_ADDRESS", "")
    return address in ("", "local") or job_server_address(address)


def job_server_address(address: str) -> bool:
    """Whether ``address`` is an ``http(s)://`` URL: the Ray job server (the dashboard, port 8265) that
    ``ray job submit`` talks to, as in ``export RAY_ADDRESS=http://localhost:8265``.

    A job that ``ray job submit`` starts gets the cluster's own address (``host:port`` of the GCS) in
    its ``RAY_ADDRESS``; an http URL in a command's environment was set for ``ray job submit`` in the
    same shell. A driver cannot join a cluster through it (``ray.init`` takes a GCS address or a
    ``ray://`` client address), so capray runs such a command on a local Ray and says so.
    """
    return address.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Machine:
    """The one machine of a local Ray: a fixed world whose size is known."""

    cpus: float
    gpus: float


def local_machine() -> Machine | None:
    """This machine's resources when the job runs locally (see ``is_local``), else None (a cluster)."""
    if not is_local():
        return None
    import ray

    resources = ray.cluster_resources()
    return Machine(cpus=float(resources.get("CPU", 1.0)), gpus=float(resources.get("GPU", 0.0)))


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each one asks Ray for."""

    min_actors: int
    """Actors the pool starts with and never goes below."""
    max_actors: int | None
    """Actors the pool may grow to as work queues up; None: no limit (the cluster's node caps bound it)."""
    num_cpus: float
    """CPUs each actor asks for."""
    num_gpus: float
    """GPUs each actor asks for."""
    threads: int
    """torch threads per actor (CPU inference)."""

    def strategy(self):
        """Ray Data's compute strategy for the pool."""
        import ray.data

        if self.min_actors == self.max_actors:
            return ray.data.ActorPoolStrategy(size=self.min_actors)
        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors)

    def remote_args(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def bundle(self) -> dict[str, float]:
        """What one actor needs from one node."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}

    def describe(self) -> str:
        count = (f"{self.min_actors}" if self.min_actors == self.max_actors
                 else f"{self.min_actors}..{self.max_actors or 'any'}")
        gpus = f" + {self.num_gpus:g} GPU" if self.num_gpus else f", {self.threads} thread(s)"
        return f"{count} actor(s) × {self.num_cpus:g} CPU{gpus}"


def plan_actors(*, actors: int, max_actors: int, gpus_per_actor: float, cpus_per_actor: float,
                machine: Machine | None, reserve_cpus: float = 1.0) -> ActorPlan:
    """The model actors of a job: a fixed pool on a local machine, an autoscaling one on a cluster.

    ``actors`` > 0 fixes the pool size; 0 lets it scale: on a cluster between 1 and ``max_actors``
    (0: no limit), on a local machine one per GPU (else one). ``cpus_per_actor`` 0 means the default:
    1 CPU per actor on a cluster (a share any node can give; the pool scales out instead of up), and
    on a local machine what is left after ``reserve_cpus`` for the decode tasks.
    """
    if actors < 0 or max_actors < 0 or gpus_per_actor < 0 or cpus_per_actor < 0:
        raise ConfigError("--actors, --max-actors, --gpus-per-actor and --cpus-per-actor must not be negative")
    if actors and max_actors and max_actors < actors:
        raise ConfigError(f"--max-actors {max_actors} is below --actors {actors}")
    if machine is None:
        num_cpus = cpus_per_actor or 1.0
        threads = 1 if gpus_per_actor else max(1, int(num_cpus))
        return ActorPlan(min_actors=actors or 1, max_actors=actors or max_actors or None, num_cpus=num_cpus,
                         num_gpus=gpus_per_actor, threads=threads)
    if gpus_per_actor > 0 and machine.gpus < gpus_per_actor:
        raise ConfigError(f"--gpus-per-actor {gpus_per_actor:g} but this machine has {machine.gpus:g} GPUs "
                          "(set RAY_ADDRESS to use a cluster)")
    if actors == 0:
        actors = max(1, int(machine.gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    if gpus_per_actor > 0 and actors * gpus_per_actor > machine.gpus:
        raise ConfigError(f"{actors} actors × {gpus_per_actor:g} GPUs exceed this machine's {machine.gpus:g} GPUs")
    if cpus_per_actor:
        num_cpus = cpus_per_actor
    elif gpus_per_actor > 0:  # GPU actors need a little CPU for batching and host-to-device copies
        num_cpus = min(1.0, max(0.25, (machine.cpus - reserve_cpus) / actors))
    else:
        num_cpus = max(0.25, min(float(max(1, int(machine.cpus))), (machine.cpus - reserve_cpus) / actors))
        num_cpus = min(num_cpus, max(0.25, machine.cpus / actors))
    if actors * num_cpus > machine.cpus:
        raise ConfigError(f"{actors} actors × {num_cpus:g} CPUs exceed this machine's {machine.cpus:g} CPUs")
    threads = 1 if gpus_per_actor else max(1, int(round(num_cpus)))
    return ActorPlan(min_actors=actors, max_actors=actors, num_cpus=round(num_cpus, 2), num_gpus=gpus_per_actor,
                     threads=threads)


def task_cpus(machine: Machine | None, *, small: float, cluster: float) -> float:
    """CPU share of a CPU task (decode, write): ``small`` on a local machine of ≤ 4 cores, else ``cluster``.

    On a small machine the model actors hold most of it, and a task that asks for more than what is
    left never starts (Ray Data then waits forever).
    """
    return small if machine is not None and machine.cpus <= 4 else cluster


def worker_cpus(*, workers: int, machine: Machine | None, reserve_cpus: float = 1.0) -> float:
    """CPU share of a Ray Train worker: 1 on a cluster; on a small local machine a fraction of it."""
    if machine is None:
        return 1.0
    return round(max(0.25, min(1.0, (machine.cpus - reserve_cpus) / workers)), 2)


def wait_for_resources(bundles: list[dict[str, float]], *, timeout_s: float, what: str) -> None:
    """Block until the cluster can hold ``bundles`` together, asking the autoscaler for them meanwhile.

    A pending placement group is demand the autoscaler acts on (it launches nodes of a type that
    fits), and its ``wait`` tells when the room is there. The group is removed at once: the job's own
    actors and workers then take the room. Raises ``ResourceWaitTimeout`` after ``timeout_s``.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    if not bundles:
        return
    group = placement_group(bundles, strategy="PACK")
    started = time.monotonic()
    try:
        if group.wait(timeout_seconds=1):
            return
        log.info("%s: waiting up to %.0f s for %d × %s (the autoscaler starts nodes for it)",
                 what, timeout_s, len(bundles), _bundle_text(bundles[0]))
        while True:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                raise ResourceWaitTimeout(
                    f"{what}: the cluster had no room for {len(bundles)} × {_bundle_text(bundles[0])} after "
                    f"{timeout_s:.0f} s; check that a node type of the cluster has these resources "
                    f"(or raise --wait-timeout)")
            if group.wait(timeout_seconds=min(WAIT_LOG_EVERY_S, left)):
                log.info("%s: resources ready after %.0f s", what, time.monotonic() - started)
                return
            log.info("%s: still waiting for resources (%.0f s)", what, time.monotonic() - started)
    finally:
        remove_placement_group(group)


def _bundle_text(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


class ModelThread:
    """The one thread on which a Ray Data actor does all its torch work: loading, warm-up, inference.

    torch's CPU thread pool (OpenMP) belongs to the thread that uses it, and Ray Data calls an actor's
    UDF from a worker thread of its own, not the thread that ran ``__init__``. A model loaded on one
    thread and run on another keeps two pools on the same cores: measured here, a captioner used
    1.67 of 2 cores instead of 1.99 and ran ~30% slower (bench/caption_throughput.py).
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capray-model")

    def run(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the model thread; returns its result or raises its exception."""
        return self._executor.submit(fn, *args, **kwargs).result()


def run_in_task(fn, /, *args, what: str, timeout_s: float | None = None, **kwargs):
    """``fn(*args, **kwargs)`` in a Ray task, not in this process; returns its (small) result.

    For work the driver must not do on a cluster, where it runs on the head (0 CPUs, no GPU): the
    task asks for what one node gives (1 CPU; a share of it on a small local machine). An exception
    of ``fn`` is raised here as itself; ``TimeoutError`` if the task has not finished in ``timeout_s``.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError

    cpus = task_cpus(local_machine(), small=0.5, cluster=1.0)
    ref = ray.remote(num_cpus=cpus, max_retries=2)(_call).options(name=what).remote(fn, *args, **kwargs)
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"{what}: not done after {timeout_s:.0f} s (is there a node with {cpus:g} CPU free?)") \
            from None
    except RayTaskError as exc:
        if isinstance(exc.cause, Exception):
            raise exc.cause from None
        raise


def _call(fn, /, *args, **kwargs):
    """The body of ``run_in_task``'s task (any callable: a builtin too)."""
    return fn(*args, **kwargs)
