"""The training side end to end on a local Ray and moto's S3: prepare → train (fault, resume) → evaluate → attend.

One small shapes world in S3, EfficientNet-Lite0 features at 64 px (4×4 regions); every stage is the
real one. Ray Train's start-up costs ~15 s per fit(), so the stages share one module-scoped pipeline.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from capray import storage
from capray.checkpoint import load_checkpoint, model_state, resolve_checkpoint, write_checkpoint
from capray.encoders import EncoderSpec
from capray.evaluation import EvaluateConfig, attend, evaluate
from capray.features import PrepareConfig, prepare
from capray.formats import FEATURES, METRICS_FILE, PREPARE_FILE, RESULTS_FILE, TRAIN_STATE_FILE
from capray.model import Decoder, DecoderConfig
from capray.synth import SynthConfig, generate
from capray.training import TrainConfig, existing_checkpoints, train

pytestmark = pytest.mark.slow
SMALL_DECODER = dict(embed_dim=32, hidden_dim=128, projection_dim=64, attention_dim=32, learning_rate=3e-3,
                     attention_weight=0.01, batch_size=16, val_images=40, keep_checkpoints=2)


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
                                    actors=2, batch_size=32, vocab_size=100))
    return {"root": root, "manifest": manifest, "features": f"{root}/features", "summary": summary}


def test_prepare_writes_shards_vocab_and_lists_the_corrupt_image(pipeline):
    summary = storage.read_json(f"{pipeline['features']}/{PREPARE_FILE}")
    assert [e["image"] for e in summary["errors"]] == [f"{pipeline['root']}/shapes/images/train/corrupt.png"]
    assert summary["splits"]["train"]["images"] + summary["splits"]["val"]["images"] \
        + summary["splits"]["test"]["images"] == 300  # every good image once, the corrupt one left out
    assert (summary["num_regions"], summary["num_features"]) == (16, 112)
    import pyarrow.dataset as pads

    fs, path = storage.resolve(f"{pipeline['features']}/val")
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.schema.field(FEATURES).type.value_type == "halffloat"
    assert table[FEATURES].combine_chunks().to_numpy_ndarray().shape[1:] == (16, 112)
    assert len(set(table["image_id"].to_pylist())) == table.num_rows  # one row per image
    assert all(len(t) == len(c) for t, c in zip(table["tokens"].to_pylist(), table["captions"].to_pylist()))


@pytest.fixture(scope="module")
def faulted_run(pipeline):
    """Two workers, checkpoints to S3; worker 1 exits at step 14 (second epoch) of the first attempt."""
    config = TrainConfig(features=pipeline["features"], out=f"{pipeline['root']}/runs", name="faulted",
                         workers=2, epochs=2, inject_fault="1:14", max_failures=2, **SMALL_DECODER)
    return config, train(config)


def test_a_killed_worker_resumes_from_the_checkpoint_and_finishes(faulted_run):
    config, summary = faulted_run
    run_dir = f"{config.out}/{config.name}"
    assert storage.exists(f"{run_dir}/.injected-fault")  # the worker really died
    state = storage.read_json(f"{resolve_latest(run_dir)}/{TRAIN_STATE_FILE}")
    assert state["epoch"] == 1  # the run finished its two epochs ...
    assert state["resumed_from_epoch"] == 1  # ... after restarting from epoch 0's checkpoint
    assert summary["run"].startswith("s3://")


def test_a_second_invocation_resumes_and_the_model_learns(pipeline, faulted_run):
    config, _ = faulted_run
    from dataclasses import replace

    more = replace(config, epochs=8, inject_fault="")
    summary = train(more)
    assert summary["resumed"]
    state = storage.read_json(f"{resolve_latest(f'{config.out}/{config.name}')}/{TRAIN_STATE_FILE}")
    assert state["epoch"] == 7 and state["resumed_from_epoch"] == 2  # continued the count, not restarted
    again = train(more)  # nothing left to do: says so without starting a trainer
    assert again["resumed"] and again["last_epoch"] == 7 and again["checkpoint"] is None

    out = f"{pipeline['root']}/eval"
    metrics = evaluate(EvaluateConfig(checkpoint=f"{config.out}/{config.name}", features=pipeline["features"],
                                      out=out, beam_size=3))
    written = storage.read_json(f"{out}/{METRICS_FILE}")
    results = storage.read_json(f"{out}/{RESULTS_FILE}")
    assert written["num_images"] == len(results) == metrics["num_images"] > 0
    assert set(written) >= {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "object_accuracy",
                            "beam_size", "split"}
    untrained = _untrained_bleu4(pipeline, resolve_checkpoint(f"{config.out}/{config.name}"))
    print(f"\nshapes world, held-out test split after 8 epochs: BLEU-4 {written['bleu4']:.3f} "
          f"(untrained {untrained:.3f}), object accuracy {written['object_accuracy']:.3f}")  # shown with -s
    assert written["bleu4"] > untrained + 0.2, (written["bleu4"], untrained)


def test_attend_writes_a_png_with_a_panel_per_word(pipeline, faulted_run, tmp_path):
    config, _ = faulted_run
    image = f"{pipeline['root']}/shapes/images/test/" + storage.basename(
        next(storage.list_files(f"{pipeline['root']}/shapes/images/test", extensions=("png",))))
    words = attend(f"{config.out}/{config.name}", image, str(tmp_path / "attention.png"))
    assert words and words[-1] in ("<end>",) or len(words) == 20
    picture = Image.open(tmp_path / "attention.png")
    assert picture.size[0] > 100 and np.asarray(picture).std() > 0


def test_best_checkpoint_of_a_run_is_self_contained(faulted_run, tmp_path):
    config, _ = faulted_run
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
