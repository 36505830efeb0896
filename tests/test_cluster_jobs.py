"""capray's jobs on an autoscaling multi-node cluster shaped like cluster.yaml (tests/fakecluster.py).

The head has 0 CPUs and no worker node is up when prepare (and the GPU probe) starts: a job must ask for
what it needs, wait for the autoscaler, and finish on nodes that join later. Train and caption then run
on the nodes still up, and a node is lost on purpose under each (its raylet SIGKILLed, as when a spot
instance is reclaimed): each must finish on what is left or on a replacement.

The jobs run as `ray job submit` runs them: `python jobs/<job>.py ...` with RAY_ADDRESS set; the caption
job is submitted through the head's job server with `ray job submit --working-dir .` itself.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capray.formats import METRICS_FILE
from capray.synth import SynthConfig, generate
from fakecluster import FakeCluster
from killers import command_line, comm, descendants, environ

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHARED_FS = {"CAPRAY_SHARED_FS": "1"}
"""The fake cluster's nodes are processes of this machine: its local paths are a filesystem they all share."""
SMALL_DECODER = ["--embed-dim", "32", "--hidden-dim", "64", "--projection-dim", "32", "--attention-dim", "32",
                 "--batch-size", "16", "--val-images", "20", "--learning-rate", "3e-3"]


def _job(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args]


@pytest.fixture(scope="module")
def cluster(shared_cluster) -> FakeCluster:
    """The session's cluster (tests/conftest.py): cpu_2 and gpu_1 nodes, none up when idle."""
    return shared_cluster


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world")
    manifest = generate(str(root / "shapes"), SynthConfig(num_images=240, seed=5, image_size=64))
    return {"root": root, "manifest": manifest, "features": str(root / "features"), "runs": str(root / "runs")}


def _start(cluster: FakeCluster, argv: list[str], log: Path, *, cwd: Path | None = None):
    """A job in the background, its output in ``log`` (a pipe nobody reads would stall it)."""
    with open(log, "w") as out:
        return cluster.popen(argv, env=SHARED_FS, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)


def _finish(job, log: Path, *, timeout: float) -> str:
    job.wait(timeout=timeout)
    return log.read_text()


def _nodes_running(cluster: FakeCluster, title: str) -> set[str]:
    """Ids of the worker nodes where a process titled ``title...`` runs (a Ray actor's title names its
    class, e.g. ``ray::RayTrainWorker``), read from /proc: each node's raylet names its node id in its
    environment and the node's workers descend from it. Instant, unlike asking the GCS from a driver
    of its own, which started a Python process with ``ray.init`` at every poll."""
    found = set()
    for pid in cluster.pids():
        if comm(pid) != "raylet":
            continue
        node_id = environ(pid).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING")
        if node_id and any(command_line(child).startswith(title) for child in descendants(pid)):
            found.add(node_id)
    return found


def _registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run: a worker group restarted from then on
    resumes from it. A checkpoint directory appears on storage before that (rank 0 uploads it, then the
    controller registers it once every worker has reported), so its files alone are not enough."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


def _kill_a_node_running(cluster: FakeCluster, job, title: str, *, ready, timeout: float) -> str:
    """Once ``ready()`` holds, SIGKILL the raylet of a node where a process titled ``title...`` runs;
    returns the node's id. Fails if the job ends first: the loss must land mid-run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended before a node could be lost:\n{cluster.report()}"
        if ready():
            nodes = _nodes_running(cluster, title)
            if nodes:
                victim = sorted(nodes)[0]
                cluster.kill_node(victim)
                assert job.poll() is None, "the job ended while its node was being lost"
                return victim
        time.sleep(0.2)
    raise AssertionError(f"no {title} process to take down within {timeout} s:\n{cluster.report()}")


@pytest.fixture(scope="module")
def prepared(cluster, world) -> subprocess.CompletedProcess:
    """The prepare job, run once on the module's cluster while it has no worker node: the features
    the training below reads. A fixture, so that each test runs alone too (``-k``)."""
    cluster.wait_for_workers(0, timeout=120)
    return cluster.run(_job("prepare", "--annotations", world["manifest"], "--out", world["features"],
                            "--encoder.name", "efficientnet_lite0", "--encoder.image-size", "64", "--batch-size", "16",
                            "--vocab-size", "100"), timeout=600, env=SHARED_FS)


TRAIN_EPOCHS = 6


@pytest.fixture(scope="module")
def trained_through_a_lost_node(cluster, world, prepared) -> dict:
    """Training on the nodes prepare left (scaling up from none is prepare's test and the GPU probe's),
    one of them SIGKILLed once a checkpoint is registered; what the train test checks, and the checkpoint
    the caption test uses."""
    assert prepared.returncode == 0, "prepare failed (see test_prepare_scales_up_an_empty_cluster_and_finishes)"
    run_dir = Path(world["runs"], "lost")
    log = Path(world["root"], "train.log")
    job = _start(cluster, _job("train", "--features", world["features"], "--out", world["runs"], "--name", "lost",
                               "--workers", "2", "--epochs", str(TRAIN_EPOCHS), "--max-failures", "3",
                               *SMALL_DECODER), log)
    try:
        victim = _kill_a_node_running(cluster, job, "ray::RayTrainWorker",
                                      ready=lambda: _registered_checkpoint(run_dir), timeout=400)
        output = _finish(job, log, timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return {"returncode": job.returncode, "victim": victim, "output": output, "run_dir": run_dir}


def test_a_job_with_local_paths_is_refused_on_the_cluster_before_it_asks_for_anything(cluster, s3_bucket,
                                                                                        tmp_path):
    """On a cluster whose nodes join later, a local --features/--out would be each node's own disk: refused
    in one line (exit 2) before the job connects or asks the autoscaler for a node; s3:// passes the check.
    First in the module, while the cluster is idle: a node launched now could only be this job's doing."""
    job = str(ROOT / "jobs" / "train.py")
    nodes_before = {n.node_id for n in cluster.worker_nodes()}
    started = time.monotonic()
    local = cluster.run([sys.executable, job, "--features", str(tmp_path / "features"), "--out",
                         f"{s3_bucket}/runs"], timeout=120)
    assert local.returncode == 2, local.stderr[-2000:]
    lines = local.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--features {tmp_path / 'features'}: a local path" in lines[0], lines
    assert time.monotonic() - started < 30
    assert {n.node_id for n in cluster.worker_nodes()} <= nodes_before  # it asked the autoscaler for nothing

    remote = cluster.run([sys.executable, job, "--features", f"{s3_bucket}/features", "--out",
                          f"{s3_bucket}/runs"], timeout=120)
    assert remote.returncode == 2 and "not a feature dataset" in remote.stderr, remote.stderr[-2000:]


def test_prepare_scales_up_an_empty_cluster_and_finishes(cluster, world, prepared):
    assert prepared.returncode == 0, cluster.report() + prepared.stderr[-3000:]
    info = json.loads(Path(world["features"], "prepare.json").read_text())
    assert info["num_images"] == 240 and info["num_errors"] == 0
    assert [n for n in cluster.nodes() if not n.is_head], "no worker node was launched"


def test_train_resumes_after_losing_a_node(cluster, trained_through_a_lost_node):
    run = trained_through_a_lost_node
    assert run["returncode"] == 0, cluster.report() + run["output"][-3000:]
    assert not cluster.node(run["victim"]).alive
    states = [json.loads(p.read_text()) for p in run["run_dir"].glob("checkpoint_*/train_state.json")]
    last = max(states, key=lambda s: s["epoch"])
    assert last["epoch"] == TRAIN_EPOCHS - 1  # every epoch
    assert last["resumed_from_epoch"] >= 1  # the group restarted from a checkpoint, not from scratch
    print(f"\ntrain: node {run['victim'][:8]} lost; resumed from epoch {last['resumed_from_epoch']}, "
          f"finished epoch {last['epoch'] + 1} (val BLEU-4 {last['val_bleu4']:.3f})")


def test_caption_loses_nothing_when_a_node_dies(cluster, world, trained_through_a_lost_node,
                                                               tmp_path):
    runs = trained_through_a_lost_node["run_dir"]
    assert trained_through_a_lost_node["returncode"] == 0, "training failed (see the train test)"
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted(Path(world["root"], "shapes", "images").rglob("*.png"))
    for i in range(200):  # enough work that the run is still going when its node is lost
        shutil.copyfile(sources[i % len(sources)], images / f"img-{i:04d}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    output = tmp_path / "captions"
    log = tmp_path / "caption.log"
    # Submitted as users do: the job server uploads the working directory and runs the driver on the head.
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={cluster.job_server_url}",
              "--working-dir", str(ROOT), "--", "python", "jobs/caption.py", "--input", str(images), "--out",
              str(output), "--checkpoint", str(runs), "--batch-size", "8", "--max-actors", "2",
              "--shared-fs"]  # the fake cluster's nodes are processes of this machine: one disk
    job = _start(cluster, submit, log, cwd=ROOT)

    victim = _kill_a_node_running(cluster, job, "ray::MapWorker", ready=lambda: True, timeout=300)
    printed = _finish(job, log, timeout=600)

    assert job.returncode == 0 and "succeeded" in printed.lower(), cluster.report() + printed[-3000:]
    table = pq.ParquetDataset(sorted(str(p) for p in output.glob("part-*.parquet"))).read()
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 201  # one row per image: nothing lost, nothing twice
    assert sorted(paths) == sorted(str(p) for p in images.iterdir())
    errors = [r["path"] for r in table.to_pylist() if r["error"]]
    assert errors == [str(images / "broken.png")]
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["ok"], summary["errors"]) == (200, 1)
    print(f"\ncaption: node {victim[:8]} lost mid-run; {len(paths)} rows, each image once")


def test_evaluate_runs_its_beam_search_on_worker_nodes(cluster, tmp_path):
    """evaluate's beam search runs in an actor pool on the cluster's worker nodes, never on the 0-CPU head:
    the driver only gathers the captions and scores them."""
    from test_evaluation import MAX_LENGTH, write_shapes_dataset

    shapes = write_shapes_dataset(tmp_path / "shapes")
    out = tmp_path / "eval"
    result = cluster.run(_job("evaluate", "--checkpoint", shapes["checkpoint"], "--features", shapes["features"],
                              "--out", str(out), "--actors", "1", "--max-length", str(MAX_LENGTH),
                              "--wait-timeout", "120"), timeout=300, env=SHARED_FS)
    assert result.returncode == 0, cluster.report() + result.stderr[-3000:]
    nodes = json.loads((out / METRICS_FILE).read_text())["beam_search_nodes"]
    head = {n.node_id for n in cluster.nodes() if n.is_head}
    workers = {n.node_id for n in cluster.nodes() if not n.is_head}
    assert nodes and set(nodes) <= workers and not set(nodes) & head, (nodes, head, workers)
    assert sum(nodes.values()) == len(shapes["records"])


def test_gpu_actors_land_on_gpu_nodes_and_the_pool_stays_within_its_maximum(cluster):
    """The sizing logic against fake GPU node types: where the actors land and how many, no CUDA."""
    code = textwrap.dedent("""
        import json, os, time, ray
        from capray.autoscaler import wait_for_resources
        from capray.config import ActorPool
        from capray.sizing import plan_actors
        ray.init(log_to_driver=False)
        plan = plan_actors(ActorPool(max_actors=2, gpus_per_actor=1.0), machine=None)
        wait_for_resources([plan.bundle()] * plan.min_actors, timeout_s=180, what="probe")

        class Probe:
            def __call__(self, batch):
                time.sleep(0.4)  # queued work makes the pool grow
                batch["node_type"] = [os.environ.get("RAY_NODE_TYPE_NAME")] * len(batch["id"])
                batch["gpu_ids"] = [json.dumps(ray.get_gpu_ids())] * len(batch["id"])
                batch["actor"] = [ray.get_runtime_context().get_actor_id()] * len(batch["id"])
                return batch

        rows = (ray.data.range(96, override_num_blocks=24)
                .map_batches(Probe, compute=plan.strategy(), batch_size=4, batch_format="pandas", **plan.remote_args())
                .take_all())
        print(json.dumps({"bundle": plan.bundle(), "types": sorted({r["node_type"] for r in rows}),
                          "gpu_ids": sorted({r["gpu_ids"] for r in rows}), "actors": len({r["actor"] for r in rows}),
                          "rows": len(rows)}))
    """)
    result = cluster.python(code, timeout=400, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["bundle"] == {"CPU": 1.0, "GPU": 1.0}
    assert seen["rows"] == 96
    assert seen["types"] == ["gpu_1"] and seen["gpu_ids"] == ["[0]"]
    assert 1 <= seen["actors"] <= 2
    print(f"\ngpu probe: {seen['actors']} actor(s), all on gpu_1 nodes, GPU ids {seen['gpu_ids']}")
