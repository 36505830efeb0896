"""capray.captioning: bulk captioning with Ray Data — one row per image, resumable, fails fast on bad config.

Real components: moto's S3 server, one local Ray for the session (``ray_local``), a small checkpoint
written here (resnet18 at 64 px, a tiny decoder over a few words).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capray import storage
from capray.captioning import CaptionConfig, CaptionSummary, caption, print_summary, read_and_decode
from capray.sink import write_parquet
from capray.checkpoint import model_state, write_checkpoint
from capray.encoders import EncoderSpec, build_encoder
from capray.formats import CAPTION_SCHEMA, CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from capray.model import Decoder, DecoderConfig
from capray.vocab import SPECIALS, Vocabulary
from clirun import assert_one_line_exit_2, refuse_to_start_ray, run_cli
from killers import KillInBackground, kill_group, kill_processes_mentioning, ray_workers
from s3faults import ALWAYS, FaultPlan, faulty_s3, keys  # noqa: F401 (faulty_s3 is a fixture)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
WORDS = ["a", "red", "blue", "circle", "square", "left", "of"]


# --- a small checkpoint and images of every kind ------------------------------------------------------

def write_small_checkpoint(directory: str, *, hidden_dim: int = 32) -> None:
    """resnet18 (random, 64 px) + a tiny GRU decoder that never emits a special token first."""
    encoder = build_encoder(EncoderSpec("resnet18", "none", SIZE))
    vocab = Vocabulary(list(SPECIALS) + WORDS)
    config = DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.num_features, embed_dim=16,
                           hidden_dim=hidden_dim, projection_dim=16, attention_dim=16)
    torch.manual_seed(0)
    decoder = Decoder(config)
    with torch.no_grad():  # words only: every caption is non-empty (and max_length long)
        decoder.out.bias[: len(SPECIALS)] = -1e4
    write_checkpoint(directory, state=model_state(encoder_state=encoder.state_dict(),
                                                  decoder_state=decoder.state_dict()),
                     config={"encoder": encoder.spec.to_dict(), "decoder": config.to_dict()}, vocab=vocab,
                     train_state={"epoch": 1})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("checkpoint"))
    write_small_checkpoint(directory)
    return directory


def _rgb(width: int = SIZE, height: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb() -> bytes:
    """A valid-looking 40000×40000 PNG of a few hundred bytes."""
    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """A 48×32 JPEG whose EXIF orientation (6) says: show it rotated by 90°, i.e. 32 wide, 48 high."""
    image = Image.fromarray(_rgb(48, 32, seed=7))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", exif=exif.tobytes())


def odd_images() -> dict[str, bytes]:
    """Unusual but valid images: each must be captioned normally."""
    rgb = _rgb()
    grey16 = (np.random.default_rng(3).integers(0, 65536, (SIZE, SIZE))).astype(np.uint16)
    return {
        "odd/cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "odd/grey.png": _encode(Image.fromarray(rgb).convert("L"), "PNG"),
        "odd/palette.png": _encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "odd/rgba.png": _encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),
        "odd/sixteen-bit.png": _encode(Image.fromarray(grey16), "PNG"),
        "odd/rotated.jpg": exif_rotated_jpeg(),
    }


def broken_images() -> dict[str, bytes]:
    """Objects with an image extension that are not usable images: each must become an error row."""
    jpeg = _encode(Image.fromarray(_rgb(seed=5)), "JPEG", quality=95)
    return {
        "broken/empty.jpg": b"",
        "broken/truncated.jpg": jpeg[: len(jpeg) // 2],
        "broken/not-an-image.png": b"this is plain text, not a PNG\n" * 10,
        "broken/bomb.png": decompression_bomb(),
    }


def plain_images() -> dict[str, bytes]:
    """Ordinary images under nested folders, with spaces and non-ASCII in their keys."""
    return {
        "plain/cat 1.jpg": _encode(Image.fromarray(_rgb(80, 60, seed=1)), "JPEG"),
        "plain/deeper/still deeper/dog.png": _encode(Image.fromarray(_rgb(seed=2)), "PNG"),
        "plain/ünïcødé/画像 3.JPEG": _encode(Image.fromarray(_rgb(seed=4)), "JPEG"),
        "plain/ünïcødé/upper.PNG": _encode(Image.fromarray(_rgb(seed=6)), "PNG"),
        "plain/web.webp": _encode(Image.fromarray(_rgb(seed=8)), "WEBP"),
    }


IGNORED = {"plain/notes.txt": b"not an image", "plain/meta.json": b"{}", "plain/README": b"readme",
           "odd/image.jpg.bak": b"backup"}


def put_objects(bucket: str, prefix: str, objects: dict[str, bytes]) -> None:
    client = boto3.client("s3")
    for key, data in objects.items():
        client.put_object(Bucket=bucket.removeprefix("s3://"), Key=f"{prefix}/{key}", Body=data)


def read_output(output: str) -> pa.Table:
    shards = [u for u in storage.list_files(output, extensions=("parquet",))
              if storage.basename(u).startswith("part-") and "/_" not in u[len(output):]]
    tables = []
    for uri in shards:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f))

    return pa.concat_tables(tables) if tables else CAPTION_SCHEMA.empty_table()


def shard_names(output: str) -> list[str]:
    return sorted(storage.basename(u) for u in storage.list_files(output, extensions=("parquet",))
                  if storage.basename(u).startswith("part-") and "/_" not in u[len(output):])


# --- unit tests: no Ray ------------------------------------------------------------------------------

def test_extensions_are_parsed_case_insensitively_from_commas_or_repeats():
    config = CaptionConfig(input="in", out="out", checkpoint="ck", extensions=(" JPG,.png,,jpg ", "webp"))
    assert config.extensions == ("jpg", "png", "webp")
    assert CaptionConfig(input="in", out="out", checkpoint="ck", extensions="TIF").extensions == ("tif",)


@pytest.mark.parametrize("bad", [{"beam_size": 0}, {"batch_size": 0}, {"max_length": 0}, {"extensions": ","},
                                 {"input": ""}, {"rows_per_shard": 0}, {"overwrite": True, "retry_errors": True}])
def test_config_rejects_bad_values(bad):
    values = {"input": "in", "out": "out", "checkpoint": "ck", **bad}
    with pytest.raises(ValueError):
        CaptionConfig(**values)


def test_print_summary_is_one_table(capsys):
    print_summary(CaptionSummary(total=10, ok=6, errors=1, skipped=2, retryable=1, wall_seconds=4.0,
                                 images_per_s=2.0, output="s3://b/out", run_id="r", shards=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["images", "ok", "errors", "skipped", "retry", "wall", "s", "images/s"]
    assert lines[1].split() == ["10", "6", "1", "2", "1", "4.0", "2.0"]


def test_read_and_decode_keeps_a_row_for_every_path(tmp_path):
    objects = {**odd_images(), **broken_images()}
    for key, data in objects.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)
    paths = [str(tmp_path / k) for k in objects] + [str(tmp_path / "missing.jpg")]
    listing = str(tmp_path / "listing.parquet")

    write_parquet(listing, pa.table({"path": paths}), row_group_size=4)
    groups = list(range(pq.ParquetFile(listing).num_row_groups))
    out = read_and_decode({"listing": np.array([listing] * len(groups), dtype=object), "group": np.array(groups)},
                          image_size=SIZE)
    assert list(out["path"]) == paths
    assert out["image"].shape == (len(paths), SIZE, SIZE, 3) and out["image"].dtype == np.uint8
    failed = {storage.basename(p) for p, e in zip(out["path"], out["error"]) if e}
    assert failed == {"empty.jpg", "truncated.jpg", "not-an-image.png", "bomb.png", "missing.jpg"}
    rotated = list(out["path"]).index(str(tmp_path / "odd/rotated.jpg"))
    assert (out["width"][rotated], out["height"][rotated]) == (32, 48)


def test_resuming_with_other_settings_fails_fast(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(plain_images()["plain/deeper/still deeper/dog.png"])
    output = tmp_path / "out"

    schema = CAPTION_SCHEMA.with_metadata({b"capray.checkpoint": b"/elsewhere", b"capray.beam_size": b"3",
                                           b"capray.max_length": b"20", b"capray.encoder": b"{}"})
    write_parquet(str(output / "part-20260101T000000-abcdef-000000.parquet"), schema.empty_table())
    with pytest.raises(ValueError, match="--overwrite"):
        caption(CaptionConfig(input=str(images), out=str(output), checkpoint=checkpoint))


# --- integration: local Ray, moto S3 --------------------------------------------------------------------

def test_s3_prefix_one_row_per_image_then_a_rerun_adds_nothing_and_retry_errors_reads_error_rows_again(ray_local, s3_bucket, checkpoint):
    good = {**plain_images(), **odd_images()}
    broken = broken_images()
    put_objects(s3_bucket, "in", {**good, **broken, **IGNORED})
    ckpt = f"{s3_bucket}/models/ck"
    for name in os.listdir(checkpoint):
        storage.write_bytes(storage.join(ckpt, name), Path(checkpoint, name).read_bytes())
    output = f"{s3_bucket}/captions"
    config = CaptionConfig(input=f"{s3_bucket}/in", out=output, checkpoint=ckpt, batch_size=4, max_length=4,
                           beam_size=2, rows_per_shard=6)

    summary = caption(config)

    expected = {f"{s3_bucket}/in/{k}" for k in {**good, **broken}}
    table = read_output(output)
    assert table.schema.remove_metadata() == CAPTION_SCHEMA
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(expected) and set(paths) == expected
    errors = {r["path"] for r in rows if r["error"] is not None}
    assert errors == {f"{s3_bucket}/in/{k}" for k in broken}
    for r in rows:
        if r["error"] is None:
            assert r["caption"] and set(r["caption"].split()) <= set(WORDS)
            assert len(r["caption"].split()) == 4 and r["score"] <= 0 and r["width"] > 0 and r["height"] > 0
        else:
            assert r["caption"] is None and r["score"] is None and r["width"] is None
    by_path = {r["path"]: r for r in rows}
    assert (by_path[f"{s3_bucket}/in/odd/rotated.jpg"]["width"], by_path[f"{s3_bucket}/in/odd/rotated.jpg"]["height"]) == (32, 48)
    assert (by_path[f"{s3_bucket}/in/plain/cat 1.jpg"]["width"], by_path[f"{s3_bucket}/in/plain/cat 1.jpg"]["height"]) == (80, 60)
    metadata = table.schema.metadata
    assert metadata[b"capray.checkpoint"].decode() == ckpt and metadata[b"capray.beam_size"] == b"2"
    assert metadata[b"capray.max_length"] == b"4"
    assert json.loads(metadata[b"capray.encoder"])["name"] == "resnet18"
    assert (summary.total, summary.ok, summary.errors, summary.skipped) == (len(expected), len(good), len(broken), 0)
    written = storage.read_json(storage.join(output, SUMMARY_FILE))
    assert (written["total"], written["ok"], written["errors"], written["skipped"]) == (len(expected), len(good), len(broken), 0)
    assert written["wall_seconds"] > 0 and written["images_per_s"] > 0
    assert not storage.exists(storage.join(output, "_listing"))
    assert all(re.fullmatch(rf"part-{summary.run_id}-\d{{10}}\.parquet", n) for n in shard_names(output))  # they sort
    # Shards past 10^6 write tasks (7 and 12 digits) are still this output's: resume must see them.
    for shard, index in zip(shard_names(output), ("1234567", "123456789012")):
        storage.move(storage.join(output, shard), storage.join(output, f"part-{summary.run_id}-{index}.parquet"))
    shards = shard_names(output)

    again = caption(config)  # everything is there: nothing to do

    assert (again.total, again.ok, again.errors, again.skipped) == (len(expected), 0, 0, len(expected))
    assert shard_names(output) == shards
    assert storage.read_json(storage.join(output, SUMMARY_FILE))["skipped"] == len(expected)

    # An error row counts as done (above); --retry-errors reads those images again, and one is now whole.
    put_objects(s3_bucket, "in", {"broken/truncated.jpg": _encode(Image.fromarray(_rgb(seed=5)), "JPEG")})
    retried = caption(CaptionConfig(**{**config.__dict__, "retry_errors": True}))

    rows = read_output(output).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(expected)  # still one row per image
    fixed = f"{s3_bucket}/in/broken/truncated.jpg"
    assert {r["path"] for r in rows if r["error"]} == {f"{s3_bucket}/in/{k}" for k in broken} - {fixed}
    assert [r["caption"] for r in rows if r["path"] == fixed][0]
    assert (retried.ok, retried.errors, retried.skipped) == (1, len(broken) - 1, len(good))


def test_dead_captioner_loses_and_duplicates_nothing(ray_local, tmp_path, checkpoint):
    """A manifest input; the captioner process is SIGKILLed mid-batch, Ray restarts it and retries its task."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"img-{i:02d}.png" for i in range(48)]
    for i, name in enumerate(names):
        Image.fromarray(_rgb(seed=i)).save(images / name)
    manifest = tmp_path / "manifest.jsonl"
    lines = [{"image": f"images/{n}", "captions": []} for n in names] + [{"image": "images/gone.jpg"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out"
    busy = "ray::MapWorker(MapBatches(Captioner)).submit"  # the actor's title while it runs a batch
    first_busy: list[float] = []

    def captioning_for_a_moment() -> float:
        # A quarter of a second in, the actor is past its first batch's start and most batches are still to
        # come (a second was too long on a quiet machine: all 48 were done). Shards are no measure of
        # progress here: the write tasks may all wait for a worker process until the end.
        if not first_busy and ray_workers(busy):
            first_busy.append(time.monotonic())
        busy_s = time.monotonic() - first_busy[0] if first_busy else 0.0
        return busy_s if busy_s >= 0.25 else 0.0

    with KillInBackground(busy, ready=captioning_for_a_moment, timeout_s=120) as kill:
        summary = caption(CaptionConfig(input=str(manifest), out=str(output), checkpoint=checkpoint,
                                        batch_size=4, max_length=3, rows_per_shard=8))

    # Killed while caption() ran, in the middle of a batch (its title says so): that batch had to be redone.
    assert kill.killed_pid is not None and kill.killed_at < kill.exited_at, kill.describe()
    print(f"\n{kill.describe()}")  # shown with -s
    rows = read_output(str(output)).to_pylist()
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted([str(images / n) for n in names] + [str(images / "gone.jpg")])
    assert [r["path"] for r in rows if r["error"]] == [str(images / "gone.jpg")]
    assert (summary.ok, summary.errors, summary.skipped) == (len(names), 1, 0)


def test_an_unreadable_shard_stops_the_run_and_is_never_deleted(tmp_path, checkpoint):
    """Resume must not turn one failed read into lost captions: the shard stays, the user decides."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(plain_images()["plain/deeper/still deeper/dog.png"])
    output = tmp_path / "out"
    output.mkdir()
    stranger = output / "part-20260101T000000-abcdef-000009.parquet"
    stranger.write_bytes(b"PAR1 not a shard")

    with pytest.raises(ValueError, match="not a caption shard"):
        caption(CaptionConfig(input=str(images), out=str(output), checkpoint=checkpoint))
    assert stranger.read_bytes() == b"PAR1 not a shard"


# --- bad configuration: exit 2, one line on stderr, before Ray starts -----------------------------------

@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, checkpoint) -> dict[str, str]:
    base, good = tmp_path_factory.mktemp("bad-checkpoints"), checkpoint
    garbage = base / "garbage"
    garbage.mkdir()
    for name in os.listdir(good):
        (garbage / name).write_bytes(Path(good, name).read_bytes())
    (garbage / MODEL_FILE).write_bytes(b"this is not a state dict")
    misfit = base / "misfit"
    write_small_checkpoint(str(misfit), hidden_dim=32)
    config = json.loads((misfit / CONFIG_FILE).read_text())
    config["decoder"]["hidden_dim"] = 48  # the weights were saved for 32
    (misfit / CONFIG_FILE).write_text(json.dumps(config))
    return {"garbage": str(garbage), "misfit": str(misfit), "missing": str(base / "nowhere")}


@pytest.mark.parametrize("case", ["missing bucket", "empty prefix", "only non-images", "missing checkpoint",
                                  "garbage model.pt", "config does not fit"])
def test_bad_configuration_exits_2_with_one_line(case, s3_bucket, checkpoint, bad_checkpoints, job_env, monkeypatch):
    """Each case in this process through ``cli.main`` with Ray forbidden; one of them also as the real
    ``jobs/caption.py`` process, whose Ray folder must stay empty."""
    from capray import connect

    put_objects(s3_bucket, "docs", IGNORED)
    put_objects(s3_bucket, "in", {"a.png": plain_images()["plain/deeper/still deeper/dog.png"]})
    checkpoints = bad_checkpoints
    flags = {"--input": f"{s3_bucket}/in", "--out": f"{s3_bucket}/out", "--checkpoint": checkpoint}
    flags.update({
        "missing bucket": {"--input": "s3://no-such-bucket-capray/in"},
        "empty prefix": {"--input": f"{s3_bucket}/nothing-here"},
        "only non-images": {"--input": f"{s3_bucket}/docs"},
        "missing checkpoint": {"--checkpoint": checkpoints["missing"]},
        "garbage model.pt": {"--checkpoint": checkpoints["garbage"]},
        "config does not fit": {"--checkpoint": checkpoints["misfit"]},
    }[case])
    argv = [x for kv in flags.items() for x in kv]
    if case == "config does not fit":
        env = job_env
        env.pop("CAPRAY_LOG_LEVEL")  # the default (INFO) must not add lines before the error
        result = subprocess.run([sys.executable, str(ROOT / "jobs" / "caption.py"), *argv],
                                env=env, capture_output=True, text=True, timeout=120)
        assert not os.listdir(env["RAY_TMPDIR"]), "Ray was started"
    else:
        monkeypatch.setattr(connect, "ensure_ray", refuse_to_start_ray)
        result = run_cli("caption", *argv)
    assert_one_line_exit_2(result, "capray caption: error: ")
    assert result.stderr.lstrip().startswith("capray caption: error: "), result.stderr


# --- transient failures: retried, never recorded as done; --overwrite replaces only when complete --------

def test_an_overwrite_that_could_not_read_everything_keeps_the_old_output_and_a_rerun_retries_within_the_run(
        ray_local, s3_bucket, checkpoint, tmp_path, faulty_s3, job_env):
    """``--overwrite`` writes the new output beside the old one (``_overwrite/``). Some objects are throttled
    past the client's retries: the run ends with exit 1, no rows for them (they are not done), the old
    output exactly as it was. Run again while the store recovers: reads that still fail are tried again
    after a pause, within the run, which adds exactly those to the staged output, then replaces the old
    output with it (exit 0), each image once."""
    good = {f"img-{i:02d}.png": _encode(Image.fromarray(_rgb(seed=i)), "PNG") for i in range(12)}
    broken = {"broken.png": b"\x89PNG\r\n\x1a\n not really"}
    put_objects(s3_bucket, "in", {**good, **broken})
    everything, broken_path = sorted(f"{s3_bucket}/in/{k}" for k in {**good, **broken}), f"{s3_bucket}/in/broken.png"
    output = tmp_path / "out"
    old = caption(CaptionConfig(input=f"{s3_bucket}/in", out=str(output), checkpoint=checkpoint, batch_size=4,
                                max_length=3, rows_per_shard=4))
    for shard, index in zip(shard_names(str(output)), ("1234567", "123456789012")):  # past 10^6 write tasks
        os.rename(output / shard, output / f"part-{old.run_id}-{index}.parquet")
    old_shards, old_summary = shard_names(str(output)), (output / SUMMARY_FILE).read_text()
    stuck = [f"in/img-{i:02d}.png" for i in range(4)]
    faulty_s3.configure(FaultPlan(get_keys=keys(stuck), get_failures=ALWAYS))
    # 2 attempts per request (the AWS SDKs' variable) so that giving up takes seconds, not a minute.
    env = {**job_env, "AWS_ENDPOINT_URL": faulty_s3.url, "AWS_MAX_ATTEMPTS": "2", "CAPRAY_LOG_LEVEL": "ERROR"}
    command = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", f"{s3_bucket}/in", "--out", str(output),
               "--checkpoint", checkpoint, "--batch-size", "4", "--max-length", "3", "--rows-per-shard", "4",
               "--overwrite", "--retry-window-s", "0"]  # no retries within the run: it gives up at once

    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert first.returncode == 1, first.stderr[-3000:]
    assert "run the same command again" in first.stderr.strip().splitlines()[-1]
    assert shard_names(str(output)) == old_shards and (output / SUMMARY_FILE).read_text() == old_summary
    staged = shard_names(str(output / "_overwrite"))
    rows = read_output(str(output / "_overwrite")).to_pylist()
    assert sorted(r["path"] for r in rows) == [p for p in everything if p.split(f"{s3_bucket}/", 1)[1] not in stuck]
    assert [r["path"] for r in rows if r["error"]] == [broken_path]  # permanent: a row; transient: none
    injected = faulty_s3.counts["injected"]
    assert injected >= len(stuck) * 2  # the client did retry before giving up

    # Recovering: each stuck object fails 3 more GETs. With 2 attempts per read the first pass gives up on
    # them again; a retry pass after a pause reads them, in the same run, which ends with exit 0.
    faulty_s3.configure(FaultPlan(get_keys=keys(stuck), get_failures=3))
    again = [*command, "--retry-window-s", "120", "--progress-s", "1"]  # the last flag given wins
    second = subprocess.run(again, env={**env, "CAPRAY_LOG_LEVEL": "INFO"}, capture_output=True, text=True,
                            timeout=300)

    assert second.returncode == 0, second.stderr[-3000:]
    assert "retrying them in" in second.stderr
    # Progress reaches a console that is no TTY (as in `ray job logs`), without --verbose, per pass.
    assert re.search(r"capray\.progress: caption: \d+/13 images", second.stderr), second.stderr[-3000:]  # the whole job
    assert re.search(r"capray\.progress: caption \(retry pass 1\): \d+/4 images", second.stderr), second.stderr[-3000:]
    assert faulty_s3.counts["injected"] - injected == 3 * len(stuck)
    rows = read_output(str(output)).to_pylist()
    assert sorted(r["path"] for r in rows) == everything  # exactly once each
    assert [r["path"] for r in rows if r["error"]] == [broken_path] and all(r["caption"] or r["error"] for r in rows)
    assert not set(shard_names(str(output))) & set(old_shards)  # replaced, whatever their index, not kept beside
    assert set(staged) <= set(shard_names(str(output)))  # the staged shards were resumed, not redone
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert (summary["ok"], summary["errors"], summary["retryable"], summary["skipped"]) == (
        len(stuck), 0, 0, len(everything) - len(stuck))
    assert not (output / "_overwrite").exists() and not (output / "_lease.json").exists()
    print(f"\ntransient S3 failures: {injected} injected 503s in the first run ({len(stuck)} objects throttled "
          f"past the client's retries → exit 1); second run {faulty_s3.counts['injected'] - injected} more, "
          f"read again by a retry pass → {len(rows)} rows, each image once, replacing the old output")


def test_the_listing_holds_each_path_once_and_skips_what_is_done(tmp_path, monkeypatch):
    """A manifest may name an image twice, in the same listing shard or far apart: one row each."""
    from capray import listing

    monkeypatch.setattr(listing, "LISTING_ROWS", 4)  # several listing shards from a few paths
    paths = [f"/data/img-{i}.png" for i in range(10)]
    named = paths + paths[:3] + [paths[7], paths[7]]
    done = np.sort(listing.digests_of(paths[8:]))

    total, skipped, units = listing.write_listing(iter(named), done, str(tmp_path / "listing"), group_rows=2)

    listed = [p for uri in sorted({u for u, _ in units}) for p in pq.read_table(uri).column("path").to_pylist()]
    assert (total, skipped) == (10, 2)
    assert sorted(listed) == sorted(paths[:8])


# --- one owner per output, --overwrite that replaces only when done, in-run retries, GPU memory -----------

def _caption_command(s3_bucket: str, output: str, checkpoint: str, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", f"{s3_bucket}/in", "--out", output,
            "--checkpoint", checkpoint, "--batch-size", "2", "--max-length", "3", "--rows-per-shard", "2", *flags]


def _stuck_caption_job(s3_bucket: str, output: str, checkpoint: str, faulty_s3, env: dict,
                       *flags: str) -> tuple[subprocess.Popen, dict]:
    """``jobs/caption.py`` as a subprocess in its own session (so it can be killed whole) that stays alive:
    one image is throttled for good, so once the rest is written the run keeps retrying it."""
    faulty_s3.configure(FaultPlan(get_keys=keys(["in/img 00.jpg"]), get_failures=ALWAYS))
    env = {**env, "AWS_ENDPOINT_URL": faulty_s3.url, "AWS_MAX_ATTEMPTS": "1"}
    command = _caption_command(s3_bucket, output, checkpoint, "--retry-window-s", "600", *flags)
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE), env


def _kill_job(job: subprocess.Popen, env: dict) -> None:
    kill_group(job)
    job.wait()
    kill_processes_mentioning(env["RAY_TMPDIR"])


def _wait_for(condition, job: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and job.poll() is None and not condition():
        time.sleep(0.2)
    assert job.poll() is None, f"the job ended too early: {job.stderr.read().decode()[-2000:]}"
    assert condition(), "timed out"


def test_a_second_run_into_a_held_output_is_refused_and_a_killed_owner_is_taken_over_and_finished(
        ray_local, s3_bucket, checkpoint, tmp_path, faulty_s3, job_env):
    """A run is SIGKILLed (its whole process group) once shards are out, a second run having been refused
    meanwhile; the same command again takes the dead owner's lease and adds exactly the rest."""
    from capray import connect

    names = [f"img {i:02d}.jpg" for i in range(16)]
    put_objects(s3_bucket, "in", {n: _encode(Image.fromarray(_rgb(seed=i)), "JPEG") for i, n in enumerate(names)})
    output = tmp_path / "out"
    first, env = _stuck_caption_job(s3_bucket, str(output), checkpoint, faulty_s3, job_env)
    try:
        _wait_for(lambda: len(shard_names(str(output))) >= 1, first)
        owner = json.loads((output / "_lease.json").read_text())
        assert owner["pid"] == first.pid
        listing = output / "_listing" / owner["run_id"]
        assert listing.is_dir()

        with pytest.MonkeyPatch.context() as patch:  # the same command, in this process, Ray forbidden
            patch.setattr(connect, "ensure_ray", refuse_to_start_ray)
            second = run_cli("caption", *_caption_command(s3_bucket, str(output), checkpoint)[2:])

        assert_one_line_exit_2(second, f"is in use by caption run {owner['run_id']}")
        assert first.poll() is None and listing.is_dir()  # the refused run deleted nothing of the live one
    finally:
        _kill_job(first, env)  # the owner dies: its lease stays, stale at once (its process on this host is gone)
    faulty_s3.heal()
    before = read_output(str(output)).column("path").to_pylist()
    assert 1 <= len(before) < len(names) and not (output / SUMMARY_FILE).exists()
    # What a kill can leave on a local disk: a temporary file (a shard itself only ever appears whole).
    (output / ".part-20260101T000000-abcdef-000009.parquet.tmp-0123abcd").write_bytes(b"PAR1 half")

    summary = caption(CaptionConfig(input=f"{s3_bucket}/in", out=str(output), checkpoint=checkpoint,
                                    batch_size=2, max_length=3, rows_per_shard=2))

    paths = read_output(str(output)).column("path").to_pylist()
    assert sorted(paths) == sorted(f"{s3_bucket}/in/{n}" for n in names)  # one row per image
    # A write task of the killed run can still land a shard after ``before`` was read (a Ray worker
    # outlives its raylet for a moment); the re-run skips whatever is there and captions the rest.
    assert summary.skipped >= len(set(before)) and summary.skipped + summary.ok == len(names)
    assert not (output / "_lease.json").exists() and not (output / "_listing").exists()
    assert not (output / ".part-20260101T000000-abcdef-000009.parquet.tmp-0123abcd").exists()


def _decoded_batch(images: np.ndarray) -> dict[str, np.ndarray]:
    n = len(images)
    return {"path": np.array([f"/img-{i}.png" for i in range(n)], dtype=object), "image": images,
            "width": np.full(n, SIZE, dtype=np.int32), "height": np.full(n, SIZE, dtype=np.int32),
            "error": np.full(n, "", dtype=object), "retry": np.zeros(n, dtype=bool)}


def _small_card(captioner, fits: int, calls: list[int]) -> None:
    """A test double of the model's forward: the beam search raises CUDA's out-of-memory error for
    batches of more than ``fits`` images, as a card too small for the batch does."""
    search = captioner.decoder.beam_search

    def forward(features, **kwargs):
        calls.append(len(features))
        if len(features) > fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(features)} images")
        return search(features, **kwargs)

    captioner.decoder.beam_search = forward


def test_out_of_memory_halves_the_batch_and_every_image_gets_its_caption(checkpoint, caplog):
    from capray.captioning import Captioner

    images = np.stack([_rgb(seed=i) for i in range(8)])
    reference = Captioner(checkpoint, beam_size=2, max_length=3, threads=1, use_gpu=False)(_decoded_batch(images))
    captioner = Captioner(checkpoint, beam_size=2, max_length=3, threads=1, use_gpu=False)
    calls: list[int] = []
    _small_card(captioner, 2, calls)

    with caplog.at_level("WARNING", logger="capray.captioning"):
        first = captioner(_decoded_batch(images))
        second = captioner(_decoded_batch(images))

    assert calls == [8, 4, 2, 2, 2, 2] + [2, 2, 2, 2]  # halved twice, then batches of 2 from the start
    for table in (first, second):
        assert table.column("caption").to_pylist() == reference.column("caption").to_pylist()
        assert np.allclose(table.column("score").to_numpy(), reference.column("score").to_numpy(), atol=1e-4)
    warnings = [r for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(warnings) == 1 and "batch of 8 images" in warnings[0].getMessage()


def test_out_of_memory_with_one_image_fails_instead_of_writing_error_rows(checkpoint):
    from capray.captioning import Captioner

    captioner = Captioner(checkpoint, beam_size=2, max_length=3, threads=1, use_gpu=False)
    calls: list[int] = []
    _small_card(captioner, 0, calls)

    with pytest.raises(torch.OutOfMemoryError):
        captioner(_decoded_batch(np.stack([_rgb(seed=i) for i in range(4)])))
    assert calls == [4, 2, 1]


def test_a_replacement_killed_halfway_is_finished_by_the_next_run_and_can_be_repeated(tmp_path):
    """``_overwrite/_replace.json`` lists the old and new shards; replaying it, twice, leaves only the new."""
    from capray import lease
    from capray.captioning import REPLACE_FILE, _finish_replacement

    output = tmp_path / "out"
    old = ["part-20260101T000000-aaaaaa-000000.parquet", "part-20260101T000000-aaaaaa-000001.parquet"]
    new = ["part-20260202T000000-bbbbbb-000000.parquet", "part-20260202T000000-bbbbbb-r1-000003.parquet"]
    for name in old:
        write_parquet(str(output / name), pa.table({"path": [f"old {name}"]}))
    for name in new:
        write_parquet(str(output / "_overwrite" / name), pa.table({"path": [f"new {name}"]}))
    storage.write_json(str(output / "_overwrite" / REPLACE_FILE), {"old": old, "new": new, "markers": [],
                                                                     "old_markers": []})
    storage.move(str(output / "_overwrite" / new[0]), str(output / new[0]))  # killed after its first move
    storage.delete_file(str(output / old[1]))  # ... or after one delete

    with lease.acquire(str(output), run_id="next") as held:
        _finish_replacement(str(output), held)
        _finish_replacement(str(output), held)  # nothing left to do: a no-op

    assert shard_names(str(output)) == sorted(new)
    assert sorted(read_output(str(output)).column("path").to_pylist()) == sorted(f"new {n}" for n in new)
    assert not (output / "_overwrite").exists()


# --- progress lines -------------------------------------------------------------------------------------

def test_a_run_logs_progress_lines_at_the_configured_cadence(ray_local, tmp_path, checkpoint, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(48):
        Image.fromarray(_rgb(seed=i)).save(images / f"img-{i:02d}.png")
    (images / "broken.png").write_bytes(b"not a png")
    config = CaptionConfig(input=str(images), out=str(tmp_path / "out"), checkpoint=checkpoint, batch_size=1,
                           max_length=12, rows_per_shard=8, progress_s=1.0)
    caplog.set_level(logging.INFO, logger="capray.progress")

    started = time.monotonic()
    summary = caption(config)
    elapsed = time.monotonic() - started

    lines = [r.getMessage() for r in caplog.records if r.name == "capray.progress"]
    assert lines and len(lines) <= elapsed + 2, (elapsed, lines)  # one a second at most, and the last one
    parsed = [re.fullmatch(r"caption: (\d+)/49 images \([\d.]+%\), (?:[\d,.]+|-) images/s, (\d) error rows, "
                           r"ETA .+", line) for line in lines]
    assert all(parsed), lines
    done = [int(m.group(1)) for m in parsed]
    assert done == sorted(done) and summary.ok + summary.errors == 49
    assert lines[-1].startswith("caption: 49/49 images (100.0%)") and ", 1 error rows, ETA 0 s" in lines[-1]
