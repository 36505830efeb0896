"""Running work on Ray beyond a plain dataset: a function in a task, retried map tasks, an actor's model thread.

``run_in_task`` runs what the driver must not do on a cluster's head; ``map_with_retries`` is
``map_batches`` with task retries; ``ModelThread`` keeps an actor's torch work on one thread.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from capray.sizing import local_machine, task_cpus

READ_TASK_RETRIES = 10
"""Ray retries of a task that read files and raised ``TransientStorageError`` (after the S3 client's own
retries): prepare's and caption's decode tasks, evaluate's feature reads. Past that the job fails (exit 1):
prepare never shrinks the training set silently, and caption's images stay to do for the next run."""
MAX_BLOCKS = 10_000
"""Blocks of one Ray Data run at most, hence its read and decode tasks: Ray Data keeps some driver memory
per block."""


class ModelThread:
    """The one thread on which a Ray Data actor does all its torch work: loading, warm-up, inference.

    torch's CPU thread pool (OpenMP) belongs to the thread that uses it, and Ray Data calls an actor's
    UDF from a worker thread of its own, not the thread that ran ``__init__``. A model loaded on one
    thread and run on another keeps two pools on the same cores; a captioner ran ~30% slower that way
    (docs/benchmarks.md).
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capray-model")

    def run(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the model thread; returns its result or raises its exception."""
        return self._executor.submit(fn, *args, **kwargs).result()


def map_with_retries(ds, fn, *, max_retries: int, retry_exceptions: list[type[BaseException]], **kwargs):
    """``ds.map_batches(fn, **kwargs)`` whose tasks Ray retries when they raise one of ``retry_exceptions``.

    Ray 2.60 takes task retries only through ``map_batches``'s ``**ray_remote_args``, which it already
    calls deprecated (no named parameter replaces them yet); the warning is silenced here, in one place.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(fn, max_retries=max_retries, retry_exceptions=retry_exceptions, **kwargs)


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
