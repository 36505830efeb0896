"""cluster.yaml: Ray's own schema, the node types the jobs need, IAM without keys, EC2 fields.

All offline: `ray up` has no dry run, so these checks are what stands between an edit and a
failed launch. Ray's `prepare_config` only merges the AWS defaults file shipped with Ray (no AWS
calls); botocore's EC2 model is bundled with botocore.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

# (vCPUs, NVIDIA GPUs) of the instance types a node type may use. `ray up` looks these up in AWS;
# offline we need them here to check the hand-declared `resources`. Add a type before using it
# (`aws ec2 describe-instance-types --instance-types <type>`).
INSTANCE_SPECS = {
    "m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "c7i.2xlarge": (8, 0), "c7i.4xlarge": (16, 0), "c7i.8xlarge": (32, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1),
    "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.4xlarge": (16, 1),
    "g6.12xlarge": (48, 4), "g6.48xlarge": (192, 8),
}

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


@pytest.mark.parametrize("name", NODE_TYPES)
def test_declared_resources_match_the_instance_type(config, name):
    node_type = config["available_node_types"][name]
    instance_type = node_type["node_config"]["InstanceType"]
    assert instance_type in INSTANCE_SPECS, f"add {instance_type} to INSTANCE_SPECS"
    vcpus, gpus = INSTANCE_SPECS[instance_type]
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


def test_ec2_validation_catches_a_bad_field():
    assert "Unknown parameter" in _run_instances_errors({"InstanceTyp": "g5.2xlarge"})
    assert "Invalid type" in _run_instances_errors(
        {"BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": "200"}}]})


@pytest.mark.parametrize("name", NODE_TYPES)
def test_node_config_is_valid_for_ec2(config, name):
    assert _run_instances_errors(config["available_node_types"][name]["node_config"]) == ""


def test_every_node_installs_the_checkout(config, prepared):
    mounts = {remote for remote, local in config["file_mounts"].items() if local in (".", "./")}
    assert mounts, "the repository root should be mounted on the nodes"
    remote = mounts.pop()
    install = re.compile(rf"pip install .*-e {re.escape(remote)}/?$")
    # Ray's default head_setup_commands (a bare `pip install boto3`) would run outside the venv.
    assert "head_setup_commands" in config
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(cmd) for cmd in prepared[key]), f"{key} do not install capray"


def test_git_ignored_files_are_not_synced(config):
    assert ".gitignore" in config.get("rsync_filter", [])
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored or ".venv" in ignored, ".venv (GBs) would be copied to every node"


def test_usual_start_commands(config):
    head = config["head_start_ray_commands"][-1]
    assert "ray start --head" in head
    # Without it the head runs no autoscaler and never launches a worker.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in config["worker_start_ray_commands"][-1]
