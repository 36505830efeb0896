"""Running ``capray`` as a user does, for tests: in this process through ``cli.main`` (fast), or as a
real process (the entry point, its imports, its whole stderr)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys

from capray import cli


def run_cli_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m capray.cli ARGS`` for real: the entry point, its imports and its whole stderr."""
    return subprocess.run([sys.executable, "-m", "capray.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``capray ARGS`` in this process, through the same ``cli.main`` the console script calls: its exit
    code, and what it printed or logged (at the INFO level a command runs with) on stdout and stderr.
    A process costs a Python with torch imported, seconds each; each command runs in one real process
    too (``test_help_works_for_every_subcommand`` and the tests that call ``run_cli_process``)."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.addFilter(lambda record: not record.name.startswith("werkzeug"))  # the in-process S3 server's requests
    root = logging.getLogger()
    saved_level, saved_env = root.level, {k: os.environ.get(k) for k in {"RAY_ADDRESS", *(env or {})}}
    os.environ.update({"RAY_ADDRESS": "", **(env or {})})
    root.addHandler(handler)
    root.setLevel(os.environ.get("CAPRAY_LOG_LEVEL", "INFO").upper())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse: usage errors and --help
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["capray", *args], code, out.getvalue(), err.getvalue())


def refuse_to_start_ray(**_) -> None:
    """Put in place of ``capray.connect.ensure_ray``: a command that must refuse its configuration before
    any Ray starts fails the test if it gets that far."""
    raise AssertionError("the job started or joined a Ray before refusing its configuration")


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
