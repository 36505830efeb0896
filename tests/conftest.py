"""Shared fixtures: a local S3 server (moto) and a local Ray, both real."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

# Set before anything imports Ray: a hang becomes an error, and Ray's files stay out of /tmp/ray.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, reached through AWS_ENDPOINT_URL like any S3-compatible store."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its URI (``s3://name``)."""
    import boto3

    name = f"capray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (2 CPUs), started after the S3 variables are set."""
    import ray

    # A short folder of its own: Ray's socket paths must stay under 108 bytes, which pytest-xdist's
    # basetemp (.../popen-gw0/...) does not leave room for.
    ray_dir = tempfile.mkdtemp(prefix="capray-ray-", dir="/tmp")
    os.environ.setdefault("RAY_TMPDIR", ray_dir)
    # Idle worker processes are kept (up to 10) instead of killed a second after a job: each test's jobs
    # then find workers with capray imported, about a second less per Ray Data run (docs/testing.md).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config={"num_workers_soft_limit": 10})
    yield ray
    ray.shutdown()
    shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture
def job_env():
    """The environment of a job run as a subprocess: its own local Ray in a short temporary folder."""
    ray_dir = tempfile.mkdtemp(prefix="capray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "60", "RAY_TMPDIR": ray_dir,
                "CAPRAY_LOG_LEVEL": "WARNING"})
    yield env
    shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory, s3_server):
    """One autoscaling fake cluster (tests/fakecluster.py) for a module's job tests (test_cluster_jobs), which
    run their jobs on the cluster as it is, whatever ran there before: a 0-CPU head with its job server
    (``ray job submit``), up to 3 ``cpu_2`` and 2 ``gpu_1`` nodes, idle nodes terminated after 10 s.
    Stopped when the module is done: its head's processes would take CPU from every later test. Starting
    one costs seconds and its nodes' scale-up tens of seconds; a test that needs a cluster of its own
    shape or a fresh one uses ``fake_cluster_factory``. Started after the S3 variables are set, so that its
    nodes inherit them."""
    from fakecluster import SHARED_NODE_TYPES, FakeCluster

    with FakeCluster(SHARED_NODE_TYPES, tmp=tmp_path_factory.mktemp("cluster"), idle_timeout_s=10.0,
                     job_server=True) as cluster:
        yield cluster
        print(f"\nshared fake cluster timeline:\n{cluster.timeline_text()}")


CLUSTER_FIXTURES = frozenset({"fake_cluster", "fake_cluster_factory", "shared_cluster"})
RAY_FIXTURES = frozenset({"ray_local", "job_env", *CLUSTER_FIXTURES})
"""A test that uses one of these (directly or through another fixture) starts or joins a Ray."""


def pytest_collection_modifyitems(config, items):
    """Mark every test that needs a Ray as ``ray``, from the fixtures it uses, so ``make test-fast``
    (``-m "not ray and not slow and not extended"``) leaves them out without each test saying so.

    Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``) every test on a fake cluster goes
    to one worker (group ``cluster``), so that the session starts one shared cluster, not one a worker;
    a module whose fixtures are costly says ``pytestmark = pytest.mark.xdist_group(...)`` itself."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if RAY_FIXTURES & names:
            item.add_marker(pytest.mark.ray)
        if CLUSTER_FIXTURES & names:
            item.add_marker(pytest.mark.xdist_group("cluster"))
