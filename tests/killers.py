"""Finding and killing processes from outside, as a real failure does (the OOM killer, a segfault, a lost
VM): the one place the tests read /proc and send SIGKILL.

``descendants``, ``command_line``, ``is_dead`` and friends read /proc; ``kill``, ``kill_group`` and
``kill_processes_mentioning`` end processes (a whole Ray of a job or a head, found by its temp folder);
``free_port`` hands out a port for a Ray head the tests start.

``KillInBackground`` kills one Ray worker mid-job. The tests that use it run a job in their own
process on the session's local Ray (``ray_local``), which this process started: its raylet, and so
every Ray worker, descends from this process. A worker is found by walking /proc down from here and
matching the title Ray gives its process, so another Ray on the same machine is never hit. Titles seen
with Ray 2.60 (``ray::<actor>`` idle, ``.<method>`` appended while it runs a call)::

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
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port free on every interface right now (Ray's defaults collide with the session's own Ray)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def command_line(pid: int) -> str:
    """The process's title (Ray rewrites its workers' argv), "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def session_id(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent (the raylet) to reap it."""
    stat = _stat(pid)
    return not stat or stat[0] in ("Z", "X")


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        stat = _stat(pid)
        if stat:
            children.setdefault(int(stat[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(pid: int) -> None:
    """SIGKILL, quietly if it is already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session, with anything it started, and reap it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def kill_processes_mentioning(text: str, *, rounds: int = 3) -> None:
    """SIGKILL every process whose command line mentions ``text`` (a Ray's temp folder names all its
    processes; raylet and gcs ignore SIGTERM), again until none is left or ``rounds`` passes are done."""
    for _ in range(rounds):
        found = [pid for pid in pids() if pid != os.getpid() and text in command_line(pid)]
        for pid in found:
            kill(pid)
        if not found:
            return
        time.sleep(0.5)


def ray_workers(title: str, *, ancestor: int | None = None) -> list[int]:
    """Pids of the processes below ``ancestor`` (default: this one) whose title starts with ``title``."""
    return sorted(p for p in descendants(ancestor or os.getpid()) if command_line(p).startswith(title))


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
