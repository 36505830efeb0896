"""capray.features (prepare) without a pipeline run: what it checks before it touches anything, and
how its decode step tells permanent failures (listed) from transient ones (raised, for Ray to retry)."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capray import storage
from capray.config import ActorPool
from capray.encoders import EncoderError, EncoderSpec
from capray.features import PrepareConfig, prepare, read_and_decode
from capray.formats import CAPTIONS, IMAGE, IMAGE_ID, PREPARE_FILE, TOKENS
from s3faults import ALWAYS, FaultPlan, faulty_s3, keys  # noqa: F401 (faulty_s3 is a fixture)


def _png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, "PNG")
    return buffer.getvalue()


def _previous_dataset(out) -> dict[str, bytes]:
    """What an earlier, finished prepare left: its marker and a split."""
    files = {PREPARE_FILE: b'{"splits": {}}', "train/part-old.parquet": b"PAR1 old shard", "vocab.json": b"[]"}
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return files


@pytest.mark.parametrize("case", ["weights that do not exist", "a train split without captions"])
def test_a_failing_check_leaves_the_previous_dataset_as_it_was(tmp_path, case):
    manifest = tmp_path / "manifest.jsonl"
    split = "val" if case == "a train split without captions" else "train"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red square"], "split": split}) + "\n")
    (tmp_path / "a.png").write_bytes(_png("red"))
    out = tmp_path / "features"
    before = _previous_dataset(out)
    weights = str(tmp_path / "nowhere.pt") if case == "weights that do not exist" else "none"

    with pytest.raises((EncoderError, ValueError)):
        prepare(PrepareConfig(annotations=str(manifest), out=str(out),
                              encoder=EncoderSpec("resnet18", weights, 64)))

    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_prepare_into_an_output_that_a_live_run_holds_is_refused_and_touches_nothing(tmp_path):
    from capray import lease

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["a red square"]}) + "\n")
    (tmp_path / "a.png").write_bytes(_png("red"))
    out = tmp_path / "features"
    before = _previous_dataset(out)
    with lease.acquire(str(out), run_id="other", timeout_s=60, what="prepare run"):
        with pytest.raises(lease.OutputBusy):
            prepare(PrepareConfig(annotations=str(manifest), out=str(out),
                                  encoder=EncoderSpec("resnet18", "none", 64)))
        assert storage.read_json(lease.lease_uri(str(out)))["run_id"] == "other"
    assert {name: (out / name).read_bytes() for name in before} == before


def test_paths_are_resolved_where_the_user_typed_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = PrepareConfig(annotations=("data/a.json", "data/b.json"), images=("img/a", "img/b"), out="features",
                           encoder=EncoderSpec("resnet18", "weights/r18.pt", 64))
    assert config.annotations == (str(tmp_path / "data/a.json"), str(tmp_path / "data/b.json"))
    assert config.images == (str(tmp_path / "img/a"), str(tmp_path / "img/b"))
    assert config.out == str(tmp_path / "features") and config.encoder.weights == str(tmp_path / "weights/r18.pt")
    with pytest.raises(ValueError, match="--images"):
        PrepareConfig(annotations=("a.json", "b.json"), images=("only-one",), out="features")


def _batch(uris: list[str]) -> pa.Table:
    return pa.table({IMAGE_ID: [str(i) for i in range(len(uris))], IMAGE: uris,
                     CAPTIONS: [["a red square"]] * len(uris), TOKENS: [[[1, 4, 2]]] * len(uris)})


def test_decode_lists_permanent_failures_and_raises_transient_ones(ray_local, s3_bucket, faulty_s3, tmp_path,
                                                                   monkeypatch):
    from capray.progress import Progress

    for name, data in {"good.png": _png("red"), "broken.png": b"\x89PNG\r\n\x1a\n not really",
                       "throttled.png": _png("blue")}.items():
        storage.write_bytes(f"{s3_bucket}/in/{name}", data)
    errors_dir = str(tmp_path / "errors")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")

    with Progress("prepare", total=3, every_s=60) as progress:
        out = read_and_decode(_batch([f"{s3_bucket}/in/good.png", f"{s3_bucket}/in/broken.png",
                                      f"{s3_bucket}/in/missing.png"]), image_size=32, errors_dir=errors_dir,
                              progress=progress.counter)
        # A listed image is done, as an error row is in caption's count (a run with errors ends at 100%);
        # the good one is counted once the encoder has it.
        line = progress.line()
    assert line.startswith("prepare: 2/3 images (66.7%), ") and ", 2 error rows, " in line, line
    assert out[IMAGE_ID].to_pylist() == ["0"]  # the good one; the two permanent failures are listed
    listed = [json.loads(line)["image"] for f in sorted((tmp_path / "errors").iterdir())
              for line in f.read_text().splitlines()]
    assert sorted(listed) == [f"{s3_bucket}/in/broken.png", f"{s3_bucket}/in/missing.png"]

    faulty_s3.configure(FaultPlan(get_keys=keys({"in/throttled.png"}), get_failures=ALWAYS))
    with pytest.raises(storage.TransientStorageError):  # Ray runs the task again (READ_TASK_RETRIES)
        read_and_decode(_batch([f"{s3_bucket}/in/good.png", f"{s3_bucket}/in/throttled.png"]), image_size=32,
                        errors_dir=str(tmp_path / "errors-2"))
    assert not (tmp_path / "errors-2").exists()  # not recorded as a bad image: the set never shrinks silently


# --- --splits: only the named splits are replaced -------------------------------------------------

def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_prepare_splits_rewrites_only_the_named_splits_and_keeps_the_others_record(ray_local, tmp_path):
    from dataclasses import replace

    from capray.errors import ConfigError
    from capray.synth import SynthConfig, generate

    manifest = generate(str(tmp_path / "shapes"), SynthConfig(num_images=40, seed=1, image_size=64))
    out = tmp_path / "features"
    config = PrepareConfig(annotations=manifest, out=str(out), encoder=EncoderSpec("resnet18", "none", 64),
                           pool=ActorPool(actors=1), batch_size=8, vocab_size=60)
    prepare(config)
    before = json.loads((out / PREPARE_FILE).read_text())
    kept = {split: _files(out / split) for split in ("train", "val")}
    old_test = set(_files(out / "test"))
    vocab = (out / "vocab.json").read_bytes()

    # The same settings again: the split is resumed, and as it is whole, nothing is encoded.
    resumed = prepare(replace(config, splits=("test",)))
    assert set(_files(out / "test")) == old_test and resumed["resumed"] == before["splits"]["test"]["images"]

    summary = prepare(replace(config, splits=("test",), overwrite=True))

    after = json.loads((out / PREPARE_FILE).read_text())
    assert {split: _files(out / split) for split in ("train", "val")} == kept  # not a byte touched
    assert {s: after["splits"][s] for s in ("train", "val")} == {s: before["splits"][s] for s in ("train", "val")}
    assert after["splits"]["test"] == before["splits"]["test"] and set(_files(out / "test")).isdisjoint(old_test)
    assert after["num_images"] == before["num_images"] == summary["num_images"]
    assert (out / "vocab.json").read_bytes() == vocab and after["config"]["splits"] == ["train", "val", "test"]

    # Settings that would make the kept splits disagree with the rewritten one: refused before anything changes.
    for other, needle in ((replace(config, splits=("test",), vocab_size=61), "--vocab-size (60 → 61)"),
                          (replace(config, splits=("val",), encoder=EncoderSpec("resnet18", "none", 96)),
                           "--encoder.image-size (64 → 96)")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            prepare(other)
        assert json.loads((out / PREPARE_FILE).read_text()) == after


# --- prepare from shards: the driver never reads an image ------------------------------------------

def _shards_world(folder) -> list[str]:
    """A small shapes world as WebDataset shards (split from each sample's .json), one broken sample,
    a Parquet shard with no split column (split by a hash of the key) and a manifest of loose images
    beside them; the annotation sources."""
    import io as _io

    import pyarrow.parquet as pq

    from capray.synth import SynthConfig, generate
    from test_shards import make_tar, put

    tars = generate(str(folder / "world"), SynthConfig(num_images=30, seed=3, image_size=64), format="webdataset",
                    samples_per_shard=8)
    put(f"{tars}/00009.tar", make_tar([("b0", {"jpg": b"not a jpeg", "txt": b"a red circle"})]))
    table = pa.table({"key": [f"p{i}" for i in range(12)],
                      "caption": [f"a {c} square" for c in ("red", "green", "blue") * 4],
                      "jpg": [_png(c) for c in ("red", "green", "blue") * 4]})
    buffer = _io.BytesIO()
    pq.write_table(table, buffer)
    put(str(folder / "pq" / "00000.parquet"), buffer.getvalue())
    manifest = generate(str(folder / "loose"), SynthConfig(num_images=8, seed=4, image_size=64))
    return [tars, str(folder / "pq" / "00000.parquet"), manifest]  # the tars' folder first


def _forbid_shard_reads(monkeypatch) -> list[str]:
    """Make every read of a shard file in this process (the driver) fail, and list the attempts;
    Ray's workers are other processes and read as usual."""
    from capray import shards

    attempts: list[str] = []

    def guard(name, real):
        def guarded(uri, *args, **kwargs):
            for u in ([uri] if isinstance(uri, str) else list(uri)):
                if shards.shard_kind(shards.shard_of(u)) is not None:
                    attempts.append(f"{name}({u})")
                    raise AssertionError(f"the driver read a shard: {name}({u})")
            return real(uri, *args, **kwargs)
        return guarded

    for module, name in ((shards, "iter_samples"), (shards, "read_any"), (storage, "read_bytes"),
                         (storage, "read_many"), (storage, "read_text"), (storage, "iter_lines")):
        monkeypatch.setattr(module, name, guard(name, getattr(module, name)))
    return attempts


@pytest.mark.slow
def test_prepare_from_shards_reads_no_image_in_the_driver_and_gives_what_the_records_give(ray_local, tmp_path,
                                                                                         monkeypatch):
    """The reference is what the records read on the driver (``read_sources``, as prepare did before)
    make: the same ids per split, vocabulary, tokens, and the encoder's features of each decoded image.
    Then evaluate reads the dataset, each sample's objects (from its .json) as ground truth; its decoder
    is untrained (training reads any feature dataset alike: test_training_pipeline trains on one)."""
    import pyarrow.dataset as pads
    import torch

    from capray import shards
    from capray.annotations import read_sources
    from capray.encoders import build_encoder
    from capray.images import decode_image
    from capray.precision import EncoderStage
    from capray.vocab import Vocabulary

    sources = _shards_world(tmp_path)
    spec = EncoderSpec("resnet18", "none", 64)
    records = read_sources([(s, None) for s in sources], val_fraction=0.2, test_fraction=0.1)
    vocab = Vocabulary.build([c for r in records if r.split == "train" for c in r.captions], size=40)
    torch.manual_seed(0)
    stage = EncoderStage(build_encoder(spec), torch.device("cpu"), threads=1)

    attempts = _forbid_shard_reads(monkeypatch)
    out = tmp_path / "features"
    summary = prepare(PrepareConfig(annotations=tuple(sources), out=str(out), encoder=spec, pool=ActorPool(actors=1),
                                    batch_size=8, vocab_size=40, val_fraction=0.2, test_fraction=0.1))
    monkeypatch.undo()
    assert attempts == []

    assert Vocabulary.load(str(out / "vocab.json")) == vocab
    broken = f"{sources[0]}/00009.tar#b0"
    assert [e["image"] for e in summary["errors"]] == [broken]
    assert summary["errors"][0]["split"] == next(r.split for r in records if r.image == broken)
    for split in ("train", "val", "test"):
        expected = {r.image_id: r for r in records if r.split == split and r.image != broken}
        got = pads.dataset(str(out / split), format="parquet").to_table().to_pylist()
        assert sorted(row[IMAGE_ID] for row in got) == sorted(expected), split
        assert summary["splits"][split] == {"images": len(expected),  # captions: of the broken sample's split too
                                            "captions": sum(len(r.captions) for r in records if r.split == split)}
        for row in got:
            record = expected[row[IMAGE_ID]]
            assert row[IMAGE] == record.image and row[CAPTIONS] == list(record.captions)
            assert row[TOKENS] == [vocab.encode(c, max_length=summary["config"]["max_caption_tokens"])
                                   for c in record.captions]
        pixels = np.stack([decode_image(shards.read_any(row[IMAGE]), 64)[0] for row in got])
        reference = stage(pixels).cpu().numpy()
        features = np.stack([np.asarray(row["features"], np.float16) for row in got]).reshape(reference.shape)
        np.testing.assert_allclose(features.astype(np.float32), reference.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert summary["objects"]

    from capray.checkpoint import model_state, write_checkpoint
    from capray.evaluation import EvaluateConfig, evaluate
    from capray.model import Decoder, DecoderConfig

    decoder = DecoderConfig(vocab_size=len(vocab), feature_dim=summary["num_features"], embed_dim=16, hidden_dim=32,
                            projection_dim=16, attention_dim=16, start_id=vocab.start_id, end_id=vocab.end_id,
                            num_regions=summary["num_regions"], positions="grid")
    write_checkpoint(str(tmp_path / "untrained"), vocab=vocab, train_state={"epoch": 0},
                     state=model_state(encoder_state=stage.encoder.state_dict(),
                                       decoder_state=Decoder(decoder).state_dict()),
                     config={"encoder": stage.encoder.spec.to_dict(), "decoder": decoder.to_dict()})
    metrics = evaluate(EvaluateConfig(checkpoint=str(tmp_path / "untrained"), features=str(out),
                                      out=str(tmp_path / "eval"), split="test"))
    assert metrics["num_images"] == summary["splits"]["test"]["images"] > 0
    assert 0.0 <= metrics["bleu4"] <= 1.0
    # Object accuracy needs every test image's objects: the shards' .json and the manifest have them, the
    # Parquet shard has none.
    tested = [r for r in records if r.split == "test" and r.image != broken]
    assert ("object_accuracy" in metrics) == all(r.objects for r in tested) and any(r.objects for r in tested)


# --- a killed prepare, resumed ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_prepare_resumes_and_no_image_is_encoded_twice_or_missing(ray_local, s3_bucket, faulty_s3, job_env,
                                                                          tmp_path, caplog):
    """prepare (loose images and WebDataset shards, small feature files) is SIGKILLed once some files are
    out, while the store holds one loose image's read unanswered (so the run cannot have ended); the same
    command again encodes only the rest: every image is one row or one
    listed error, and a file the kill cut short is deleted and its images encoded again. The resumed
    run's progress lines count the whole job, at most one a second."""
    import logging
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.dataset as pads

    from capray.annotations import read_sources
    from capray.features import RUN_FILE
    from capray.synth import SynthConfig, generate
    from killers import kill_processes_mentioning
    from test_shards import make_tar, put

    manifest = generate(f"{s3_bucket}/loose", SynthConfig(num_images=12, seed=5, image_size=48))
    tars = generate(f"{s3_bucket}/tars", SynthConfig(num_images=16, seed=6, image_size=48), format="webdataset",
                    samples_per_shard=4)
    put(f"{tars}/00009.tar", make_tar([("b0", {"jpg": b"not a jpeg", "txt": b"a red circle"})]))
    out = tmp_path / "features"
    settings = dict(annotations=(manifest, tars), out=str(out), encoder=EncoderSpec("resnet18", "none", 48),
                    pool=ActorPool(actors=1), batch_size=2, rows_per_file=2, vocab_size=40, test_fraction=0.2)
    script = ("import sys; from capray.config import ActorPool; from capray.encoders import EncoderSpec; "
              "from capray.features import PrepareConfig, prepare; "
              f"prepare(PrepareConfig(**{{**{settings!r}, 'encoder': EncoderSpec('resnet18', 'none', 48)}}))")
    held = read_sources([(manifest, None)], test_fraction=0.2)[-1].image.split("/", 3)[3]
    faulty_s3.configure(FaultPlan(hold_keys=keys({held})))  # the run cannot end until the test heals the store
    env = {**job_env, "AWS_ENDPOINT_URL": faulty_s3.url}
    job = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and job.poll() is None and len(list(out.glob("*/part-*.parquet"))) < 2:
            time.sleep(0.2)
        assert job.poll() is None, f"the job ended before it was killed: {job.stderr.read().decode()[-2000:]}"
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
        kill_processes_mentioning(env["RAY_TMPDIR"])
    faulty_s3.heal()
    assert (out / RUN_FILE).exists() and not (out / PREPARE_FILE).exists()
    before = pads.dataset(str(out), format="parquet", exclude_invalid_files=True).count_rows()
    cut_short = out / "train" / "part-0123456789abcdef-000099-0.parquet"  # what a kill mid-write leaves locally
    cut_short.write_bytes(b"PAR1 half a file")

    caplog.set_level(logging.INFO, logger="capray.progress")
    started = time.monotonic()
    summary = prepare(PrepareConfig(**settings, progress_s=1.0))
    elapsed = time.monotonic() - started

    lines = [r.getMessage() for r in caplog.records if r.name == "capray.progress"]
    assert lines and len(lines) <= elapsed + 2, (elapsed, lines)
    assert all(re.fullmatch(r"prepare: \d+/29 images \([\d.]+%\), (?:[\d,.]+|-) images/s, \d error rows, ETA .+", line)
               for line in lines), lines
    assert lines[-1].startswith("prepare: 29/29 images (100.0%)") and lines[-1].endswith("ETA 0 s"), lines
    records = read_sources([(manifest, None), (tars, None)], test_fraction=0.2)
    broken = f"{tars}/00009.tar#b0"
    images = [row for split in ("train", "val", "test")
              for row in pads.dataset(str(out / split), format="parquet").to_table(columns=[IMAGE]).column(IMAGE).to_pylist()]
    assert len(images) == len(set(images))  # none encoded twice
    assert sorted(images) == sorted(r.image for r in records if r.image != broken)  # none missing
    assert [e["image"] for e in summary["errors"]] == [broken]
    assert summary["resumed"] >= before > 0 and not cut_short.exists()
    assert summary["num_images"] + summary["num_errors"] == len(records)
