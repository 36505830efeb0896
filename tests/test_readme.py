"""The README's commands stay true: every `capray ...` and `jobs/<job>.py ...` line in its code blocks
parses with capray's own command-line parser, and every job file it names exists.

The commands themselves run at full size only in `make demo` (the local sequence) and on a cluster;
the same code paths run at test size in test_training_pipeline, test_captioning and test_job_submit.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from capray.cli import COMMANDS, parser

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
def test_every_readme_command_parses(command, args):
    assert command in COMMANDS, f"the README runs `capray {command}`, which does not exist"
    try:
        parser(command).parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`capray {command} {' '.join(args)}` does not parse (exit {exc.code})")
