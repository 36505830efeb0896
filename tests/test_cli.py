"""The command line's contract: bad usage or configuration → exit 2 and one line on stderr, fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from capray import cli


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capray.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_every_job_file_shares_its_subcommand_parser():
    for command in ("prepare", "train", "caption", "evaluate"):
        job_flags = {a.dest for a in cli.parser(command)._actions}
        sub = cli.parser()._subparsers._group_actions[0].choices[command]
        assert job_flags == {a.dest for a in sub._actions}
        assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "jobs", f"{command}.py"))


def test_train_on_a_folder_that_is_not_a_feature_dataset(tmp_path):
    result = run_cli("train", "--features", str(tmp_path / "nothing"), "--out", str(tmp_path / "runs"))
    assert_one_line_exit_2(result, "not a feature dataset")


def test_train_rejects_bad_numbers(tmp_path):
    result = run_cli("train", "--features", str(tmp_path), "--out", str(tmp_path), "--epochs", "0")
    assert_one_line_exit_2(result, "--epochs")


def test_prepare_with_a_missing_annotation_file(tmp_path):
    result = run_cli("prepare", "--annotations", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "f"))
    assert_one_line_exit_2(result, "missing.jsonl")


def test_prepare_with_a_malformed_manifest_names_file_and_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["x"], "split": "train"}) + "\n{oops\n")
    result = run_cli("prepare", "--annotations", str(manifest), "--out", str(tmp_path / "f"))
    assert_one_line_exit_2(result, "m.jsonl line 2")


def test_prepare_with_imagenet_weights_offline_points_to_the_way_out(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red circle"], "split": "train"}) + "\n")
    result = run_cli("prepare", "--annotations", str(manifest), "--out", str(tmp_path / "f"),
                     "--encoder", "resnet18", "--weights", "imagenet",
                     env={"TORCH_HOME": str(tmp_path / "torch-home"), "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert_one_line_exit_2(result, "--weights none")


def test_prepare_with_an_unknown_encoder(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red circle"], "split": "train"}) + "\n")
    result = run_cli("prepare", "--annotations", str(manifest), "--out", str(tmp_path / "f"),
                     "--encoder", "no_such_net", "--weights", "none")
    assert_one_line_exit_2(result, "unknown encoder")


def test_evaluate_with_a_missing_checkpoint(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    (features / "prepare.json").write_text(json.dumps({"splits": {"test": {"images": 1}}, "num_features": 8}))
    result = run_cli("evaluate", "--checkpoint", str(tmp_path / "nope"), "--features", str(features),
                     "--out", str(tmp_path / "eval"))
    assert_one_line_exit_2(result, "--checkpoint")


def test_missing_required_flag_is_usage_error():
    result = run_cli("caption", "--input", "x")
    assert result.returncode == 2 and "--output" in result.stderr


@pytest.mark.parametrize("command", ["synth", "prepare", "train", "caption", "evaluate", "attend", "demo"])
def test_help_works_for_every_subcommand(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and f"capray {command}" in result.stdout
