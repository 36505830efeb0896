"""cluster.yaml: Ray's own schema, the node types the jobs need, IAM without keys, EC2 fields, the S3
policy in its comments, and the pinned torch builds each node type installs.

All offline: `ray up` has no dry run, so these checks are what stands between an edit and a
failed launch. Ray's `prepare_config` only merges the AWS defaults file shipped with Ray (no AWS
calls); botocore's EC2 model is bundled with botocore.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
MAKEFILE = ROOT / "Makefile"

INSTANCE_PROFILE_ARN = re.compile(r"^arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+$")
AMI_ID = re.compile(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$")

# Read at collection so every node type in the file gets its own test (a broken file fails here).
NODE_TYPES = sorted(yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"])


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    """The config as `ray up` sees it after merging Ray's AWS defaults (offline)."""
    import copy

    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def _workers(config: dict) -> dict:
    return {name: nt for name, nt in config["available_node_types"].items()
            if name != config["head_node_type"]}


def _gpus(node_type: dict) -> int:
    return node_type["resources"].get("GPU", 0)


def test_ray_schema_accepts_the_config(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "capray"


def test_head_takes_no_tasks(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "head should advertise 0 CPUs to keep work off it"
    assert _gpus(head) == 0


def test_a_worker_type_declares_gpus(config):
    gpu_types = [name for name, nt in _workers(config).items() if _gpus(nt) >= 1]
    assert gpu_types, "encoder, train and captioner workers need a worker type with GPU >= 1"


def test_a_cpu_only_worker_type_for_decoding(config):
    cpu_types = [name for name, nt in _workers(config).items()
                 if _gpus(nt) == 0 and nt["resources"].get("CPU", 0) > 0]
    assert cpu_types, "image decoding needs a worker type with CPUs and no GPU"


def _instance_facts(text: str, instance_type: str) -> tuple[int, int]:
    """(vCPUs, GPUs) as the comment beside ``InstanceType: <type>`` in cluster.yaml states them.

    `ray up` looks instance types up in AWS; offline, the file's own comment is where a person
    changing the type writes its size, and the declared `resources` must agree with it.
    """
    line = re.search(rf"InstanceType: {re.escape(instance_type)}\s*#(.*)", text)
    assert line, f"say the vCPUs (and GPUs) of {instance_type} in a comment beside it"
    vcpus = re.search(r"(\d+) vCPU", line.group(1))
    assert vcpus, f"the comment beside {instance_type} does not give its vCPUs"
    gpus = re.match(r"\s*(\d+) (A10G|L4|A100|H100|T4|V100|GPU)", line.group(1))
    return int(vcpus.group(1)), int(gpus.group(1)) if gpus else 0


@pytest.mark.parametrize("name", NODE_TYPES)
def test_declared_resources_match_the_instance_type(config, text, name):
    node_type = config["available_node_types"][name]
    instance_type = node_type["node_config"]["InstanceType"]
    vcpus, gpus = _instance_facts(text, instance_type)
    assert _gpus(node_type) == gpus, f"{name}: {instance_type} has {gpus} GPUs"
    assert 0 <= node_type["resources"].get("CPU", vcpus) <= vcpus
    if name != config["head_node_type"]:
        assert node_type["resources"].get("CPU", 0) > 0, f"{name} would run no tasks"


def test_worker_bounds(config):
    for name, node_type in _workers(config).items():
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"], name
        assert node_type["max_workers"] <= config["max_workers"], name


def test_no_aws_keys_in_the_file(text):
    for forbidden in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        assert forbidden not in text.lower()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"


def test_every_node_has_an_instance_profile(config):
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile, f"{name} has no IamInstanceProfile (S3 access)"
        assert INSTANCE_PROFILE_ARN.match(profile["Arn"]), \
            f"{name}: {profile['Arn']!r} is not an instance-profile ARN (a role ARN does not work)"


def test_one_ami_for_all_nodes(config):
    amis = {nt["node_config"]["ImageId"] for nt in config["available_node_types"].values()}
    assert len(amis) == 1, amis
    assert AMI_ID.match(amis.pop())


def _run_instances_errors(node_config: dict) -> str:
    """botocore's own check of RunInstances parameters, as Ray passes node_config to EC2."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
    return report.generate_report() if report.has_errors() else ""


@pytest.mark.parametrize("name", NODE_TYPES)
def test_node_config_is_valid_for_ec2(config, name):
    assert _run_instances_errors(config["available_node_types"][name]["node_config"]) == ""


def _setup_commands(config: dict, prepared: dict, name: str) -> list[str]:
    """The setup commands Ray runs on a node of type ``name``, as its autoscaler picks them.

    ``prepare_config`` prepends ``setup_commands`` to ``head_setup_commands`` and to the global
    ``worker_setup_commands``; a worker type's own ``worker_setup_commands`` replace both.
    """
    if name == config["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][name].get("worker_setup_commands", prepared["worker_setup_commands"])


def _checkout_install(config: dict) -> re.Pattern:
    mounts = {remote for remote, local in config["file_mounts"].items() if local in (".", "./")}
    assert len(mounts) == 1, "the repository root should be mounted on the nodes, once"
    return re.compile(rf"pip install .*-e {re.escape(mounts.pop())}/?$")


def test_every_node_installs_the_checkout(config, prepared):
    install = _checkout_install(config)
    # Ray's default head_setup_commands (a bare `pip install boto3`) would run outside the venv.
    assert "head_setup_commands" in config
    for name in NODE_TYPES:
        commands = _setup_commands(config, prepared, name)
        assert any(install.search(cmd) for cmd in commands), f"{name} does not install capray"
        # A type's own list replaces the common steps (uv, the venv, PATH): it must repeat them.
        common = prepared["setup_commands"]
        assert common and commands[:len(common)] == common, f"{name} skips the common setup steps"


# --- torch: pinned to the Makefile's versions, CUDA wheels on GPU types only ---------------------

TORCH_PACKAGES = ("torch", "torchvision")
INDEX_FLAGS = ("--index-url", "-i", "--extra-index-url", "--index", "--default-index", "--find-links", "-f",
               "--torch-backend")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _makefile_pins() -> dict[str, str]:
    """The torch / torchvision versions `make install` installs: the tested ones."""
    text = MAKEFILE.read_text()
    pins = {}
    for package in TORCH_PACKAGES:
        versions = set(re.findall(rf"(?<![\w-]){package}==([\w.+-]+)", text))
        assert len(versions) == 1, f"the Makefile should pin {package} exactly once: {versions}"
        pins[package] = versions.pop()
    return pins


def _torch_requirements(command: str) -> list[str]:
    """The torch / torchvision requirements a `pip install` / `uv pip install` command names."""
    words = shlex.split(command)
    if "install" not in words or "pip" not in words:
        return []
    return [w for w in words if re.match(r"(torch|torchvision)\b", w)]


def _index_options(command: str) -> dict[str, str]:
    words = shlex.split(command)
    options = {}
    for i, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag in INDEX_FLAGS:
            options[flag] = value or words[i + 1]
    return options


@pytest.mark.parametrize("name", NODE_TYPES)
def test_torch_is_pinned_and_the_right_build(config, prepared, name):
    pins = _makefile_pins()
    wanted = {f"{package}=={version}" for package, version in pins.items()}
    commands = _setup_commands(config, prepared, name)
    torch_installs = [i for i, cmd in enumerate(commands) if _torch_requirements(cmd)]
    assert torch_installs, f"{name} installs no torch of its own: capray's `torch>=2.3` would pick any"
    for i in torch_installs:
        # Unpinned or another version anywhere would undo the pin (uv ignores pip's constraints).
        assert set(_torch_requirements(commands[i])) == wanted, (name, commands[i])
    first = commands[torch_installs[0]]
    capray = next(i for i, cmd in enumerate(commands) if _checkout_install(config).search(cmd))
    assert torch_installs[0] < capray, f"{name}: torch must come before capray, which would pull its own"
    node_type = config["available_node_types"][name]
    if _gpus(node_type) > 0:
        # PyPI's default Linux wheels are the CUDA build; another index or a +cpu label is not.
        assert _index_options(first) == {} and "+cpu" not in first, (name, first)
    else:
        # The head (drivers only) and CPU types: CPU-only wheels, from PyTorch's CPU index alone.
        assert _index_options(first) == {"--index-url": CPU_INDEX}, (name, first)
    for i in torch_installs[1:]:
        # A later step (capray's) must not fetch torch from anywhere that would replace the build.
        assert _index_options(commands[i]) in ({}, _index_options(first)), (name, commands[i])


# --- IAM: the S3 policy written out in the comments, and who gets it ------------------------------

POLICY_BEGIN, POLICY_END = "# >>> s3.json", "# <<< s3.json"
PLACEHOLDERS = {"INPUT_BUCKET", "INPUT_PREFIX", "OUTPUT_BUCKET", "OUTPUT_PREFIX"}


def _policy_text(text: str) -> str:
    block = text.split(POLICY_BEGIN + "\n", 1)[1].split(POLICY_END + "\n", 1)[0]
    lines = block.splitlines()
    assert all(line == "#" or line.startswith("# ") for line in lines), "every policy line is a '# ' comment"
    return "\n".join(line[2:] for line in lines) + "\n"


@pytest.fixture(scope="module")
def policy(text) -> dict:
    return json.loads(_policy_text(text))


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _allows(policy: dict, action: str, resource: str) -> bool:
    """IAM's answer for one action on one ARN: an explicit Deny wins; conditional Allows do not count."""
    allowed = False
    for statement in policy["Statement"]:
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(statement), statement
        if not any(fnmatchcase(action.lower(), a.lower()) for a in _as_list(statement["Action"])):
            continue
        if not any(fnmatchcase(resource, r) for r in _as_list(statement["Resource"])):
            continue
        if statement["Effect"] == "Deny":
            return False
        allowed = allowed or (statement["Effect"] == "Allow" and "Condition" not in statement)
    return allowed


def test_the_s3_policy_is_json_with_the_four_placeholders(text, policy):
    assert policy["Version"] == "2012-10-17"
    assert set(re.findall(r"\b[A-Z]+_(?:BUCKET|PREFIX)\b", _policy_text(text))) == PLACEHOLDERS


def test_the_policy_command_in_the_comment_extracts_it(text, policy):
    """The `sed` line the comment tells the user to run writes exactly the policy above."""
    commands = re.findall(r"^#\s+(sed .*) > s3\.json$", text, flags=re.M)
    assert len(commands) == 1, "the comment should show one command that writes s3.json"
    if not (shutil.which("sed") and shutil.which("bash")):
        pytest.skip("no sed/bash here")
    result = subprocess.run(["bash", "-c", commands[0]], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == policy


def test_the_policy_lists_both_buckets_without_a_prefix_condition(policy):
    # capray's check_bucket is HeadBucket: IAM authorises it as s3:ListBucket with no s3:prefix.
    for bucket in ("INPUT_BUCKET", "OUTPUT_BUCKET"):
        assert _allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), bucket


OUTPUT_KEYS = ["", "/features/vocab.json", "/features/train/part-0a1b-000000.parquet", "/features/errors/x.jsonl",
               "/runs/coco/checkpoint_000003/model.pt", "/captions/_listing/run1/paths-0000000.parquet",
               "/captions/part-000001.parquet", "/captions/summary.json", "/eval/metrics.json"]


@pytest.mark.parametrize("key", OUTPUT_KEYS)
def test_the_policy_reads_writes_and_deletes_the_outputs(policy, key):
    """Every job reads back what it wrote (features, vocab, checkpoints, caption shards, the listing)."""
    arn = f"arn:aws:s3:::OUTPUT_BUCKET/OUTPUT_PREFIX{key}"
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
        assert _allows(policy, action, arn), (action, arn)


@pytest.mark.parametrize("key", ["", "/train2014/COCO_train2014_000000000009.jpg", "/dataset_coco.json"])
def test_the_policy_only_reads_the_inputs(policy, key):
    arn = f"arn:aws:s3:::INPUT_BUCKET/INPUT_PREFIX{key}"
    assert _allows(policy, "s3:GetObject", arn)
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert not _allows(policy, action, arn), (action, arn)


def test_the_policy_grants_nothing_beyond_the_prefixes(policy):
    for arn in ("arn:aws:s3:::OUTPUT_BUCKET/elsewhere/x", "arn:aws:s3:::OUTPUT_BUCKET/OUTPUT_PREFIX-other/x",
                "arn:aws:s3:::INPUT_BUCKET/INPUT_PREFIX-other/x", "arn:aws:s3:::OTHER_BUCKET/OUTPUT_PREFIX/x"):
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert not _allows(policy, action, arn), (action, arn)
    for action in ("s3:DeleteBucket", "s3:PutBucketPolicy", "s3:PutObjectAcl"):
        for arn in ("arn:aws:s3:::OUTPUT_BUCKET", "arn:aws:s3:::OUTPUT_BUCKET/OUTPUT_PREFIX/x"):
            assert not _allows(policy, action, arn), (action, arn)


def _profiles(config: dict) -> dict[str, tuple[str, str]]:
    """node type -> (account id, instance profile name) of its instance-profile ARN."""
    found = {}
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        account, profile = re.fullmatch(r"arn:aws:iam::(\d{12}):instance-profile/(.+)", arn).groups()
        found[name] = (account, profile)
    return found


def _comment_commands(text: str) -> list[str]:
    """The shell lines of the comments' recipes ('#   aws ...'), backslash continuations joined."""
    joined = re.sub(r"\\\n#\s*", " ", text)
    return [m.strip() for m in re.findall(r"^#\s{2,}(\S.*)$", joined, flags=re.M)]


def _inline_json(command: str) -> dict:
    return json.loads(re.search(r"'(\{.*\})'", command).group(1))


def test_both_roles_get_the_s3_policy_and_an_instance_profile(config, text):
    """The recipe creates exactly the profiles the node types name, each with s3.json (drivers run on the head)."""
    loop = re.search(r"^#\s+for role in ([\w -]+); do\n(.*?)^#\s+done$", text, flags=re.M | re.S)
    assert loop, "the IAM recipe should create the roles in a `for role in ...; do ... done` loop"
    assert set(loop.group(1).split()) == {profile for _, profile in _profiles(config).values()}
    body = _comment_commands(loop.group(2))
    for command in ("aws iam put-role-policy --role-name $role --policy-name s3 --policy-document file://s3.json",
                    "aws iam create-instance-profile --instance-profile-name $role",
                    "aws iam add-role-to-instance-profile --instance-profile-name $role --role-name $role"):
        assert command in body, command
    trust = [_inline_json(c) for c in body if c.startswith("aws iam create-role --role-name $role ")]
    assert len(trust) == 1 and trust[0]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert trust[0]["Statement"][0]["Action"] == "sts:AssumeRole"


def test_the_head_role_may_launch_workers_with_the_worker_role(config, text):
    profiles = _profiles(config)
    accounts = {account for account, _ in profiles.values()}
    assert len(accounts) == 1, accounts
    head = profiles[config["head_node_type"]][1]
    workers = {profile for name, (_, profile) in profiles.items() if name != config["head_node_type"]}
    assert head not in workers, "the head's role (EC2 rights) should not be the workers' role"
    commands = _comment_commands(text)
    assert (f"aws iam attach-role-policy --role-name {head} "
            "--policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess") in commands
    pass_role = [_inline_json(c) for c in commands
                 if c.startswith(f"aws iam put-role-policy --role-name {head} ") and "iam:PassRole" in c]
    assert len(pass_role) == 1, "the head's role should get one iam:PassRole policy"
    statement = pass_role[0]["Statement"][0]
    assert statement["Action"] == "iam:PassRole" and statement["Effect"] == "Allow"
    assert set(_as_list(statement["Resource"])) == {f"arn:aws:iam::{accounts.pop()}:role/{w}" for w in workers}


# --- credentials of an S3-compatible store: a file on the nodes, loaded before `ray start` --------

ENV_FILE = "~/capray-s3.env"


def test_start_commands_load_the_env_file_before_ray_start(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = config[key][-1]
        load = command.find(f"set -a; . {ENV_FILE}; set +a")
        assert load >= 0, f"{key} should export the variables of {ENV_FILE}"
        assert f"if [ -f {ENV_FILE} ]" in command, f"{key}: without the file (AWS) Ray must still start"
        assert load < command.index("ray start"), f"{key}: Ray inherits only what is set before it starts"


def test_the_env_file_comes_from_outside_the_checkout(config, text):
    """The file_mounts line for it (commented out by default) reads a file that git and the rsync never see."""
    mounts = dict(config["file_mounts"])
    line = re.search(rf"^\s*#\s*({re.escape(ENV_FILE)}): (\S+)$", text, flags=re.M)
    assert line, f"cluster.yaml should show the file_mounts line for {ENV_FILE}"
    mounts.setdefault(line.group(1), line.group(2))
    for remote, local in mounts.items():
        if local in (".", "./"):
            continue
        path = Path(local).expanduser()
        assert path.is_absolute() and ROOT not in path.parents and path != ROOT, \
            f"{remote}: {local} would be inside the checkout (and `--working-dir .` uploads)"


def test_git_ignored_files_are_not_synced(config):
    assert ".gitignore" in config.get("rsync_filter", [])
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored or ".venv" in ignored, ".venv (GBs) would be copied to every node"


def test_every_command_is_valid_shell(prepared):
    """`ray up` finds a shell syntax error only on a node, minutes into the launch; bash -n finds it here."""
    if not shutil.which("bash"):
        pytest.skip("no bash here")
    keys = ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    commands = [cmd for key in keys for cmd in prepared[key]]
    commands += [cmd for nt in prepared["available_node_types"].values() for cmd in nt.get("worker_setup_commands", [])]
    for command in dict.fromkeys(commands):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (command, result.stderr)


def test_usual_start_commands(config):
    head = config["head_start_ray_commands"][-1]
    assert "ray start --head" in head
    # Without it the head runs no autoscaler and never launches a worker.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in config["worker_start_ray_commands"][-1]
