"""Sizing actors, tasks and Train workers for where the job runs.

Two worlds, sized differently:

- **Local** (no ``RAY_ADDRESS``, or a job server's ``http://`` URL: capray starts Ray in-process on
  this machine, see ``capray.connect``). The world is this one machine and will not grow, so shares
  are derived from its CPUs. On a 2-core machine two actors at 1 CPU each take both cores and the
  read tasks feeding them never run (a silent hang), hence the fractional shares here — and only here.
- **Cluster** (``RAY_ADDRESS`` set, as ``ray job submit`` does). Nodes come and go: the head may
  have 0 CPUs, GPU nodes appear minutes after the job starts, spot nodes vanish. Nothing is sized
  from what is up at submit time or from the cluster's total: every actor and task asks for a
  fixed amount that one node can give (``--cpus-per-actor``, default 1 CPU), actor pools scale
  between a minimum and a maximum as work queues up, and the job waits (bounded, with a log line)
  until the autoscaler has made room for its minimum (``capray.autoscaler``).
"""
from __future__ import annotations

from dataclasses import dataclass

from capray.config import ActorPool
from capray.connect import is_local
from capray.errors import ConfigError


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


def plan_actors(pool: ActorPool, *, machine: Machine | None, reserve_cpus: float = 1.0) -> ActorPlan:
    """The model actors of a job: a fixed pool on a local machine, an autoscaling one on a cluster.

    ``pool.actors`` > 0 fixes the pool size; 0 lets it scale: on a cluster between 1 and ``max_actors``
    (0: no limit), on a local machine one per GPU (else one). ``cpus_per_actor`` 0 means the default:
    1 CPU per actor on a cluster (a share any node can give; the pool scales out instead of up), and
    on a local machine what is left after ``reserve_cpus`` for the decode tasks.
    """
    actors, max_actors = pool.actors, pool.max_actors
    gpus_per_actor, cpus_per_actor = pool.gpus_per_actor, pool.cpus_per_actor
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


def read_cpus(machine: Machine | None) -> float:
    """CPU share of a task that reads and decodes images (prepare's and caption's decode tasks, through
    ``capray.reader``) or reads shards' text or feature files (prepare's text pass, evaluate): a
    whole CPU on a cluster, where it decodes one image at a time on one core; 0.4 on a small local
    machine, beside its model actor."""
    return task_cpus(machine, small=0.4, cluster=1.0)


def write_cpus(machine: Machine | None) -> float:
    """CPU share of a write task (prepare's feature files, caption's output shards): writing waits on
    storage more than it computes. Small enough that the writes start beside the decode tasks and the
    model actors (a write task that cannot start holds every finished row in the object store)."""
    return task_cpus(machine, small=0.1, cluster=0.25)


@dataclass(frozen=True)
class PipelinePlan:
    """What a Ray Data job's stages ask for: its model actors, each read task and each write task."""

    actors: ActorPlan
    read_cpus: float
    write_cpus: float


def plan_pipeline(pool: ActorPool, *, machine: Machine | None, writes: bool = True) -> PipelinePlan:
    """The one policy of prepare, caption and evaluate: read tasks ``read_cpus``, write tasks
    ``write_cpus`` (``writes=False``: the job writes from the driver), and on a local machine the model
    actors get what those leave (``plan_actors``)."""
    read, write = read_cpus(machine), write_cpus(machine) if writes else 0.0
    return PipelinePlan(actors=plan_actors(pool, machine=machine, reserve_cpus=read + write), read_cpus=read,
                        write_cpus=write)


def worker_cpus(*, workers: int, machine: Machine | None, reserve_cpus: float = 1.0) -> float:
    """CPU share of a Ray Train worker: 1 on a cluster; on a small local machine a fraction of it."""
    if machine is None:
        return 1.0
    return round(max(0.25, min(1.0, (machine.cpus - reserve_cpus) / workers)), 2)
