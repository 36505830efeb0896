"""Where a job reads and writes: every location must be reachable from every node, and outputs writable.

On a cluster (the job joins one through ``RAY_ADDRESS``, as under ``ray job submit``) the tasks,
actors and Train workers that read inputs and write outputs run on worker nodes, and on an
autoscaling cluster on nodes that join later. A local path there names each node's own disk: the
output would be scattered over the nodes (and a resumed run could not see it), and what the driver
wrote would be missing where a task reads it. So whenever a job joins a cluster rather than starting
its own local Ray, a local path is refused in one line (exit 2), however many nodes are up at submit
time, unless the user declares that local paths are on a filesystem every node mounts at the same
place (NFS, EFS, Lustre): ``--shared-fs``, or ``CAPRAY_SHARED_FS=1`` in the job's environment.

Outputs are also written to once (an empty probe file, removed at once) before any heavy work, so a
location that cannot be written (permission denied, a file where a folder should be, a missing
bucket) is a one-line exit 2 at the start, not a failure deep inside a Ray task.
"""
from __future__ import annotations

import os
import uuid
from typing import Any

from capray import storage
from capray.errors import ConfigError

SHARED_FS_ENV = "CAPRAY_SHARED_FS"
"""Set to 1 (on the cluster or the job's environment) to declare local paths shared by every node."""
READS_AND_WRITES: dict[str, tuple[str, ...]] = {
    "prepare": ("annotations", "images", "encoder.weights", "out"),
    "train": ("features", "out"),
    "caption": ("input", "checkpoint", "out"),
    "evaluate": ("checkpoint", "features", "out"),
    "demo": ("out",),
}
"""Per command, the config fields (dotted for nested ones) naming locations that tasks on other nodes
read or write. ``attend`` and ``synth`` run in the job's own process only."""
OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("out",),
    "train": ("out",),
    "caption": ("out",),
    "evaluate": ("out",),
}
"""Per command, the config fields naming locations it writes (probed before any heavy work)."""
_NOT_LOCATIONS = frozenset({"", "imagenet", "none"})
"""Values of a location field that name no location (``--encoder.weights imagenet``)."""


def shared_fs(config: Any) -> bool:
    """Whether the user declared local paths shared by every node (``--shared-fs`` or ``CAPRAY_SHARED_FS``)."""
    return bool(getattr(config, "shared_fs", False)) or os.environ.get(SHARED_FS_ENV, "") not in ("", "0")


def locations(command: str, config: Any, fields: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(flag, URI) of every location ``fields`` names for ``command`` in ``config``."""
    found = []
    for name in fields.get(command, ()):
        value: Any = config
        for part in name.split("."):
            value = getattr(value, part)
        for uri in (value if isinstance(value, tuple) else (value,)):
            if uri not in _NOT_LOCATIONS:
                found.append((f"--{name.replace('_', '-')}", uri))
    return found


def check_reachable(command: str, config: Any) -> None:
    """Refuse local paths when the job joins a cluster and the user has not declared them shared."""
    from capray.connect import is_local

    if is_local() or shared_fs(config):
        return
    local = [f"{flag} {uri}" for flag, uri in locations(command, config, READS_AND_WRITES) if not storage.is_remote(uri)]
    if not local:
        return
    how = "--shared-fs or " if hasattr(config, "shared_fs") else ""
    raise ConfigError(
        f"{', '.join(local)}: a local path, but this job runs on the Ray cluster at "
        f"{os.environ.get('RAY_ADDRESS')}, whose tasks run on other nodes (also ones that join later) and would "
        f"each use their own disk; use s3:// locations, or declare a filesystem that every node mounts at the "
        f"same path with {how}{SHARED_FS_ENV}=1")


def check_writable(uri: str) -> None:
    """Write and remove an empty probe file in ``uri`` (creating its folders): a ``StorageError`` (exit 2)
    if it cannot be written, a ``TransientStorageError`` (exit 1) if the store fails for now."""
    probe = storage.join(uri, f".capray-write-check-{uuid.uuid4().hex[:8]}")
    storage.write_bytes(probe, b"")
    storage.delete_file(probe)


def check_locations(command: str, config: Any) -> None:
    """Every check of this module for one job, before it starts Ray or any heavy work."""
    check_reachable(command, config)
    for flag, uri in locations(command, config, OUTPUTS):
        storage.check_bucket(uri)
        try:
            check_writable(uri)
        except storage.StorageError as exc:
            raise storage.StorageError(f"{flag} {uri} cannot be written: {exc}") from exc
