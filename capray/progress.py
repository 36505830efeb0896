"""Progress lines of long jobs: images done / total, images/s over the last interval, error rows, ETA.

The actors that do per-image work (captioners, encoders) add what they finished to one small Ray actor,
``ProgressCounter`` (0 CPUs, so it fits on a head node that has none); a thread in the driver reads
it every ``every_s`` seconds and logs one line. The line goes through ``logging``, the way every other
capray line does, so it reaches the console and ``ray job logs`` without a TTY and without
``--verbose``, at most a few lines a minute.

The counts are what the actors have finished, not what is written: a task that Ray runs again after a
lost node counts twice here, never in the output. The run's own summary has the exact numbers.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

MIN_EVERY_S = 1.0
"""The shortest cadence accepted: below it the log would be mostly progress lines."""


def progress_line(what: str, *, done: int, total: int | None, errors: int, rate: float | None) -> str:
    """``caption: 12,000/1,000,000 images (1.2%), 410 images/s, 3 error rows, ETA 40 min``."""
    count = f"{done:,}/{total:,} images ({100 * done / total:.1f}%)" if total else f"{done:,} images"
    speed = f"{rate:,.0f} images/s" if rate is not None else "- images/s"
    eta = ""
    if total:
        left = max(0, total - done)
        eta = ", ETA " + (duration(left / rate) if rate else "-") if left else ", ETA 0 s"
    return f"{what}: {count}, {speed}, {errors:,} error rows{eta}"


def duration(seconds: float) -> str:
    """A short human duration: ``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class ProgressCounter:
    """Ray actor (0 CPUs): the running totals the workers add to and the driver reads."""

    def __init__(self):
        self.done = self.errors = 0

    def add(self, done: int, errors: int = 0) -> None:
        self.done += done
        self.errors += errors

    def totals(self) -> tuple[int, int]:
        return self.done, self.errors


def report(counter, done: int, errors: int = 0) -> None:
    """From a worker: add finished images to ``counter`` (an actor handle, or None) without waiting."""
    if counter is not None and (done or errors):
        counter.add.remote(done, errors)


class Progress:
    """Context manager in the driver: starts the counter actor, logs a line every ``every_s`` seconds and a
    last one when the work ends.

    ``counter`` is the handle to pass to the workers. ``total`` may be None (unknown, e.g. samples of
    shards not yet read); ``done_before`` counts images finished before this run (a resumed run), so
    done / total is the whole job's while the rate is this run's.
    """

    def __init__(self, what: str, *, total: int | None, every_s: float, done_before: int = 0):
        if every_s < MIN_EVERY_S:
            raise ValueError(f"progress every {every_s:g} s: at least {MIN_EVERY_S:g} s")
        self.what, self.total, self.every_s, self.done_before = what, total, every_s, done_before
        self.counter = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capray-progress", daemon=True)
        self._last: tuple[float, int] | None = None

    def __enter__(self) -> "Progress":
        import ray

        self.counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
        self._last = (time.monotonic(), 0)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:  # the last line: where the work ended
            text = self.line()
            if text:
                log.info("%s", text)
        import ray

        ray.kill(self.counter)

    def line(self) -> str | None:
        """The line for now, from the counter's totals; None when the counter cannot be read."""
        import ray

        try:
            done, errors = ray.get(self.counter.totals.remote(), timeout=10)
        except Exception as exc:  # a slow head must not stop the job: this line is skipped, not the run
            log.warning("progress: the counter did not answer (%s); next try in %g s", exc, self.every_s)
            return None
        now = time.monotonic()
        then, done_then = self._last
        self._last = (now, done)
        rate = (done - done_then) / (now - then) if now > then else None
        return progress_line(self.what, done=self.done_before + done, total=self.total, errors=errors, rate=rate)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            text = self.line()
            if text:
                log.info("%s", text)
