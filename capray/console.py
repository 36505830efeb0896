"""What reaches the console: a command's own lines; Ray's own output only with ``--verbose``.

Ray Data's execution plans and progress and Ray Train's lines about every report and checkpoint go
to Ray's log files (``ray-data.log`` and the session's other logs); ``--verbose`` (``CAPRAY_VERBOSE``)
keeps them on the console too, with the workers' output.
"""
from __future__ import annotations

import logging
import os

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


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; our epoch line says the same in one line.

    Some of its modules name their logger by file path rather than by module, hence the second loop.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    marker = os.path.join("ray", "train", "")
    for name in list(logging.root.manager.loggerDict):
        if marker in name:
            logging.getLogger(name).setLevel(logging.WARNING)
