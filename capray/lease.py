"""One owner per output: a run holds ``OUT/_lease.json`` while it reads, writes or deletes anything in OUT.

The lease names its run (id, host, pid, a random token) and carries a heartbeat time that a
background thread of the driver rewrites every ``interval`` seconds. A second run into the same
output finds it and is refused in one line (``OutputBusy``, a ``ValueError``: exit 2). A lease is
stale, and is taken over, when its heartbeat is older than its owner's timeout, or at once when its
owner ran on this host and that process is gone (a killed run re-run on the same machine). The run
deletes its lease when it ends, whether it succeeded or failed; a killed run leaves it, stale.

Every step is atomic on the store itself (``capray.storage``'s conditional writes):

- creating: S3 ``PUT`` with ``If-None-Match: *``; locally a complete file hard-linked to the name
  (the link fails if the name exists). Two runs started together: one wins, the other is refused.
- taking over, heartbeats, releasing: compare-and-swap on the version read. S3 ``PUT``/``DELETE``
  with ``If-Match: <ETag>``; locally the version (inode, mtime, size) is compared under an exclusive
  ``flock``. Of two runs that find the same stale lease, one replaces it and the other's swap fails
  (it is refused as busy). Where ``flock`` does not work across hosts (some NFS setups) two takers on
  two hosts could both believe they won; on one host, and on S3, they cannot.

A run whose driver was paused longer than the timeout (a stopped VM, say) may have been robbed. Its
next heartbeat finds another token and marks the lease lost; its write tasks check the token before
each shard (``check_owner``) and its driver before deleting anything (``Lease.check``), so it stops
with ``LeaseLost`` (exit 1) instead of writing into an output another run owns.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from capray import storage
from capray.errors import ConfigError

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TIMEOUT_S = 600.0
"""A lease whose heartbeat is older than this is stale: long enough that a driver paused for a few
minutes (a busy head node, a debugger, a suspended laptop) is not robbed of its output."""
BEATS_PER_TIMEOUT = 10  # heartbeats per timeout: a few may fail (a throttled store) before the lease goes stale


class OutputBusy(ConfigError):
    """Another live run holds the output (exit 2: wait for it, or pick another output)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run: it must stop writing (exit 1)."""


def lease_uri(output: str) -> str:
    return storage.join(output, LEASE_FILE)


@dataclass
class Lease:
    """A held lease; a context manager that starts the heartbeat and releases the lease on exit."""

    uri: str
    run_id: str
    token: str
    timeout_s: float
    record: dict
    version: str
    previous: dict | None = None
    """The stale record this run took over, or None if the output had no lease."""
    lost: str = ""
    """Why the lease is no longer ours ("" while it is)."""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __enter__(self) -> Lease:
        interval = self.timeout_s / BEATS_PER_TIMEOUT
        self._thread = threading.Thread(target=self._beat_forever, args=(interval,), name="capray-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def beat(self) -> None:
        """Rewrite the heartbeat; raises ``LeaseLost`` if another run replaced the lease."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            record = {**self.record, "heartbeat": time.time()}
            version = storage.replace_if(self.uri, _encode(record), self.version)
            if version is None:
                self.lost = f"{self.uri}: run {self.run_id} lost its lease to another run"
                raise LeaseLost(self.lost)
            self.record, self.version = record, version

    def check(self) -> None:
        """Raise ``LeaseLost`` if a heartbeat found the lease taken; call before deleting anything."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self.lost:
                return
            self.lost = "released"
            try:
                storage.delete_if(self.uri, self.version)
            except (storage.StorageError, storage.TransientStorageError) as exc:
                log.warning("could not release the lease (it goes stale on its own): %s", exc)

    def _beat_forever(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.beat()
            except LeaseLost as exc:
                log.error("%s; this run stops writing", exc)
                return
            except (storage.StorageError, storage.TransientStorageError) as exc:
                log.warning("lease heartbeat failed (tried again in %.0f s): %s", interval, exc)


def acquire(output: str, *, run_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "run") -> Lease:
    """Take the lease of ``output`` for ``run_id``: create it, or take over a stale one.

    Raises ``OutputBusy`` (one line: who holds it, since when) if a live run holds it.
    """
    uri = lease_uri(output)
    host, pid = socket.gethostname(), os.getpid()
    record = {"run_id": run_id, "token": uuid.uuid4().hex, "what": what, "host": host, "pid": pid,
              "started": time.time(), "heartbeat": time.time(), "timeout_s": timeout_s}
    version = storage.create_new(uri, _encode(record))
    if version is not None:
        return Lease(uri=uri, run_id=run_id, token=record["token"], timeout_s=timeout_s, record=record,
                     version=version)
    found = storage.read_versioned(uri)
    if found is None:  # released between our create and our read: try once more
        version = storage.create_new(uri, _encode(record))
        if version is None:
            raise OutputBusy(f"{output} is being taken by another run just now; try again")
        return Lease(uri=uri, run_id=run_id, token=record["token"], timeout_s=timeout_s, record=record,
                     version=version)
    data, seen = found
    held = _decode(uri, data)
    why = stale_reason(held)
    if not why:
        age = time.time() - float(held.get("heartbeat", 0))
        raise OutputBusy(
            f"{output} is in use by {held.get('what', 'a run')} {held.get('run_id')} (host {held.get('host')}, "
            f"pid {held.get('pid')}, last heartbeat {age:.0f} s ago): wait for it to end, or use another output; "
            f"if that run is dead, its lease goes stale {float(held.get('timeout_s', DEFAULT_TIMEOUT_S)):.0f} s "
            "after its last heartbeat")
    version = storage.replace_if(uri, _encode(record), seen)
    if version is None:
        raise OutputBusy(f"{output}: another run took over the stale lease of run {held.get('run_id')} just now")
    log.warning("%s: took over the lease of run %s (%s)", output, held.get("run_id"), why)
    return Lease(uri=uri, run_id=run_id, token=record["token"], timeout_s=timeout_s, record=record,
                 version=version, previous=held)


def stale_reason(held: dict, *, now: float | None = None) -> str:
    """Why a lease record is stale ("" if its owner may be alive)."""
    now = time.time() if now is None else now
    if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0))):
        return f"its process {held.get('pid')} on this host is gone"
    age = now - float(held.get("heartbeat", 0))
    timeout = float(held.get("timeout_s", DEFAULT_TIMEOUT_S))
    if age > timeout:
        return f"no heartbeat for {age:.0f} s, more than its {timeout:.0f} s timeout"
    return ""


def check_owner(uri: str, token: str) -> None:
    """Raise ``LeaseLost`` unless the lease at ``uri`` carries ``token`` (a write task's fence)."""
    try:
        held = _decode(uri, storage.read_bytes(uri))
    except storage.StorageError as exc:
        raise LeaseLost(f"{uri}: this run's lease is gone ({exc})") from exc
    if held.get("token") != token:
        raise LeaseLost(f"{uri}: this run's lease was taken over by run {held.get('run_id')}")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _decode(uri: str, data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise storage.StorageError(f"{uri} is not a capray lease: if no run is using the output, delete it")
    return record
