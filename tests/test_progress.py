"""capray.progress: the progress line's text, and lines at the configured cadence from a real Ray actor."""
from __future__ import annotations

import logging
import re
import time

import pytest

from capray.progress import Progress, duration, progress_line, report


def test_a_line_says_done_of_total_the_rate_errors_and_eta():
    line = progress_line("caption", done=12_000, total=1_000_000, errors=3, rate=400.0)
    assert line == "caption: 12,000/1,000,000 images (1.2%), 400 images/s, 3 error rows, ETA 41 min"


def test_a_line_without_a_total_or_a_rate_says_what_it_knows():
    assert progress_line("prepare", done=50, total=None, errors=0, rate=None) == "prepare: 50 images, - images/s, 0 error rows"
    assert progress_line("caption", done=10, total=20, errors=0, rate=0.0).endswith("ETA -")
    assert progress_line("caption", done=20, total=20, errors=1, rate=5.0).endswith("ETA 0 s")


@pytest.mark.parametrize("seconds,text", [(0.4, "0 s"), (45, "45 s"), (89, "89 s"), (600, "10 min"),
                                          (5340, "89 min"), (3 * 3600 + 300, "3 h 05 min")])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert duration(seconds) == text


def test_a_cadence_below_one_second_is_refused():
    with pytest.raises(ValueError, match="at least 1 s"):
        Progress("caption", total=10, every_s=0.2)


def test_lines_come_at_the_cadence_with_what_the_workers_reported(ray_local, caplog):
    import ray

    @ray.remote(num_cpus=0)
    def work(counter, steps: int):
        for _ in range(steps):
            report(counter, 10, errors=1)
            time.sleep(0.25)

    caplog.set_level(logging.INFO, logger="capray.progress")
    with Progress("caption", total=1000, every_s=1.0, done_before=100) as progress:
        started = time.monotonic()
        ray.get(work.remote(progress.counter, 14))  # 3.5 s of work
        time.sleep(1.2)  # one more line after the work is done, then the last one
        elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if r.name == "capray.progress"]
    # At most one a second and the last one; at least one every few seconds even on a loaded machine,
    # where each line waits for the counter's answer and the interval stretches by that much.
    assert max(2, int(elapsed) // 3) <= len(lines) <= int(elapsed) + 2, lines
    counts = [int(re.match(r"caption: ([\d,]+)/1,000 images", line).group(1).replace(",", "")) for line in lines]
    assert counts == sorted(counts) and counts[0] > 100, lines  # done_before counts, never goes back
    assert counts[-1] == 100 + 140 and lines[-1].split(", ")[2] == "14 error rows", lines
    # 40 images/s at most are reported (fewer when the machine is loaded), measured per interval
    rates = [float(re.search(r", ([\d,.]+) images/s", line).group(1).replace(",", "")) for line in lines[:3]]
    assert all(r <= 60 for r in rates) and any(r > 0 for r in rates), lines
