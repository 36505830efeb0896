"""A training run's record as it goes: ``metrics.jsonl``, TensorBoard events, and the epoch lines on the console.

Rank 0 appends each epoch to ``RUN/metrics.jsonl`` and to TensorBoard event files under
``RUN/tensorboard/``; the driver tails ``metrics.jsonl`` to print one line per epoch while the
trainer runs (``EpochLines``). Everything goes through ``capray.storage``: a run folder may be on S3.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref

from capray import storage
from capray.console import verbose

log = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
"""``OUT/NAME/metrics.jsonl``: one line of metrics per epoch, written by rank 0 as the run goes."""
TENSORBOARD_DIR = "tensorboard"
"""``OUT/NAME/tensorboard/``: TensorBoard event files of the run's epochs (``tensorboard --logdir``)."""


def append_metrics(uri: str, metrics: dict) -> None:
    """One JSON line per epoch in ``RUN/metrics.jsonl``; an epoch redone after a failure replaces its line.

    The file is rewritten whole (S3 cannot append); it holds one short line per epoch.
    """
    kept = [m for m in _read_jsonl(uri) if m["epoch"] < metrics["epoch"]]
    storage.write_text(uri, "".join(json.dumps(m) + "\n" for m in [*kept, metrics]))


def read_metrics(run_dir: str) -> list[dict]:
    """A run's ``metrics.jsonl``: one dict per epoch, in order ([] before the first epoch ends)."""
    return _read_jsonl(storage.join(run_dir, METRICS_LOG))


def _read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()] \
        if storage.exists(uri) else []


def epoch_line(metrics: dict, epochs: int) -> str:
    bleu = f"val BLEU-4 {metrics['val_bleu4']:.3f}" if metrics["val_bleu4"] >= 0 else "val BLEU-4   -  "
    return (f"epoch {metrics['epoch'] + 1}/{epochs}  train loss {metrics['train_loss']:.3f}  "
            f"val loss {metrics['val_loss']:.3f}  {bleu}  ({metrics['train_images_per_s']:.0f} images/s, "
            f"{metrics['seconds']:.1f} s)")


class EpochLines:
    """While the trainer runs: the driver logs each epoch's line from ``metrics.jsonl`` as it appears.

    The workers' own console output reaches the driver only with ``--verbose`` (then they say it).
    ``logger``: the driver's, so that the lines read as the job's own.
    """

    def __init__(self, uri: str, *, epochs: int, logger: logging.Logger = log, poll_s: float = 2.0):
        self.uri, self.epochs, self.logger, self.poll_s = uri, epochs, logger, poll_s
        self.printed = -1
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="capray-epoch-lines", daemon=True)

    def __enter__(self) -> "EpochLines":
        if not verbose():
            self.printed = max((e["epoch"] for e in self._read()), default=-1)  # a resumed run's are old news
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()

    def _read(self) -> list[dict]:
        try:
            return _read_jsonl(self.uri)
        except (OSError, ValueError):  # mid-rewrite on a local disk, or a transient S3 error: next poll
            return []

    def _run(self) -> None:
        while True:
            stopping = self.done.wait(self.poll_s)
            for metrics in self._read():
                if metrics["epoch"] > self.printed:
                    self.logger.info("%s", epoch_line(metrics, self.epochs))
                    self.printed = metrics["epoch"]
            if stopping:
                return


class EventLog:
    """A run's epochs as TensorBoard scalars, written by rank 0 with tensorboardX.

    In a local run folder the event file is written in place. For S3, which cannot append, events go
    to a local file and after each epoch the file is copied whole into ``uri`` (~300 bytes per epoch).
    tensorboardX's ``EventsWriter`` writes synchronously (its ``SummaryWriter`` queues events for a
    thread that ``flush`` does not wait for). A worker group restarted after a failure starts a file
    of its own (a random suffix keeps two started in the same second apart); TensorBoard reads every
    file of the folder.
    """

    SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "bleu4/val": "val_bleu4", "lr": "lr",
               "images_per_s/train": "train_images_per_s"}
    """TensorBoard tag → metrics key."""

    def __init__(self, uri: str):
        from tensorboardX.event_file_writer import EventsWriter

        self.uri, self._copied = uri, storage.is_remote(uri)
        if self._copied:
            folder = tempfile.mkdtemp(prefix="capray-events-")
            # The local copy goes when the log closes, or when the process exits without closing it
            # (a process killed outright leaves it: ~300 bytes per epoch in the temp folder).
            self._remove = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        else:
            storage.makedirs(uri)
            folder, self._remove = storage.resolve(uri)[1], None
        suffix = f".{uuid.uuid4().hex[:8]}"
        self.writer = EventsWriter(os.path.join(folder, "events"), filename_suffix=suffix)
        (name,) = (n for n in os.listdir(folder) if n.endswith(suffix))  # events.out.tfevents.<time>.<host><suffix>
        self.path = os.path.join(folder, name)

    def add(self, metrics: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for tag, key in self.SCALARS.items():
            if key != "val_bleu4" or metrics[key] >= 0:  # -1: not validated this epoch
                self.writer.write_event(Event(wall_time=time.time(), step=metrics["epoch"] + 1,
                                              summary=scalar(tag, metrics[key])))
        self.writer.flush()
        if self._copied:
            with open(self.path, "rb") as f:
                storage.write_bytes(storage.join(self.uri, os.path.basename(self.path)), f.read())

    def close(self) -> None:
        """Close the file (and remove the local copy of an S3 run's); every epoch added is in ``uri``."""
        self.writer.close()
        if self._remove is not None:
            self._remove()
