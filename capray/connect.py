"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else a Ray started here.

A local Ray is started in-process on this machine (no ``RAY_ADDRESS``, or a job server's ``http://``
URL, see ``job_server_address``), with its own GCS port handed to its workers and, for training,
its dashboard. This is the one module that uses Ray's private APIs (``ray._private``, the GCS's
internal key-value store): what a local Ray needs so that several of them can share one machine.
"""
from __future__ import annotations

import logging
import os
import time

from capray.console import quiet_ray_data, verbose

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
"""Ray's default dashboard port, used for a local Ray when it is free."""
DASHBOARD_WAIT_S = 60.0
"""How long a local Ray's dashboard may take to register (seconds; it is slow on a busy 2-core machine)."""


def ensure_ray(*, dashboard: bool = False) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray.

    An ``http(s)://`` ``RAY_ADDRESS`` is the job server's, left in the shell for ``ray job submit``
    (see ``job_server_address``): the command runs on a local Ray, with a warning that says so.

    ``dashboard``: whether a local Ray runs its dashboard. Training wants it: the dashboard serves the
    State API, which Ray Train's placement-group cleaner polls (without it, a warning a second). It
    costs memory and ~0.1 of a core while busy, which captioning on a small machine feels (measured:
    docs/benchmarks.md), so the other jobs go without.
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

    port = free_port(0)
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


def free_port(*preferred: int) -> int:
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
    return free_port(DASHBOARD_PORT)


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
