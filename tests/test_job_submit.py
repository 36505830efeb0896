"""`ray job submit --working-dir .` against a running head: the way users run capray on a cluster.

Starts a real head with `ray start --head` (from this venv, so the job's `python` is ours), submits a
small caption job, checks its Parquet output, and stops exactly that head (not `ray stop`, which would
stop every Ray of the user, including the test session's own).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capray.checkpoint import model_state, write_checkpoint
from capray.encoders import EncoderSpec, build_encoder
from capray.model import Decoder, DecoderConfig
from capray.vocab import Vocabulary
from killers import free_port, kill_processes_mentioning

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _tiny_checkpoint(directory: Path) -> None:
    spec = EncoderSpec("mobilenet_v3_small", "none", 64)
    encoder = build_encoder(spec)
    vocab = Vocabulary.build(["a red circle", "a blue square left of a green triangle"], size=20)
    config = DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.num_features, embed_dim=16, hidden_dim=32,
                           projection_dim=16, attention_dim=16, start_id=vocab.start_id, end_id=vocab.end_id)
    torch.manual_seed(0)
    decoder = Decoder(config)
    write_checkpoint(str(directory), state=model_state(encoder_state=encoder.state_dict(),
                                                       decoder_state=decoder.state_dict()),
                     config={"encoder": spec.resolved().to_dict(), "decoder": config.to_dict()},
                     vocab=vocab, train_state={"epoch": 0})


def test_caption_job_runs_through_ray_job_submit(tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (80, 60), color).save(images / ("nested" if i else ".") / f"img {i}.png")
    (images / "notes.txt").write_text("not an image")
    _tiny_checkpoint(tmp_path / "checkpoint")
    output = tmp_path / "captions"

    temp_dir = tempfile.mkdtemp(prefix="capray-head-", dir="/tmp")  # short: Ray's socket paths have a limit
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "240"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([RAY, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                            # The agent's HTTP port, which job submission goes through, is fixed (52365)
                            # by default: taken when the test session's own Ray is running.
                            f"--dashboard-agent-listen-port={free_port()}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                            f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        submit = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO), "--",
                  "python", "jobs/caption.py", "--input", str(images), "--out", str(output),
                  "--checkpoint", str(tmp_path / "checkpoint"), "--actors", "1", "--batch-size", "2",
                  "--shared-fs"]  # a one-node cluster on this machine: its local paths are every node's
        # Right after `ray start` the job server may answer before the node's agent has registered
        # ("No available agent to submit job"); nothing was submitted then, so trying again is safe.
        deadline = time.monotonic() + 120
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-2000:])
        assert "succeeded" in job.stdout.lower()
    finally:
        kill_processes_mentioning(temp_dir)  # raylet and gcs ignore SIGTERM
        shutil.rmtree(temp_dir, ignore_errors=True)
    shards = sorted(output.glob("*.parquet"))
    assert shards, "the job wrote no Parquet output"
    table = pq.ParquetDataset([str(s) for s in shards]).read()
    rows = table.to_pylist()
    assert sorted(Path(r["path"]).name for r in rows) == ["img 0.png", "img 1.png", "img 2.png"]
    assert all(r["error"] is None and r["caption"] for r in rows)
