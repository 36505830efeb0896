"""Waiting, bounded and with a log line, until an autoscaling cluster has made room for a job's minimum.

On a cluster the head has 0 CPUs and the worker nodes a job needs may not be up when it starts; Ray
itself would wait forever without a word (Ray Data for its first actor, Ray Train for its workers).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

WAIT_LOG_EVERY_S = 30.0
"""While waiting for the autoscaler, a progress line this often."""


class ResourceWaitTimeout(TimeoutError):
    """The cluster did not make room for a job's minimum within ``--wait-timeout`` (exit 1: retry later)."""


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
