"""The README's commands stay true: every `capray ...` and `jobs/<job>.py ...` line in its code blocks
parses with capray's own command-line parser, and every job file it names exists.

The commands themselves run at full size only in `make demo` (the local sequence) and on a cluster;
the same code paths run at test size in test_training_pipeline, test_captioning and test_cluster_jobs.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from capray.cli import build, parser
from capray.config import COMMANDS

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[list[str]]:
    """Each shell command of the README's code blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def _capray_invocations() -> list[tuple[str, list[str]]]:
    """(subcommand, its arguments) for every `capray X ...` and `python jobs/X.py ...` in the README."""
    found = []
    for words in _commands():
        for i, word in enumerate(words):
            if word.endswith("/capray") or word == "capray":
                found.append((words[i + 1], words[i + 2:]))
                break
            job = re.fullmatch(r"jobs/(\w+)\.py", word)
            if job:
                found.append((job.group(1), words[i + 1:]))
                break
    return found


def test_the_readme_shows_every_job_both_ways():
    invocations = _capray_invocations()
    local = {c for c, _ in invocations}
    assert {"synth", "prepare", "train", "caption", "evaluate", "attend"} <= local
    jobs = {w for words in _commands() for w in words if w.startswith("jobs/")}
    assert {"jobs/prepare.py", "jobs/train.py", "jobs/caption.py", "jobs/evaluate.py"} <= jobs
    for job in jobs:
        assert (README.parent / job).is_file(), f"the README names {job}, which does not exist"


@pytest.mark.parametrize("command,args", _capray_invocations(),
                         ids=lambda value: value if isinstance(value, str) else "")
def test_every_readme_command_parses_with_current_names(command, args, capsys, tmp_path):
    assert command in COMMANDS, f"the README runs `capray {command}`, which does not exist"
    if "--config" in args:  # the README shows the file in a block of its own, headed "# NAME"
        at = args.index("--config") + 1
        block = re.search(rf"```\n# {re.escape(args[at])}\n(.*?)```", README.read_text(), flags=re.S)
        assert block, f"the README passes --config {args[at]} but does not show that file"
        (tmp_path / args[at]).write_text(block.group(1))
        args = [*args[:at], str(tmp_path / args[at]), *args[at + 1:]]
    try:
        build(command, parser(command).parse_args(args))
    except SystemExit as exc:
        pytest.fail(f"`capray {command} {' '.join(args)}` does not parse (exit {exc.code})")
    assert "deprecated" not in capsys.readouterr().err, f"`capray {command}` in the README uses an old flag name"


# --- the local block, run for real ---------------------------------------------------------------------

SMALLER = {
    "synth": ["--num-images", "80", "--image-size", "64"],
    "prepare": ["--encoder.image-size", "64", "--actors", "1"],
    "train": ["--epochs", "1", "--batch-size", "16", "--workers", "1"],
}
"""Flags appended to the README's local commands (the last occurrence of a flag wins): only sizes change,
the work and the processes doing it (one encoder actor, one Train worker; two of each run in
test_training_pipeline)."""


def _local_block() -> str:
    """The README's "Locally" code block, continuation lines joined: one command per line."""
    section = README.read_text().split("### Locally", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, flags=re.S).group(1)
    return re.sub(r"\\\n\s*", " ", block).strip()


@pytest.mark.slow
def test_the_readme_local_block_runs_from_a_fresh_folder(tmp_path, ray_local):
    """Every local command, relative paths and all, in a folder that is not the repository.

    Relative paths must be resolved where the user typed them: Ray's workers (Train workers above
    all) run in Ray's working directory, where ``data/features`` means something else. ``ray_local``
    is another Ray running on the machine meanwhile, as users have: each command's own local Ray must
    neither join it nor lose track of itself (Ray Train's helpers look "the" cluster up). And the shell
    holds the README's ``export RAY_ADDRESS=http://...`` of the cluster section (here an address where
    nothing listens): a job server's address, not a cluster, so each command says once that it runs
    on a local Ray, and does.
    """
    import os
    import shutil
    import subprocess
    import tempfile

    lines = _local_block().splitlines()
    assert [shlex.split(line)[1] for line in lines] == [
        "synth", "prepare", "train", "caption", "evaluate", "attend", "gallery"]
    script = "set -euo pipefail\n" + "\n".join(
        line + "".join(f" {shlex.quote(x)}" for x in SMALLER.get(shlex.split(line)[1], [])) for line in lines)
    (tmp_path / ".venv").symlink_to(README.parent / ".venv")  # the README's `.venv/bin/capray`
    ray_dir = tempfile.mkdtemp(prefix="capray-readme-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update({"RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120", "RAY_ADDRESS": "http://127.0.0.1:9"})
    try:
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
    finally:  # each command stopped its own Ray; its session logs are not worth keeping in /tmp
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    data = tmp_path / "data"
    assert (data / "features" / "prepare.json").is_file()
    assert list((data / "runs" / "shapes").glob("checkpoint_*/model.pt"))
    assert list((data / "captions").glob("*.parquet")) and (data / "captions" / "summary.json").is_file()
    assert (data / "eval" / "metrics.json").is_file()
    assert (tmp_path / "att.png").stat().st_size > 0
    assert "<img" in (tmp_path / "gallery.html").read_text()
    assert "Traceback" not in result.stderr, result.stderr[result.stderr.index("Traceback") - 500:][:3000]
    # A console worth reading: capray's own lines, an epoch line from the driver, none of Ray's chatter.
    console = result.stdout + result.stderr
    assert "epoch 1/1  train loss" in console, console[-3000:]
    for chatter in ("Execution plan of Dataset", "Starting execution of Dataset", "(RayTrainWorker", "(raylet)",
                    "logging_progress", "RayDeprecationWarning"):
        assert chatter not in console, (chatter, console[-3000:])
    assert len(console.splitlines()) < 80, console
    warned = [line for line in console.splitlines() if "RAY_ADDRESS=http://127.0.0.1:9 is a Ray job server's" in line]
    assert len(warned) == 4 and all("runs on a local Ray" in line for line in warned), console  # each Ray job
