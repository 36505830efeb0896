"""Killing a Ray worker from outside, as a real failure does (the OOM killer, a segfault, a lost VM).

The tests that use this run a job in their own process on the session's local Ray (``ray_local``),
which this process started: its raylet, and so every Ray worker, descends from this process. A worker
is found by walking /proc down from here and matching the title Ray gives its process, so another Ray
on the same machine is never hit. Titles seen with Ray 2.60 (``ray::<actor>`` idle, ``.<method>``
appended while it runs a call)::

    ray::MapWorker(MapBatches(Captioner))           a Ray Data actor of map_batches(Captioner)
    ray::MapWorker(MapBatches(Captioner)).submit    ... while it runs a batch
    ray::RayTrainWorker                             a Ray Train worker

Usage::

    with KillInBackground("ray::RayTrainWorker", ready=lambda: ..., timeout_s=120) as kill:
        run_the_job()
    assert kill.killed_at < kill.exited_at   # the kill landed while the job was still running
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fakecluster import descendants


def command_line(pid: int) -> str:
    """The process's title (Ray rewrites its workers' argv), "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def ray_workers(title: str, *, ancestor: int | None = None) -> list[int]:
    """Pids of the processes below ``ancestor`` (default: this one) whose title starts with ``title``."""
    return sorted(p for p in descendants(ancestor or os.getpid()) if command_line(p).startswith(title))


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent (the raylet) to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class KillInBackground:
    """A thread that waits until ``ready()`` returns something truthy, then SIGKILLs one process
    titled ``title`` (see ``ray_workers``), once.

    After the ``with`` block: ``killed_pid`` and ``killed_title`` (None if it never killed),
    ``ready_value`` (what ``ready()`` returned just before the kill), ``killed_at`` and
    ``exited_at`` (``time.monotonic()`` of the kill and of leaving the block). ``error``: why it
    did not kill (timed out, or ``ready`` raised).
    """

    def __init__(self, title: str, *, ready: Callable[[], object], timeout_s: float, poll_s: float = 0.05):
        self.title, self.ready, self.timeout_s, self.poll_s = title, ready, timeout_s, poll_s
        self.killed_pid: int | None = None
        self.killed_title: str | None = None
        self.ready_value: object = None
        self.killed_at: float | None = None
        self.exited_at: float | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kill-in-background", daemon=True)

    def __enter__(self) -> KillInBackground:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.exited_at = time.monotonic()
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while not self._stop.is_set():
                if time.monotonic() > deadline:
                    self.error = f"no process titled {self.title!r} to kill within {self.timeout_s:g} s"
                    return
                value = self.ready()
                if value:
                    for pid in ray_workers(self.title):
                        title = command_line(pid)
                        if not title.startswith(self.title):  # finished its call meanwhile
                            continue
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        self.killed_at, self.killed_pid, self.killed_title = time.monotonic(), pid, title
                        self.ready_value = value
                        gone_by = time.monotonic() + 10  # SIGKILL is asynchronous; gone in milliseconds
                        while not is_dead(pid) and time.monotonic() < gone_by:
                            time.sleep(0.01)
                        return
                self._stop.wait(self.poll_s)
            self.error = f"the job ended before a process titled {self.title!r} was killed"
        except Exception as exc:  # reported through ``error``: a thread's exception would be lost
            self.error = f"{type(exc).__name__}: {exc}"

    def describe(self) -> str:
        if self.killed_pid is None:
            return f"no kill: {self.error}"
        when = "" if self.exited_at is None else f", {self.exited_at - self.killed_at:.1f} s before the job returned"
        return f"SIGKILLed pid {self.killed_pid} ({self.killed_title}) when ready() gave {self.ready_value!r}{when}"
