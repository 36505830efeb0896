"""The command line's contract: bad usage or configuration → exit 2 and one line on stderr, fast."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import textwrap
import typing

import pytest

from capray import cli
from capray import config as configs
from clirun import assert_one_line_exit_2, run_cli, run_cli_process


def test_every_job_file_shares_its_subcommand_parser():
    for command in ("prepare", "train", "caption", "evaluate", "gallery"):
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
    result = run_cli_process("prepare", "--annotations", str(manifest), "--out", str(tmp_path / "f"),
                             "--encoder.name", "resnet18", "--encoder.weights", "imagenet",
                     env={"TORCH_HOME": str(tmp_path / "torch-home"), "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert_one_line_exit_2(result, "--weights none")


def test_prepare_with_an_unknown_encoder(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red circle"], "split": "train"}) + "\n")
    result = run_cli("prepare", "--annotations", str(manifest), "--out", str(tmp_path / "f"),
                     "--encoder.name", "no_such_net", "--encoder.weights", "none")
    assert_one_line_exit_2(result, "unknown encoder")


def test_evaluate_with_a_missing_checkpoint(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    (features / "prepare.json").write_text(json.dumps({"splits": {"test": {"images": 1}}, "num_features": 8}))
    result = run_cli_process("evaluate", "--checkpoint", str(tmp_path / "nope"), "--features", str(features),
                             "--out", str(tmp_path / "eval"))
    assert_one_line_exit_2(result, "--checkpoint")


def test_missing_required_flags_are_one_usage_error():
    result = run_cli_process("caption", "--input", "x")
    assert_one_line_exit_2(result, "--out", "--checkpoint")


def test_a_bad_number_is_one_usage_error():
    assert_one_line_exit_2(run_cli("train", "--features", "f", "--out", "o", "--epochs", "many"), "--epochs")


@pytest.mark.parametrize("command", ["synth", "prepare", "train", "caption", "evaluate", "attend", "gallery", "demo"])
def test_help_works_for_every_subcommand(command):
    result = run_cli_process(command, "--help")
    assert result.returncode == 0 and f"capray {command}" in result.stdout


# --- one source of truth: the configs ------------------------------------------------------------

def _expected_flags(cls: type, prefix: str = "") -> list[str]:
    """Every flag a config must have, worked out here from dataclasses.fields alone."""
    flags = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            flags += _expected_flags(hint, prefix if f.metadata.get("flat") else f"{prefix}{f.name}.")
        else:
            flags.append(f"--{prefix}{f.name.replace('_', '-')}")
    return flags


@pytest.mark.parametrize("command", sorted(configs.COMMANDS))
def test_every_field_of_every_job_config_has_a_flag_in_help(command):
    help_text = cli.parser(command).format_help()
    flags = _expected_flags(configs.COMMANDS[command])
    assert len(flags) >= 3
    missing = [flag for flag in flags if not re.search(rf"(^|[\s\[]){re.escape(flag)}[\s\]]", help_text)]
    assert not missing, f"capray {command} --help lacks {missing}"
    # ... and each documents itself: no field is without its docstring.
    assert all(cli.field_docs(cls) for cls in (configs.COMMANDS[command],))
    undocumented = [o.flag for o in cli.options(configs.COMMANDS[command]) if not o.help]
    assert not undocumented


@pytest.mark.parametrize("command", sorted(configs.COMMANDS))
def test_every_flag_sets_its_field(command):
    """Each flag, given a value unlike its default, lands in the config built from the command line."""
    cls = configs.COMMANDS[command]
    required = {"features": "f", "out": "o", "checkpoint": "c", "input": "i", "image": "x.png",
                "annotations": "a.jsonl", "num_images": "7", "captions": "c"}
    base = [arg for o in cli.options(cls) if o.required for arg in (o.flag, required[o.path[-1]])]
    for option in cli.options(cls):
        if option.required:
            continue
        args = cli.parser(command).parse_args(base + _other_args(command, option))
        got = functools.reduce(getattr, option.path, cli.build(command, args))
        assert got != option.default, (option.flag, got)


def _other_args(command: str, option: cli.Option) -> list[str]:
    """The flag with a valid value unlike its default (and what that value needs beside it)."""
    if command == "synth" and option.flag.endswith("-fraction"):  # the three must still sum to 1
        other = "--val-fraction" if option.flag == "--train-fraction" else "--train-fraction"
        return [option.flag, "0.2" if option.flag != "--train-fraction" else "0.7", other,
                "0.7" if other == "--train-fraction" else "0.2"]
    special = {"--splits": "train", "--extensions": "png", "--decoder": "lstm", "--split": "val", "--format": "parquet", "--val-fraction": "0.1",
               "--encoder.weights": "none", "--test-fraction": "0.2", "--dropout": "0.5", "--name": "other",
               "--label-smoothing": "0.1", "--positions": "learned",
               "--encoder.name": "resnet18"}
    if option.kind is bool:  # --x, or --no-x where the default is on
        return ["--no-" + option.flag[2:] if option.default else option.flag]
    if option.flag in special:
        return [option.flag, special[option.flag]]
    if option.kind in (str, tuple):
        return [option.flag, "elsewhere"]
    return [option.flag, str(option.kind(option.default) * 2 + 64)]


def test_a_config_file_with_overrides_gives_the_expected_config(tmp_path):
    (tmp_path / "run.yaml").write_text(textwrap.dedent("""\
        annotations: [s3://b/coco/captions_train2014.json, s3://b/coco/captions_val2014.json]
        images: [s3://b/coco/train2014, s3://b/coco/val2014]
        out: s3://b/features
        encoder: {name: resnet101, image-size: 256}
        batch_size: 16
        splits: train,val
        """))
    args = cli.parser("prepare").parse_args(["--config", str(tmp_path / "run.yaml"), "--batch-size", "64",
                                             "--encoder.weights", "none", "--images", "s3://b/a", "--images",
                                             "s3://b/v"])
    config = cli.build("prepare", args)
    assert config == configs.PrepareConfig(
        annotations=("s3://b/coco/captions_train2014.json", "s3://b/coco/captions_val2014.json"),
        images=("s3://b/a", "s3://b/v"), out="s3://b/features", batch_size=64, splits=("train", "val"),
        encoder=configs.EncoderSpec(name="resnet101", image_size=256, weights="none"))


def test_the_command_line_and_a_config_file_give_the_same_config(tmp_path):
    (tmp_path / "train.yaml").write_text("features: f\nout: o\nepochs: 90\nlearning_rate: 0.003\n"
                                         "gpus_per_worker: 1\ndecoder: lstm\n")
    from_file = cli.build("train", cli.parser("train").parse_args(["--config", str(tmp_path / "train.yaml")]))
    from_flags = cli.build("train", cli.parser("train").parse_args(
        ["--features", "f", "--out", "o", "--epochs", "90", "--learning-rate", "0.003", "--gpus-per-worker", "1",
         "--decoder", "lstm"]))
    assert from_file == from_flags


POOL_COMMANDS = {"prepare": ["--annotations", "a.jsonl", "--out", "o"],
                 "caption": ["--input", "i", "--out", "o", "--checkpoint", "c"],
                 "evaluate": ["--checkpoint", "c", "--features", "f", "--out", "o"]}


@pytest.mark.parametrize("command", sorted(POOL_COMMANDS))
def test_the_actor_pool_takes_flat_flags_and_flat_config_keys(command, tmp_path):
    (tmp_path / "pool.yaml").write_text("actors: 2\nmax_actors: 4\ngpus_per_actor: 1\ncpus_per_actor: 0.5\n")
    from_file = cli.build(command, cli.parser(command).parse_args([*POOL_COMMANDS[command], "--config",
                                                                   str(tmp_path / "pool.yaml")]))
    from_flags = cli.build(command, cli.parser(command).parse_args(
        [*POOL_COMMANDS[command], "--actors", "2", "--max-actors", "4", "--gpus-per-actor", "1",
         "--cpus-per-actor", "0.5"]))
    assert from_file.pool == from_flags.pool == configs.ActorPool(actors=2, max_actors=4, gpus_per_actor=1.0,
                                                                  cpus_per_actor=0.5)


@pytest.mark.parametrize("command", sorted(POOL_COMMANDS))
@pytest.mark.parametrize("flags, needle", [
    (["--actors", "-1"], "--actors must not be negative, got -1"),
    (["--gpus-per-actor", "-0.5"], "--gpus-per-actor must not be negative"),
    (["--actors", "4", "--max-actors", "2"], "--max-actors 2 is below --actors 4"),
])
def test_a_bad_actor_pool_is_one_usage_error(command, flags, needle):
    assert_one_line_exit_2(run_cli(command, *POOL_COMMANDS[command], *flags), needle)


def test_option_values_are_keyed_as_a_config_file_is():
    """prepare.json's ``config`` and prepare's run record read these keys: flat fields stay at the top."""
    config = configs.PrepareConfig(annotations="a.jsonl", out="o", pool=configs.ActorPool(actors=3),
                                   shard_columns=configs.ShardColumns(image_column="jpg", key_column="id"))
    values = configs.option_values(config)
    assert (values["actors"], values["image_column"], values["key_column"]) == (3, "jpg", "id")
    assert values["encoder"] == config.encoder.to_dict() and "pool" not in values and "shard_columns" not in values


def test_a_boolean_from_a_config_file_can_be_turned_off_by_a_flag(tmp_path):
    (tmp_path / "c.yaml").write_text("input: i\nout: o\ncheckpoint: c\noverwrite: true\n")
    args = cli.parser("caption").parse_args(["--config", str(tmp_path / "c.yaml"), "--no-overwrite"])
    assert cli.build("caption", args).overwrite is False


@pytest.mark.parametrize("text, needle", [
    ("features: f\nout: o\nepochs_total: 3\n", "no option 'epochs_total'"),
    ("features: f\nout: o\nepochs: [1, 2]\n", "--epochs takes one int"),
    ("features: f\nout: o\nepochs: 0\n", "--epochs must be at least 1"),
    ("- features\n", "expected a mapping"),
    ("features: [unclosed\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_usage_error(tmp_path, text, needle):
    (tmp_path / "bad.yaml").write_text(text)
    assert_one_line_exit_2(run_cli("train", "--config", str(tmp_path / "bad.yaml")), needle)


def test_a_missing_config_file_is_one_usage_error(tmp_path):
    assert_one_line_exit_2(run_cli("train", "--config", str(tmp_path / "none.yaml")), "none.yaml")


@pytest.mark.parametrize("command, old, new", [
    (command, old, new) for command, renamed in configs.RENAMED.items() for old, new in renamed.items()])
def test_old_flag_names_still_work_and_warn(command, old, new, capsys):
    cls = configs.COMMANDS[command]
    required = {"features": "f", "out": "o", "checkpoint": "c", "input": "i", "annotations": "a.jsonl"}
    base = [arg for o in cli.options(cls) if o.required and o.flag not in (old, new[0])
            for arg in (o.flag, required[o.path[-1]])]
    value = list(new[1:]) or [{"--encoder": "resnet18", "--weights": "none", "--image-size": "64",
                               "--encoder-layer": "layer4", "--lr": "0.003"}.get(old, "elsewhere")]
    old_args = base + ([old] if len(new) > 1 else [old, value[0]])
    via_old = cli.build(command, cli.parser(command).parse_args(old_args))
    assert f"{old} is deprecated" in capsys.readouterr().err
    via_new = cli.build(command, cli.parser(command).parse_args(base + [new[0], value[0]]))
    assert via_old == via_new


# --- exit codes: 2 for what the user must fix, 1 for the rest; locations checked first --------------

def _feature_dataset(root, *, rows: dict[str, int], damaged: str | None = None):
    """A feature dataset as train reads it first: prepare.json, vocab.json and split files (any columns:
    train's checks read only the footers). ``damaged``: a split whose file is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capray.vocab import Vocabulary

    root.mkdir(parents=True)
    (root / "prepare.json").write_text(json.dumps({
        "splits": {s: {"images": n, "captions": n} for s, n in rows.items()}, "num_features": 8,
        "num_regions": 4, "encoder": {}}))
    Vocabulary.build(["a red circle", "a blue square"]).save(str(root / "vocab.json"))
    for split, n in rows.items():
        (root / split).mkdir()
        if split == damaged:
            (root / split / "part-0.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
        else:
            pq.write_table(pa.table({"image_id": [str(i) for i in range(n)]}), root / split / "part-0.parquet")
    return root


def test_a_local_path_is_refused_on_a_cluster_before_anything_starts(tmp_path):
    """RAY_ADDRESS names a cluster (here nothing listens there: the refusal comes before any connection)."""
    cluster = {"RAY_ADDRESS": "127.0.0.1:1"}
    result = run_cli("train", "--features", str(tmp_path / "f"), "--out", "s3://bucket/runs", env=cluster)
    assert_one_line_exit_2(result, f"--features {tmp_path / 'f'}", "local path", "--shared-fs", "CAPRAY_SHARED_FS=1")
    assert "s3://bucket/runs" not in result.stderr  # only the local ones are named

    # Declared shared, the same command gets past the check to the next one (no feature dataset there).
    for declared in ({"flags": ["--shared-fs"], "env": {}}, {"flags": [], "env": {"CAPRAY_SHARED_FS": "1"}}):
        result = run_cli("train", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "runs"),
                         *declared["flags"], env={**cluster, **declared["env"]})
        assert_one_line_exit_2(result, "not a feature dataset")


def test_an_http_ray_address_is_not_a_cluster_to_refuse_local_paths_for(tmp_path):
    """The README's `export RAY_ADDRESS=http://localhost:8265` (for ray job submit) leaves local commands local."""
    result = run_cli("train", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "runs"),
                     env={"RAY_ADDRESS": "http://localhost:8265"})
    assert_one_line_exit_2(result, "not a feature dataset")


def test_an_output_that_cannot_be_written_is_exit_2_before_any_work(tmp_path):
    """Root-proof: a path under a regular file cannot be created by anyone (chmod does not stop root)."""
    (tmp_path / "a-file").write_text("not a folder")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red circle"], "split": "train"}) + "\n")
    result = run_cli("prepare", "--annotations", str(manifest), "--out", str(tmp_path / "a-file" / "features"),
                     "--encoder.name", "no_such_net")  # checked later: the output is refused first
    assert_one_line_exit_2(result, f"--out {tmp_path / 'a-file' / 'features'} cannot be written")


def test_a_damaged_feature_file_is_exit_2_in_one_line_before_training(tmp_path):
    features = _feature_dataset(tmp_path / "features", rows={"train": 3, "val": 2}, damaged="val")
    result = run_cli("train", "--features", str(features), "--out", str(tmp_path / "runs"))
    assert_one_line_exit_2(result, f"{features / 'val'}: a feature file is damaged", "capray prepare --splits val")


def test_feature_files_that_disagree_with_prepare_json_are_exit_2(tmp_path):
    features = _feature_dataset(tmp_path / "features", rows={"train": 3, "val": 2})
    info = json.loads((features / "prepare.json").read_text())
    info["splits"]["train"]["images"] = 5
    (features / "prepare.json").write_text(json.dumps(info))
    result = run_cli("train", "--features", str(features), "--out", str(tmp_path / "runs"))
    assert_one_line_exit_2(result, "3 feature rows, but prepare.json records 5")


def test_a_resumed_run_with_other_decoder_flags_is_exit_2_before_any_worker_starts(tmp_path):
    """The run's checkpoint holds a GRU decoder of hidden size 16; asking for an LSTM of 32 names both."""
    from capray.checkpoint import write_checkpoint
    from capray.model import DecoderConfig
    from capray.vocab import Vocabulary

    features = _feature_dataset(tmp_path / "features", rows={"train": 3, "val": 2})
    vocab = Vocabulary.load(str(features / "vocab.json"))
    trained = DecoderConfig(vocab_size=len(vocab), feature_dim=8, kind="gru", embed_dim=8, hidden_dim=16,
                            projection_dim=8, attention_dim=8, num_regions=4, positions="grid")
    write_checkpoint(str(tmp_path / "runs" / "r" / "checkpoint_000000"), state={}, vocab=vocab,
                     config={"decoder": trained.to_dict()}, train_state={"epoch": 0, "step": 1})
    common = ["train", "--features", str(features), "--out", str(tmp_path / "runs"), "--name", "r", "--epochs", "3",
              "--embed-dim", "8", "--projection-dim", "8", "--attention-dim", "8"]

    result = run_cli_process(*common, "--decoder", "lstm", "--hidden-dim", "32")

    assert_one_line_exit_2(result, "kind gru → lstm (--decoder)", "hidden_dim 16 → 32 (--hidden-dim)")
    assert "embed_dim" not in result.stderr  # only what differs
    assert "Ray" not in result.stderr and not (tmp_path / "runs" / "r" / "metrics.jsonl").exists()


def test_an_unexpected_value_error_from_deep_inside_is_exit_1_not_usage(tmp_path, monkeypatch, capsys):
    """pyarrow's ArrowInvalid is a ValueError, but not the user's to fix: exit 1, one line."""
    import pyarrow as pa

    def dispatch(command, config):
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer")

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    args = cli.parser().parse_args(["evaluate", "--checkpoint", str(tmp_path), "--features", str(tmp_path),
                                    "--out", str(tmp_path / "eval")])
    assert cli.run("evaluate", args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "failed: ArrowInvalid: Parquet magic bytes" in lines[0], lines


@pytest.mark.parametrize("error, code", [
    (PermissionError(13, "Permission denied", "/out/part-0.parquet"), 2),
    (NotADirectoryError(20, "Not a directory", "/out/x"), 2),
    (ConnectionResetError(104, "Connection reset by peer"), 1),
    (RuntimeError("something else"), 1),
])
def test_an_os_error_is_the_users_when_its_errno_says_so(error, code):
    from capray.errors import ConfigError
    from capray.storage import StorageError, TransientStorageError

    assert (cli.user_error(error) is not None) == (code == 2)
    wrapped = RuntimeError("the write task failed")
    wrapped.__cause__ = error
    assert (cli.user_error(wrapped) is error) == (code == 2)
    assert cli.user_error(StorageError("s3://b/x: Access Denied")) is not None
    assert cli.user_error(TransientStorageError("s3://b/x: SlowDown")) is None
    assert cli.user_error(ConfigError("x")) is not None and cli.user_error(ValueError("x")) is None


def test_a_config_error_raised_inside_a_ray_task_is_exit_2_with_its_own_line(ray_local):
    """Ray re-raises a task's exception wrapped (a RayTaskError that subclasses its class and carries the
    whole remote traceback as its text): the user's error is found inside and told in its own one line."""
    import ray

    from capray.errors import ConfigError

    @ray.remote
    def fails():
        raise ConfigError("--input s3://b/in: no such folder, prefix or file")

    with pytest.raises(ConfigError) as info:
        ray.get(fails.remote())
    cause = cli.user_error(info.value)
    assert cause is not info.value and str(cause) == "--input s3://b/in: no such folder, prefix or file"
