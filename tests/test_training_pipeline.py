"""The training side end to end on a local Ray and moto's S3: prepare → train (fault, resume) → evaluate → attend.

One small shapes world in S3, EfficientNet-Lite0 features at 64 px (4×4 regions); every stage is the
real one. Ray Train's start-up costs ~15 s per fit(), so the stages share one module-scoped pipeline.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from capray import storage
from capray.captioning import CaptionConfig, caption
from capray.checkpoint import load_checkpoint, model_state, resolve_checkpoint, write_checkpoint
from capray.config import ActorPool
from capray.encoders import EncoderSpec
from capray.evaluation import EvaluateConfig, attend, evaluate
from capray.features import PrepareConfig, prepare
from capray.formats import FEATURES, METRICS_FILE, PREPARE_FILE, RESULTS_FILE, TRAIN_STATE_FILE
from capray.model import Decoder, DecoderConfig
from capray.plots import ATTENTION_DIR, CURVES_FILE
from capray.runlog import TENSORBOARD_DIR, EventLog, read_metrics
from capray.synth import SynthConfig, generate
from capray.training import TrainConfig, existing_checkpoints, train
from capray.training_data import read_features
from killers import KillInBackground
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as RAY_TRAIN_SNAPSHOT

# One xdist worker runs the module: its fixtures prepare and train once (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("training_pipeline")]
SMALL_DECODER = dict(embed_dim=32, hidden_dim=128, projection_dim=64, attention_dim=32, learning_rate=3e-3,
                     attention_weight=0.01, batch_size=16, val_images=40, keep_checkpoints=2)
FAULTED_EPOCHS = 8
"""Epochs of the run whose worker is killed once epoch 0's checkpoint is in. An epoch takes ~1 s here
and that checkpoint is adopted up to 2 s after it is written: enough epochs are left to kill into."""


@pytest.fixture(scope="module")
def pipeline(ray_local, s3_server):
    """A shapes world in S3 plus one corrupt image, prepared with 2 encoder actors."""
    import boto3

    bucket = "capray-pipeline"
    boto3.client("s3").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}"
    manifest = generate(f"{root}/shapes", SynthConfig(num_images=300, seed=3, image_size=64))
    storage.write_bytes(f"{root}/shapes/images/train/corrupt.png", b"\x89PNG\r\n\x1a\n not really")
    lines = storage.read_text(manifest)
    corrupt = {"image": "images/train/corrupt.png", "captions": ["a red circle"], "split": "train"}
    storage.write_text(manifest, lines + json.dumps(corrupt) + "\n")
    summary = prepare(PrepareConfig(annotations=manifest, out=f"{root}/features",
                                    encoder=EncoderSpec("efficientnet_lite0", "imagenet", 64),
                                    pool=ActorPool(actors=2), batch_size=32, vocab_size=100))
    return {"root": root, "manifest": manifest, "features": f"{root}/features", "summary": summary}


def test_prepare_writes_shards_vocab_and_lists_the_corrupt_image(pipeline):
    summary = storage.read_json(f"{pipeline['features']}/{PREPARE_FILE}")
    assert [e["image"] for e in summary["errors"]] == [f"{pipeline['root']}/shapes/images/train/corrupt.png"]
    assert summary["splits"]["train"]["images"] + summary["splits"]["val"]["images"] \
        + summary["splits"]["test"]["images"] == 300  # every good image once, the corrupt one left out
    assert (summary["num_regions"], summary["num_features"]) == (16, 112)
    import pyarrow.dataset as pads

    # One pipeline encodes every split; each row lands in its own split's folder, which holds no split column.
    split_of = {json.loads(line)["image"]: json.loads(line)["split"]
                for line in storage.read_text(pipeline["manifest"]).splitlines()}
    for split in ("train", "val", "test"):
        fs, path = storage.resolve(f"{pipeline['features']}/{split}")
        rows = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image"])
        assert {split_of[uri.split("/shapes/", 1)[1]] for uri in rows["image"].to_pylist()} == {split}
    fs, path = storage.resolve(f"{pipeline['features']}/val")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert "split" not in table.schema.names
    assert table.schema.field(FEATURES).type.value_type == "halffloat"
    assert table[FEATURES].combine_chunks().to_numpy_ndarray().shape[1:] == (16, 112)
    assert len(set(table["image_id"].to_pylist())) == table.num_rows  # one row per image
    assert all(len(t) == len(c) for t, c in zip(table["tokens"].to_pylist(), table["captions"].to_pylist()))


@pytest.fixture(scope="module")
def faulted_run(pipeline):
    """Two workers, checkpoints to S3; one worker process is SIGKILLed from outside once the first
    checkpoint is in, and Ray Train restarts the group from the latest checkpoint it holds."""
    config = TrainConfig(features=pipeline["features"], out=f"{pipeline['root']}/runs", name="faulted",
                         workers=2, epochs=FAULTED_EPOCHS, max_failures=2, **SMALL_DECODER)
    run_dir = f"{config.out}/{config.name}"

    def checkpoints_in() -> int:
        # A worker's report uploads its checkpoint; Ray Train's controller adopts it at its next poll
        # of the workers (every 2 s), then writes its snapshot. A group killed before that poll would
        # restart from the checkpoint before (here: none), so wait for the snapshot too.
        return len(existing_checkpoints(run_dir)) if storage.exists(f"{run_dir}/{RAY_TRAIN_SNAPSHOT}") else 0

    with KillInBackground("ray::RayTrainWorker", ready=checkpoints_in, timeout_s=600, poll_s=0.2) as kill:
        summary = train(config)
    return config, summary, kill


def test_a_killed_worker_resumes_from_the_checkpoint_and_finishes(faulted_run):
    config, summary, kill = faulted_run
    run_dir = f"{config.out}/{config.name}"
    assert kill.killed_pid is not None and kill.killed_at < kill.exited_at, kill.describe()  # it died mid-run
    state = storage.read_json(f"{resolve_latest(run_dir)}/{TRAIN_STATE_FILE}")
    print(f"\n{kill.describe()}; the run resumed at epoch {state['resumed_from_epoch']}")  # shown with -s
    assert state["epoch"] == FAULTED_EPOCHS - 1  # the run finished all its epochs ...
    assert state["resumed_from_epoch"] >= 1  # ... after restarting from a checkpoint, not from scratch
    assert summary["run"].startswith("s3://")


@pytest.fixture(scope="module")
def resumed_and_evaluated(pipeline, faulted_run) -> dict:
    """The faulted run resumed with 2 more epochs (see the test below), then its best checkpoint evaluated
    on the test split: what the resume test and the caption test check."""
    config, _, _ = faulted_run
    more = replace(config, epochs=FAULTED_EPOCHS + 2, cpus_per_worker=1.0, driver_read_mb=0.0)
    summary = train(more)
    again = train(more)  # nothing left to do: says so without starting a trainer
    checkpoint, out = resolve_checkpoint(f"{config.out}/{config.name}"), f"{pipeline['root']}/eval"
    metrics = evaluate(EvaluateConfig(checkpoint=checkpoint, features=pipeline["features"], out=out, beam_size=3))
    return {"more": more, "summary": summary, "again": again, "checkpoint": checkpoint, "eval": out,
            "metrics": metrics}


def test_a_second_invocation_resumes_its_schedule_and_the_model_learns(pipeline, faulted_run, resumed_and_evaluated):
    """The finished run, resumed with 2 more epochs, goes on from the count and the learning rate it had
    reached: its cosine ended at 1% of the peak and the lr column of metrics.jsonl never rises again, as
    recomputing the cosine over the new --epochs made it.

    The resumed run's two workers take 1 CPU each, the whole 2-CPU local Ray, and its features are read
    by Ray Data's tasks (``driver_read_mb=0``, as a feature set too large for the driver is): they must be
    read before the workers start, or the read waits forever for a CPU (here: Ray Data's no-progress
    timeout, RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S, makes it an error)."""
    from capray.loop import FINAL_FACTOR, Schedule

    config, _, _ = faulted_run
    run_dir = f"{config.out}/{config.name}"
    more, summary, again = (resumed_and_evaluated[k] for k in ("more", "summary", "again"))
    assert summary["resumed"]
    state = storage.read_json(f"{resolve_latest(run_dir)}/{TRAIN_STATE_FILE}")
    assert state["epoch"] == more.epochs - 1 and state["resumed_from_epoch"] == FAULTED_EPOCHS  # continued the count
    assert Schedule(**state["schedule"]) == Schedule.new(FAULTED_EPOCHS).retarget(FAULTED_EPOCHS, more.epochs)
    rates = [m["lr"] for m in read_metrics(run_dir)]
    assert len(rates) == more.epochs and all(b <= a for a, b in zip(rates, rates[1:])), rates  # never back up
    assert rates[FAULTED_EPOCHS - 1:] == pytest.approx([config.learning_rate * FINAL_FACTOR] * 3, rel=1e-6), rates
    assert again["resumed"] and again["last_epoch"] == more.epochs - 1 and again["checkpoint"] is None

    out, metrics = resumed_and_evaluated["eval"], resumed_and_evaluated["metrics"]
    written = storage.read_json(f"{out}/{METRICS_FILE}")
    results = storage.read_json(f"{out}/{RESULTS_FILE}")
    assert written["num_images"] == len(results) == metrics["num_images"] > 0
    assert set(written) >= {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "object_accuracy",
                            "beam_size", "split"}
    untrained = _untrained_bleu4(pipeline, resumed_and_evaluated["checkpoint"])
    print(f"\nshapes world, held-out test split after {more.epochs} epochs: BLEU-4 {written['bleu4']:.3f} "
          f"(untrained {untrained:.3f}), object accuracy {written['object_accuracy']:.3f}")  # shown with -s
    assert written["bleu4"] > untrained + 0.2, (written["bleu4"], untrained)


def test_caption_writes_the_captions_evaluate_scores(pipeline, resumed_and_evaluated, tmp_path):
    """One precision policy: caption (encoder live, on decoded images) and evaluate (features read back
    from prepare's fp16 shards) give the same text for every test image, from the same checkpoint."""
    import pyarrow.parquet as pq

    checkpoint = resumed_and_evaluated["checkpoint"]
    scored = {r["image_id"]: r["caption"] for r in storage.read_json(f"{resumed_and_evaluated['eval']}/{RESULTS_FILE}")}
    summary = caption(CaptionConfig(input=f"{pipeline['root']}/shapes/images/test", out=str(tmp_path / "captions"),
                                    checkpoint=checkpoint, beam_size=3, batch_size=8))
    rows = [row for shard in sorted((tmp_path / "captions").glob("*.parquet"))
            for row in pq.read_table(shard).to_pylist()]
    written = {storage.basename(row["path"]).rsplit(".", 1)[0]: row["caption"] for row in rows}
    assert summary.errors == 0 and len(rows) == len(written) == len(scored) > 20
    different = {i: (written[i], scored[i]) for i in scored if written.get(i) != scored[i]}
    assert not different, different
    assert len(set(scored.values())) > 3  # a model that says one thing for every image would prove nothing


def test_small_features_read_by_the_driver_are_the_rows_ray_data_reads(pipeline, tmp_path):
    """Below --driver-read-mb the driver reads the splits itself (no Ray Data job); the rows are the same."""
    from capray.features import load_prepare_info

    info = load_prepare_info(pipeline["features"])
    config = TrainConfig(features=pipeline["features"], out=str(tmp_path))
    by_driver, by_ray_data = (read_features(replace(config, driver_read_mb=mb), info) for mb in (256.0, 0.0))
    for split, driver, ray_data in zip(("train", "val"), by_driver, by_ray_data):
        rows, expected = ({r["image_id"]: r for r in ds.take_all()} for ds in (driver, ray_data))
        assert len(rows) == info["splits"][split]["images"] > 0 and rows.keys() == expected.keys()
        for image_id, row in rows.items():
            assert np.array_equal(row[FEATURES], expected[image_id][FEATURES])
            assert [list(t) for t in row["tokens"]] == [list(t) for t in expected[image_id]["tokens"]]


def test_a_run_can_be_watched_metrics_curves_and_attention_maps(pipeline, faulted_run):
    """metrics.jsonl holds each epoch once, the killed attempt's redone epochs included; plots are PNGs."""
    config, _, _ = faulted_run
    run_dir = f"{config.out}/{config.name}"
    epochs = read_metrics(run_dir)
    assert [e["epoch"] for e in epochs] == list(range(len(epochs))) and len(epochs) >= FAULTED_EPOCHS
    assert all(e["train_loss"] > 0 and e["val_loss"] > 0 and e["seconds"] > 0 for e in epochs)
    assert all(0 <= e["val_bleu4"] <= 1 for e in epochs)  # val_every=1: every epoch decoded
    assert Image.open(io.BytesIO(storage.read_bytes(f"{run_dir}/{CURVES_FILE}"))).size[0] > 300
    scalars = _tensorboard_scalars(f"{run_dir}/{TENSORBOARD_DIR}")  # a file per worker group: the killed one's too
    assert {tag for tag, _, _ in scalars} == set(EventLog.SCALARS)
    last = {(tag, step): value for tag, step, value in scalars}  # the redone epochs' values are the later ones
    for e in epochs:
        assert last[("loss/train", e["epoch"] + 1)] == pytest.approx(e["train_loss"], rel=1e-6)
        assert last[("bleu4/val", e["epoch"] + 1)] == pytest.approx(e["val_bleu4"], rel=1e-6)
    plots = sorted(storage.list_files(f"{run_dir}/{ATTENTION_DIR}", extensions=("png",)))
    assert len(plots) == config.attention_images == 3
    first_val = [r["image"] for r in sorted(_val_rows(pipeline), key=lambda r: r["image_id"])[:3]]
    assert [storage.basename(p) for p in plots] == sorted(
        storage.basename(i).rsplit(".", 1)[0] + ".png" for i in first_val)


def _tensorboard_scalars(uri: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the event files under ``uri``, files in name (time) order.

    An event file is TFRecords (length u64, its CRC, an Event protobuf, its CRC), read here with
    tensorboardX's own Event message rather than TensorBoard itself.
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    files = sorted(storage.list_files(uri))
    assert files and all(storage.basename(f).startswith("events.out.tfevents.") for f in files), files
    for name in files:
        data, offset = storage.read_bytes(name), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def _val_rows(pipeline) -> list[dict]:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(f"{pipeline['features']}/val")
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", "image"]).to_pylist()


def test_attend_writes_a_png_with_a_panel_per_word(pipeline, faulted_run, tmp_path):
    config, _, _ = faulted_run
    image = f"{pipeline['root']}/shapes/images/test/" + storage.basename(
        next(storage.list_files(f"{pipeline['root']}/shapes/images/test", extensions=("png",))))
    words = attend(f"{config.out}/{config.name}", image, str(tmp_path / "attention.png"))
    assert words and words[-1] in ("<end>",) or len(words) == 20
    # The same caption as `capray caption` gives the image: the decoder reads fp16 features in both.
    from capray.captioning import Captioner
    from capray.images import decode_image

    captioner = Captioner(f"{config.out}/{config.name}", beam_size=3, max_length=20, threads=1, use_gpu=False)
    pixels, _, _ = decode_image(storage.read_bytes(image), captioner.encoder.spec.image_size)
    (text,), _ = captioner.caption(pixels[None])
    assert " ".join(w for w in words if w != "<end>") == text
    picture = Image.open(tmp_path / "attention.png")
    assert picture.size[0] > 100 and np.asarray(picture).std() > 0


def test_best_checkpoint_of_a_run_is_self_contained(faulted_run, tmp_path):
    config, _, _ = faulted_run
    model = load_checkpoint(f"{config.out}/{config.name}")
    assert model.encoder.spec.name == "efficientnet_lite0"  # encoder weights travel with the decoder
    assert model.uri in existing_checkpoints(f"{config.out}/{config.name}")
    assert model.train_state["val_bleu4"] == max(
        storage.read_json(f"{d}/{TRAIN_STATE_FILE}")["val_bleu4"]
        for d in existing_checkpoints(f"{config.out}/{config.name}"))


def resolve_latest(run_dir: str) -> str:
    return max(existing_checkpoints(run_dir),
               key=lambda d: storage.read_json(f"{d}/{TRAIN_STATE_FILE}")["epoch"])


def _untrained_bleu4(pipeline, trained_uri: str) -> float:
    """The same evaluation with a freshly initialised decoder (same vocabulary and encoder)."""
    trained = load_checkpoint(trained_uri)
    torch.manual_seed(0)
    fresh = Decoder(DecoderConfig(**trained.config["decoder"]))
    fresh.feature_mean.copy_(trained.decoder.feature_mean)
    fresh.feature_std.copy_(trained.decoder.feature_std)
    directory = f"{pipeline['root']}/untrained"
    write_checkpoint(directory, state=model_state(encoder_state=trained.encoder.state_dict(),
                                                  decoder_state=fresh.state_dict()),
                     config=trained.config, vocab=trained.vocab, train_state={"epoch": -1})
    out = f"{pipeline['root']}/eval-untrained"
    return evaluate(EvaluateConfig(checkpoint=directory, features=pipeline["features"], out=out))["bleu4"]


def _log_two_epochs(events: EventLog) -> None:
    for epoch in range(2):
        events.add({"epoch": epoch, "train_loss": 2.0 - epoch, "val_loss": 2.5, "val_bleu4": -1.0 if epoch == 0 else 0.5,
                    "lr": 1e-3, "train_images_per_s": 100.0})


def _staging_folders() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("capray-events-")}


def test_event_log_writes_a_local_run_in_place_and_leaves_nothing_in_tmp(tmp_path):
    """A local run folder takes the event file itself: no staging folder in /tmp, so a worker killed
    outright leaves nothing behind either. Two logs opened in the same second keep two files."""
    before = _staging_folders()
    folder = tmp_path / "run" / TENSORBOARD_DIR
    first, second = EventLog(str(folder)), EventLog(str(folder))
    assert _staging_folders() == before
    assert os.path.dirname(first.path) == str(folder) and first.path != second.path
    _log_two_epochs(first)
    first.close()
    second.close()
    assert os.path.exists(first.path)
    scalars = _tensorboard_scalars(str(folder))
    assert [(tag, step) for tag, step, _ in scalars if tag == "loss/train"] == [("loss/train", 1), ("loss/train", 2)]
    assert [(step, value) for tag, step, value in scalars if tag == "bleu4/val"] == [(2, 0.5)]


def test_event_log_of_an_s3_run_removes_its_local_copy(s3_bucket):
    """S3 cannot append: the file is staged locally and copied after each epoch; closing removes the copy."""
    uri = f"{s3_bucket}/run/{TENSORBOARD_DIR}"
    events = EventLog(uri)
    local = os.path.dirname(events.path)
    assert os.path.basename(local).startswith("capray-events-")
    _log_two_epochs(events)
    events.close()
    assert not os.path.exists(local)
    scalars = _tensorboard_scalars(uri)
    assert [(tag, step) for tag, step, _ in scalars if tag == "loss/train"] == [("loss/train", 1), ("loss/train", 2)]
    assert [(step, value) for tag, step, value in scalars if tag == "bleu4/val"] == [(2, 0.5)]
