"""WebDataset tar shards and Parquet files of image bytes as input (capray.shards, capray caption).

Shards are made here in img2dataset's layout (``00000.tar``: ``000000000.jpg`` + ``.txt`` + ``.json``
per sample; Parquet with ``key``, ``url``, ``caption``, ``jpg`` columns), some samples broken, one
shard truncated, and captioned on moto's S3 through a local Ray.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capray import shards, storage
from capray.captioning import CaptionConfig, caption
from capray.formats import CAPTION_SCHEMA
from clirun import assert_one_line_exit_2, refuse_to_start_ray, run_cli
from test_captioning import read_output, shard_names, write_small_checkpoint

SIZE = 64


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of samples, each (key, {extension: bytes}), the files of a sample together."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample(index: int, *, image: bytes | None = None, url: bool = True) -> tuple[str, dict[str, bytes]]:
    key = f"{index:09d}"
    members = {"jpg": jpeg(index) if image is None else image, "txt": f"caption {index}".encode()}
    if url:
        members["json"] = json.dumps({"key": key, "url": f"https://example.com/{index}.jpg"}).encode()
    return key, members


def put(uri: str, data: bytes) -> None:
    storage.write_bytes(uri, data)


def members_end(samples: list[tuple[str, dict[str, bytes]]]) -> int:
    """Where the files of ``samples`` end in their tar: a header block and whole data blocks each."""
    blocks = sum(1 + -(-len(data) // tarfile.BLOCKSIZE) for _, members in samples for data in members.values())
    return blocks * tarfile.BLOCKSIZE


def truncated_in_sample(samples: list[tuple[str, dict[str, bytes]]], cut_index: int) -> bytes:
    """The tar of ``samples`` cut half-way through sample ``cut_index``'s image (its first file)."""
    start = members_end(samples[:cut_index]) + tarfile.BLOCKSIZE
    return make_tar(samples)[: start + len(samples[cut_index][1]["jpg"]) // 2]


# --- capray.shards, no Ray ---------------------------------------------------------------------------

def test_a_tar_gives_its_samples_with_keys_and_fields(tmp_path):
    path = str(tmp_path / "00000.tar")
    put(path, make_tar([sample(0), sample(1)]))
    got = list(shards.iter_samples(path, image_extensions=("jpg",)))
    assert [s.path for s in got] == [f"{path}#000000000", f"{path}#000000001"]
    assert [s.value("url") for s in got] == ["https://example.com/0.jpg", "https://example.com/1.jpg"]
    assert [s.value("txt") for s in got] == ["caption 0", "caption 1"]
    assert got[0].image == jpeg(0) and all(s.error is None for s in got)


def test_a_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    samples = [sample(i) for i in range(4)]
    path = str(tmp_path / "cut.tar")
    put(path, truncated_in_sample(samples, 2))
    got = list(shards.iter_samples(path, image_extensions=("jpg",)))
    assert [s.key for s in got] == ["000000000", "000000001", "000000002", None]
    assert [s.error is None for s in got] == [True, True, False, False]
    assert "cut off" in got[2].error and got[3].path == path and "truncated" in got[3].error


def test_a_tar_cut_between_samples_is_still_reported(tmp_path):
    # Python's tarfile ends quietly at a member boundary: only the missing end-of-archive blocks tell.
    samples = [sample(0), sample(1)]
    path = str(tmp_path / "cut.tar")
    put(path, make_tar(samples)[: members_end(samples[:1])])
    got = list(shards.iter_samples(path, image_extensions=("jpg",)))
    assert [s.key for s in got] == ["000000000", None]
    assert "cut off" in got[0].error  # its last files may be what the cut took
    assert got[1].path == path and "end-of-archive" in got[1].error


def test_a_compressed_or_concatenated_tar_is_not_read_as_one_whole_tar(tmp_path):
    import gzip

    packed = str(tmp_path / "packed.tar")
    put(packed, gzip.compress(make_tar([sample(0)])))
    (error,) = shards.iter_samples(packed, image_extensions=("jpg",))
    assert error.path == packed and "not a tar" in error.error
    joined = str(tmp_path / "joined.tar")  # tarfile would stop at the first end-of-archive marker
    put(joined, make_tar([sample(0)]) + make_tar([sample(1)]))
    got = list(shards.iter_samples(joined, image_extensions=("jpg",)))
    assert got[-1].path == joined and "after the end-of-archive" in got[-1].error


@pytest.mark.parametrize("data, needle", [(b"", "not a tar"), (b"plain text, not a tar\n" * 50, "not a tar")])
def test_a_file_that_is_not_a_tar_is_one_error(tmp_path, data, needle):
    path = str(tmp_path / "bad.tar")
    put(path, data)
    got = list(shards.iter_samples(path, image_extensions=("jpg",)))
    assert len(got) == 1 and got[0].path == path and needle in got[0].error


def test_a_sample_without_an_image_and_a_repeated_key_are_errors(tmp_path):
    key, members = sample(1)
    path = str(tmp_path / "odd.tar")
    put(path, make_tar([("000000000", {"txt": b"no image here"}), (key, members), sample(2), (key, members)]))
    got = {(s.key, s.error is None) for s in shards.iter_samples(path, image_extensions=("jpg", "png"))}
    assert ("000000000", False) in got and ("000000002", True) in got
    errors = [s for s in shards.iter_samples(path, image_extensions=("jpg",)) if s.key == key]
    assert [e.error is None for e in errors] == [True, False] and "twice" in errors[1].error
    assert errors[0].path == f"{path}#{key}" and errors[1].path == f"{path}#{key}#3"  # one row each


def test_a_txt_that_is_not_utf8_is_an_error(tmp_path):
    path = str(tmp_path / "latin.tar")
    put(path, make_tar([("k", {"jpg": jpeg(0), "txt": "café".encode("latin-1")})]))
    (got,) = shards.iter_samples(path, image_extensions=("jpg",))
    assert got.image is None and "not UTF-8" in got.error


def test_a_missing_shard_is_one_error(tmp_path):
    path = str(tmp_path / "nope.tar")
    assert [(s.path, s.error) for s in shards.iter_samples(path, image_extensions=("jpg",))] == [
        (path, "no such shard")]


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue().to_pybytes()


def test_parquet_rows_are_samples_named_by_the_key_column_or_the_row(tmp_path):
    images = [jpeg(i) for i in range(3)]
    keyed = str(tmp_path / "keyed.parquet")
    put(keyed, parquet_bytes(pa.table({"key": ["a", "b", "c"], "url": ["u0", "u1", None], "jpg": images}),
                             row_group_size=2))
    got = list(shards.iter_samples(keyed, image_extensions=(), columns=("url",)))
    assert [s.path for s in got] == [f"{keyed}#a", f"{keyed}#b", f"{keyed}#c"]
    assert got[1].value("key") == "b" and not got[1].numbered
    assert [s.value("url") for s in got] == ["u0", "u1", None] and got[2].image == images[2]
    hf = str(tmp_path / "hf.parquet")  # a Hugging Face image struct, no key column
    structs = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)])
    put(hf, parquet_bytes(pa.table({"image": structs, "text": ["x", "y", "z"]})))
    got = list(shards.iter_samples(hf, image_extensions=(), columns=("text",)))
    assert [s.key for s in got] == ["0", "1", "2"] and got[1].image == images[1] and got[1].value("text") == "y"
    assert all(s.numbered for s in got)
    repeated = str(tmp_path / "repeated.parquet")
    put(repeated, parquet_bytes(pa.table({"id": ["x", "y", "x"], "jpg": images})))
    got = list(shards.iter_samples(repeated, image_extensions=(), columns=("id",)))
    assert [s.path for s in got] == [f"{repeated}#x", f"{repeated}#y", f"{repeated}#x#2"]
    assert [s.error is None for s in got] == [True, True, False] and got[0].value("id") == "x"


def test_parquet_without_an_image_column_or_not_parquet_is_one_error(tmp_path):
    no_images = str(tmp_path / "no-images.parquet")
    put(no_images, parquet_bytes(pa.table({"key": ["a"], "caption": ["x"]})))
    (error,) = shards.iter_samples(no_images, image_extensions=())
    assert error.path == no_images and "no column" in error.error
    named = list(shards.iter_samples(no_images, image_extensions=(), image_column="caption", key_column="nope"))
    assert len(named) == 1 and "nope" in named[0].error
    garbage = str(tmp_path / "garbage.parquet")
    put(garbage, b"not parquet at all" * 20)
    (error,) = shards.iter_samples(garbage, image_extensions=())
    assert "not a Parquet file" in error.error


def test_patterns_expand_in_order_and_sample_paths_name_their_shard():
    assert shards.expand("s3://b/s/{00000..00002}.tar") == [f"s3://b/s/0000{i}.tar" for i in range(3)]
    assert shards.shard_of("s3://b/s/00001.tar#000000012") == "s3://b/s/00001.tar"
    assert shards.shard_of("s3://b/p/x.parquet#a#b") == "s3://b/p/x.parquet"
    assert shards.shard_of("s3://b/img/cat.jpg") == "s3://b/img/cat.jpg"
    assert shards.shard_of("s3://b/s/A.TAR#k") == "s3://b/s/A.TAR"
    assert shards.shard_of("s3://b/p/f.parquet#a.tar#b") == "s3://b/p/f.parquet"


# --- capray caption on moto S3 -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("checkpoint"))
    write_small_checkpoint(directory)
    return directory


def webdataset_input(root: str) -> tuple[set[str], set[str]]:
    """Three shards under ``root`` (one truncated); returns (good sample paths, error row paths)."""
    broken = jpeg(99)[:200]
    first = [sample(0), sample(1), sample(2, image=broken), sample(3, url=False)]
    second = [sample(10), ("000000011", {"txt": b"only a caption"}), sample(12)]
    third = [sample(20), sample(21), sample(22), sample(23)]
    put(f"{root}/00000.tar", make_tar(first))
    put(f"{root}/00001.tar", make_tar(second))
    put(f"{root}/00002.tar", truncated_in_sample(third, 2))
    good = {f"{root}/00000.tar#{k}" for k in ("000000000", "000000001", "000000003")}
    good |= {f"{root}/00001.tar#{k}" for k in ("000000010", "000000012")}
    good |= {f"{root}/00002.tar#{k}" for k in ("000000020", "000000021")}
    errors = {f"{root}/00000.tar#000000002", f"{root}/00001.tar#000000011", f"{root}/00002.tar#000000022",
              f"{root}/00002.tar"}
    return good, errors


def test_webdataset_shards_one_row_per_sample_keys_kept_then_a_rerun_adds_nothing(ray_local, s3_bucket,
                                                                                    checkpoint):
    root = f"{s3_bucket}/shards"
    good, errors = webdataset_input(root)
    pattern = f"{root}/{{00000..00003}}.tar"  # 00003 does not exist: an error row, not a silent gap
    errors.add(f"{root}/00003.tar")
    out = f"{s3_bucket}/captions"
    summary = caption(CaptionConfig(input=pattern, out=out, checkpoint=checkpoint, batch_size=4))
    table = read_output(out)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(good) + len(errors)  # one row per sample, none twice
    assert {p for p, r in rows.items() if r["error"] is None} == good
    assert {p for p, r in rows.items() if r["error"] is not None} == errors
    assert all(rows[p]["caption"] for p in good)
    assert table.schema.names == [*CAPTION_SCHEMA.names, "key", "url"]
    assert rows[f"{root}/00000.tar#000000001"]["key"] == "000000001"
    assert rows[f"{root}/00000.tar#000000001"]["url"] == "https://example.com/1.jpg"
    assert rows[f"{root}/00000.tar#000000003"]["url"] is None  # that sample has no .json
    assert (summary.total, summary.ok, summary.errors, summary.skipped) == (len(rows), len(good), len(errors), 0)

    before = shard_names(out)
    again = caption(CaptionConfig(input=pattern, out=out, checkpoint=checkpoint, batch_size=4))
    assert (again.ok, again.errors, again.skipped, again.total) == (0, 0, len(rows), len(rows))
    assert shard_names(out) == before and read_output(out).num_rows == len(rows)

    put(f"{root}/00000.tar", b"not read again")  # a complete shard is skipped without reading it
    assert caption(CaptionConfig(input=pattern, out=out, checkpoint=checkpoint, batch_size=4)).errors == 0
    assert shard_names(out) == before

    fixed = [sample(0), sample(1), sample(2), sample(3, url=False)]  # the broken image, fixed at the source
    put(f"{root}/00000.tar", make_tar(fixed))
    retried = caption(CaptionConfig(input=pattern, out=out, checkpoint=checkpoint, batch_size=4, retry_errors=True))
    rows = {r["path"]: r for r in read_output(out).to_pylist()}
    assert len(rows) == read_output(out).num_rows == len(good) + len(errors)  # still one row per sample
    assert rows[f"{root}/00000.tar#000000002"]["error"] is None and retried.ok == 1
    assert {p for p, r in rows.items() if r["error"]} == errors - {f"{root}/00000.tar#000000002"}

    # A sharded output keeps the columns it was written with: asking for others is refused.
    with pytest.raises(ValueError, match="columns"):
        caption(CaptionConfig(input=pattern, out=out, checkpoint=checkpoint, batch_size=4, keep_columns=("key",)))


def test_parquet_input_one_row_per_row_and_a_rerun_adds_nothing(ray_local, s3_bucket, checkpoint):
    root = f"{s3_bucket}/parquet"
    images = [jpeg(i) for i in range(6)]
    images[4] = b"broken bytes"
    table = pa.table({"key": [f"k{i}" for i in range(6)], "url": [f"https://x/{i}" for i in range(6)],
                      "caption": [f"c{i}" for i in range(6)], "jpg": images})
    put(f"{root}/00000.parquet", parquet_bytes(table.slice(0, 3), row_group_size=2))
    put(f"{root}/00001.parquet", parquet_bytes(table.slice(3), row_group_size=2))
    put(f"{root}/00002.parquet", b"PAR1 but then nothing sensible")
    out = f"{s3_bucket}/captions-parquet"
    config = CaptionConfig(input=root, out=out, checkpoint=checkpoint, batch_size=4, keep_columns=("key", "url"))
    summary = caption(config)
    rows = {r["path"]: r for r in read_output(out).to_pylist()}
    expected = {f"{root}/0000{i // 3}.parquet#k{i}" for i in range(6)} | {f"{root}/00002.parquet"}
    assert set(rows) == expected and summary.total == len(expected)
    assert {p for p, r in rows.items() if r["error"]} == {f"{root}/00001.parquet#k4", f"{root}/00002.parquet"}
    assert rows[f"{root}/00001.parquet#k5"]["url"] == "https://x/5"
    again = caption(config)
    assert (again.ok, again.errors, again.skipped) == (0, 0, len(expected))
    assert read_output(out).num_rows == len(expected)


def test_what_an_input_holds_is_told_by_its_files(tmp_path):
    images, tars = tmp_path / "images", tmp_path / "tars"
    images.mkdir()
    tars.mkdir()
    (images / "a.jpg").write_bytes(jpeg(1))
    (tars / "00000.tar").write_bytes(make_tar([sample(0)]))
    assert shards.detect(str(images), ("jpg",)) is None
    assert shards.detect(str(images / "a.jpg"), ("jpg",)) is None
    assert shards.detect(str(tars), ("jpg",)) == shards.WEBDATASET
    assert shards.detect(str(tmp_path / "p" / "{0..3}.parquet"), ("jpg",)) == shards.PARQUET
    with pytest.raises(ValueError, match="one kind"):
        shards.detect(str(tmp_path / "{a.tar,b.parquet}"), ("jpg",))
    (tars / "stray.jpg").write_bytes(jpeg(2))  # which of the two was meant cannot be told
    with pytest.raises(ValueError, match="shards and images"):
        shards.list_shards(str(tars), shards.WEBDATASET, image_extensions=("jpg",))


@pytest.mark.parametrize("case", ["mixed pattern", "no image column", "mistyped key column"])
def test_bad_shard_input_exits_2_with_one_line_before_ray_starts(case, s3_bucket, checkpoint, monkeypatch):
    from capray import connect

    put(f"{s3_bucket}/pq/00000.parquet", parquet_bytes(pa.table({"key": ["a"], "caption": ["x"]})))
    put(f"{s3_bucket}/pq/00001.parquet", parquet_bytes(pa.table({"key": ["b"], "jpg": [jpeg(0)]})))
    flags = {"mixed pattern": ["--input", f"{s3_bucket}/x/{{a.tar,b.parquet}}"],
             "no image column": ["--input", f"{s3_bucket}/pq/00000.parquet"],
             "mistyped key column": ["--input", f"{s3_bucket}/pq", "--key-column", "kee"]}[case]
    monkeypatch.setattr(connect, "ensure_ray", refuse_to_start_ray)
    result = run_cli("caption", *flags, "--out", f"{s3_bucket}/out", "--checkpoint", checkpoint)
    assert_one_line_exit_2(result)
    assert result.stderr.lstrip().startswith("capray caption: error: "), result.stderr


# --- capray prepare from shards → train → evaluate ------------------------------------------------------

def test_shard_records_take_splits_from_the_data_or_from_a_hash_of_the_key(tmp_path):
    from capray.annotations import read_sources

    with_split = [(f"{i:09d}", {"jpg": jpeg(i), "txt": f"c {i}".encode(),
                                "json": json.dumps({"split": "val" if i == 1 else "train"}).encode()})
                  for i in range(3)]
    put(str(tmp_path / "a" / "00000.tar"), make_tar(with_split))
    records = read_sources([(str(tmp_path / "a"), None)], val_fraction=0.5, test_fraction=0.0)
    assert [r.split for r in records] == ["train", "val", "train"] and records[0].captions == ("c 0",)
    keys = [f"k{i}" for i in range(400)]
    parquet = str(tmp_path / "b" / "00000.parquet")
    put(parquet, parquet_bytes(pa.table({"key": keys, "caption": ["x"] * 400, "jpg": [b"j"] * 400})))
    first = read_sources([(parquet, None)], val_fraction=0.2, test_fraction=0.1)
    again = read_sources([(str(tmp_path / "b"), None)], val_fraction=0.2, test_fraction=0.1)
    assert [r.split for r in first] == [r.split for r in again]  # deterministic, by the key alone
    counts = {s: sum(r.split == s for r in first) for s in ("train", "val", "test")}
    assert 240 <= counts["train"] <= 320 and 50 <= counts["val"] <= 110 and 20 <= counts["test"] <= 60
    assert first[7].image == first[7].image_id == f"{parquet}#k7"
