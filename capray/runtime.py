"""Connecting to Ray and sizing actors and workers from the cluster's resources.

On a 2-core machine two actors at the default 1 CPU each take both cores and the read tasks
feeding them never run (a silent hang), so CPU shares are derived from what the cluster has.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)


def ensure_ray(*, dashboard: bool = False) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray.

    ``dashboard``: whether a local Ray runs its dashboard. Training wants it: the dashboard serves the
    State API, which Ray Train's placement-group cleaner polls (without it, a warning a second). It
    costs memory and ~0.1 of a core while busy, which captioning on a small machine feels (its
    throughput fell from 0.95 to 0.89 of the model's on 2 cores), so the other jobs go without.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    local = {}
    if address == "local":
        # Ray keeps at most one idle worker process per CPU and kills the rest after a second; on a
        # small machine, where an actor holds one of them, every new task then starts a fresh Python
        # (about a CPU-second each, stolen from the model). Keep a few more.
        local = {"include_dashboard": dashboard,
                 "_system_config": {"num_workers_soft_limit": max(8, 2 * (os.cpu_count() or 1))}}
    ray.init(address=address, log_to_driver=True, configure_logging=False, **local)
    log.info("Ray: %s (%s CPUs, %s GPUs)", "local" if address == "local" else address,
             ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each asks Ray for."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    """torch threads per actor (CPU inference)."""


def plan_actors(*, actors: int, gpus_per_actor: float, total_cpus: float, total_gpus: float,
                reserve_cpus: float = 1.0) -> ActorPlan:
    """Actor count and resources: one per GPU by default, else one; CPU shares leave room for decoding.

    ``reserve_cpus`` is kept free for the CPU tasks that read and decode images.
    """
    if actors < 0 or gpus_per_actor < 0:
        raise ValueError("--actors and --gpus-per-actor must not be negative")
    if gpus_per_actor > 0 and total_gpus < gpus_per_actor:
        raise ValueError(f"--gpus-per-actor {gpus_per_actor} but the cluster has {total_gpus:g} GPUs")
    if actors == 0:
        actors = max(1, int(total_gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    if gpus_per_actor > 0 and actors * gpus_per_actor > total_gpus:
        raise ValueError(f"{actors} actors × {gpus_per_actor:g} GPUs exceed the cluster's {total_gpus:g} GPUs")
    if gpus_per_actor > 0:
        # GPU actors need a little CPU for batching and host-to-device copies, no more.
        num_cpus = min(1.0, max(0.25, (total_cpus - reserve_cpus) / actors))
    else:
        num_cpus = max(0.25, min(float(max(1, int(total_cpus))), (total_cpus - reserve_cpus) / actors))
        num_cpus = min(num_cpus, max(0.25, total_cpus / actors))
    threads = max(1, int(round(num_cpus))) if gpus_per_actor == 0 else 1
    return ActorPlan(actors=actors, num_cpus=round(num_cpus, 2), num_gpus=gpus_per_actor, threads=threads)


def cpus_per_worker(*, workers: int, total_cpus: float, reserve_cpus: float = 1.0) -> float:
    """CPU share of a Ray Train worker: at most 1, fractional when the cluster is small."""
    return round(max(0.25, min(1.0, (total_cpus - reserve_cpus) / workers)), 2)


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
