"""The shapes world: determinism, splits, captions that agree with the ground truth, the scorer, S3,
the webdataset and Parquet layouts."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capray import storage
from capray.annotations import read_annotations
from capray.config import SynthJob
from capray.synth import (COLOR_RGB, COLORS, PARQUET_SCHEMA, RELATIONS, SHAPES, SIZE_FRACTIONS, WORDS,
                          SynthConfig, assign_splits, generate, named_objects, names_objects_correctly,
                          object_accuracy, relation)
from capray.vocab import tokenize

SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[str, list[dict]]:
    """One generated dataset shared by the read-only tests: its folder and its parsed manifest lines."""
    out = str(tmp_path_factory.mktemp("shapes"))
    manifest = generate(out, SynthConfig(num_images=200, seed=3, image_size=SIZE))
    rows = [json.loads(line) for line in storage.read_text(manifest).splitlines()]
    return out, rows


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    return [tuple(r["objects"]) for r in rows if len(r["objects"]) == 2]


def _centre(obj: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _files(root: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


# --- determinism ------------------------------------------------------------------------------

def test_same_seed_gives_identical_manifest_and_image_bytes(tmp_path):
    config = SynthConfig(num_images=12, seed=7, image_size=SIZE)
    generate(str(tmp_path / "a"), config)
    generate(str(tmp_path / "b"), config)
    a, b = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
    assert len([p for p in a if p.endswith(".png")]) == 12
    assert a == b


def test_different_seed_gives_different_images_and_manifest(tmp_path):
    generate(str(tmp_path / "a"), SynthConfig(num_images=12, seed=7, image_size=SIZE))
    generate(str(tmp_path / "b"), SynthConfig(num_images=12, seed=8, image_size=SIZE))
    a, b = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
    assert a["manifest.jsonl"] != b["manifest.jsonl"]
    images_a = {p.rsplit(os.sep, 1)[-1]: data for p, data in a.items() if p.endswith(".png")}
    images_b = {p.rsplit(os.sep, 1)[-1]: data for p, data in b.items() if p.endswith(".png")}
    assert all(images_a[name] != images_b[name] for name in images_a)


# --- splits -----------------------------------------------------------------------------------

def test_splits_follow_the_fractions(world):
    _, rows = world
    counts = Counter(r["split"] for r in rows)
    assert counts == {"train": 160, "val": 20, "test": 20}


def test_image_paths_name_their_split(world):
    out, rows = world
    for r in rows:
        assert r["image"] == f"images/{r['split']}/{r['image_id']}.png"
        assert os.path.isfile(os.path.join(out, r["image"]))


def test_three_images_give_one_per_split():
    assert sorted(assign_splits(SynthConfig(num_images=3))) == ["test", "train", "val"]


def test_custom_fractions_are_honoured():
    splits = assign_splits(SynthConfig(num_images=100, train_fraction=0.5, val_fraction=0.3, test_fraction=0.2))
    assert Counter(splits) == {"train": 50, "val": 30, "test": 20}


# --- content ----------------------------------------------------------------------------------

def test_about_half_the_images_show_two_objects(world):
    _, rows = world
    counts = Counter(len(r["objects"]) for r in rows)
    assert set(counts) == {1, 2}
    assert 0.35 <= counts[2] / len(rows) <= 0.65


def test_objects_have_valid_attributes_and_sizes(world):
    _, rows = world
    for r in rows:
        for obj in r["objects"]:
            assert obj["shape"] in SHAPES and obj["color"] in COLORS
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert x1 - x0 == y1 - y0
            low, high = SIZE_FRACTIONS[obj["size"]]
            assert low * SIZE - 1 <= x1 - x0 <= high * SIZE + 1


def test_two_objects_never_overlap(world):
    _, rows = world
    for a, b in _pairs(rows):
        ax0, ay0, ax1, ay1 = a["box"]
        bx0, by0, bx1, by1 = b["box"]
        apart = ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0  # at least one pixel between them
        assert apart, (a, b)


def test_two_objects_never_share_colour_and_shape(world):
    _, rows = world
    pairs = _pairs(rows)
    assert pairs
    assert all((a["color"], a["shape"]) != (b["color"], b["shape"]) for a, b in pairs)


def test_relation_between_two_objects_is_unambiguous(world):
    _, rows = world
    for a, b in _pairs(rows):
        (ax, ay), (bx, by) = _centre(a), _centre(b)
        major, minor = sorted((abs(bx - ax), abs(by - ay)), reverse=True)
        assert major >= 2 * minor and major >= 0.15 * SIZE, (a, b)


def test_all_four_relations_occur(world):
    _, rows = world
    assert {relation(a, b) for a, b in _pairs(rows)} == set(RELATIONS)


def test_relation_uses_image_coordinates():
    top = {"box": [20, 0, 30, 10]}
    bottom = {"box": [22, 40, 32, 50]}
    left = {"box": [0, 20, 10, 30]}
    assert relation(top, bottom) == "above" and relation(bottom, top) == "below"
    assert relation(left, {"box": [40, 22, 50, 32]}) == "left of"


def test_images_decode_at_the_requested_size(world):
    out, rows = world
    for r in rows[:20]:
        image = Image.open(io.BytesIO(storage.read_bytes(os.path.join(out, r["image"]))))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_box_centre_shows_the_objects_colour(world):
    out, rows = world
    palette = {name: np.array(rgb) for name, rgb in COLOR_RGB.items()}
    for r in rows[:60]:
        pixels = np.asarray(Image.open(os.path.join(out, r["image"])).convert("RGB")).astype(int)
        for obj in r["objects"]:
            x, y = (int(c) for c in _centre(obj))
            pixel = pixels[y, x]
            nearest = min(palette, key=lambda name: np.abs(palette[name] - pixel).sum())
            assert nearest == obj["color"], (r["image_id"], obj, pixel)
            assert np.abs(palette[obj["color"]] - pixel).max() <= 20


def test_background_is_light_and_unlike_any_object_colour(world):
    out, rows = world
    for r in rows[:60]:
        corners = np.asarray(Image.open(os.path.join(out, r["image"])).convert("RGB"))[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.min() >= 180  # objects keep off the edge; every object colour has a channel <= 60


# --- captions ---------------------------------------------------------------------------------

def test_every_reference_caption_names_the_ground_truth_objects(world):
    _, rows = world
    for r in rows:
        assert len(r["captions"]) == 5
        for caption in r["captions"]:
            assert names_objects_correctly(caption, r["objects"]), (caption, r["objects"])


def test_relation_words_agree_with_the_box_centres(world):
    _, rows = world
    checked = 0
    for r in rows:
        for caption in r["captions"]:
            said = [rel for rel in RELATIONS if f" {rel} " in caption]
            if len(r["objects"]) == 1:
                assert not said, caption
                continue
            assert len(said) == 1, caption
            before, after = caption.split(f" {said[0]} ")
            (first,), (second,) = named_objects(before), named_objects(after)
            by_name = {(o["color"], o["shape"]): o for o in r["objects"]}
            a, b = by_name[first], by_name[second]
            (ax, ay), (bx, by) = _centre(a), _centre(b)
            expected = ("left of" if bx > ax else "right of") if abs(bx - ax) > abs(by - ay) else \
                ("above" if by > ay else "below")
            assert said[0] == expected, (caption, a, b)
            checked += 1
    assert checked > 100


def test_size_words_agree_with_the_objects(world):
    _, rows = world
    for r in rows:
        sizes = {(o["color"], o["shape"]): o["size"] for o in r["objects"]}
        for caption in r["captions"]:
            tokens = tokenize(caption)
            for i, token in enumerate(tokens[:-2]):
                if token in ("small", "large"):
                    assert sizes[(tokens[i + 1], tokens[i + 2])] == token, caption


def test_captions_use_only_the_small_vocabulary(world):
    _, rows = world
    words = {w for r in rows for c in r["captions"] for w in tokenize(c)}
    assert words <= set(WORDS)


def test_reference_captions_are_distinct_while_templates_last(world):
    _, rows = world
    for r in rows:
        # Two objects have eight templates; one object on a textured background has the fewest: four.
        expected = {5} if len(r["objects"]) == 2 else {4, 5}
        assert len(set(r["captions"])) in expected, r["captions"]


# --- scorer -----------------------------------------------------------------------------------

RED_CIRCLE = {"shape": "circle", "color": "red", "size": "large", "box": [0, 0, 10, 10]}
BLUE_SQUARE = {"shape": "square", "color": "blue", "size": "small", "box": [30, 0, 36, 6]}


def test_named_objects_reads_colour_optional_size_and_shape():
    assert named_objects("A large red circle, left of a blue small square.") == [("red", "circle"), ("blue", "square")]
    assert named_objects("a red thing near a circle") == []


@pytest.mark.parametrize("caption", [
    "a red circle left of a blue square",
    "a small blue square right of a large red circle",
    "there is a blue square and a red circle",
])
def test_scorer_accepts_captions_naming_both_objects(caption):
    assert names_objects_correctly(caption, [RED_CIRCLE, BLUE_SQUARE])


@pytest.mark.parametrize("caption", [
    "a green circle left of a blue square",   # wrong colour
    "a red triangle left of a blue square",   # wrong shape
    "a red circle",                           # missing object
    "a red circle left of a blue square above a yellow triangle",  # extra object
    "a red circle left of a red circle",      # one object named twice, the other not at all
    "",
])
def test_scorer_rejects_wrong_captions(caption):
    assert not names_objects_correctly(caption, [RED_CIRCLE, BLUE_SQUARE])


def test_scorer_rejects_a_second_object_that_is_not_there():
    assert names_objects_correctly("a large red circle", [RED_CIRCLE])
    assert not names_objects_correctly("a red circle left of a blue square", [RED_CIRCLE])


def test_object_accuracy_is_the_fraction_correct():
    captions = ["a red circle", "a blue square", "a red circle left of a blue square", "a green circle"]
    objects = [[RED_CIRCLE], [RED_CIRCLE], [RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE]]
    assert object_accuracy(captions, objects) == 0.5


def test_object_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        object_accuracy(["a red circle"], [])


# --- the manifest as the rest of capray reads it ----------------------------------------------

def test_read_annotations_gives_splits_and_absolute_image_uris(world):
    out, rows = world
    records = read_annotations(os.path.join(out, "manifest.jsonl"))
    assert [r.image_id for r in records] == [r["image_id"] for r in rows]
    assert [r.split for r in records] == [r["split"] for r in rows]
    for record, row in zip(records, rows):
        assert record.image == os.path.join(out, row["image"]) and os.path.isabs(record.image)
        assert storage.is_file(record.image)
        assert list(record.objects) == row["objects"]
        assert list(record.captions) == row["captions"]


def test_generate_into_s3_matches_local_output(s3_bucket, tmp_path):
    config = SynthConfig(num_images=8, seed=5, image_size=SIZE)
    local = generate(str(tmp_path), config)
    remote = generate(storage.join(s3_bucket, "shapes"), config)
    assert remote == f"{s3_bucket}/shapes/manifest.jsonl"
    assert storage.read_text(remote) == storage.read_text(local)
    records = read_annotations(remote)
    assert len(records) == 8
    for record in records:
        assert record.image.startswith(f"{s3_bucket}/shapes/images/{record.split}/")
        relative = record.image[len(f"{s3_bucket}/shapes/"):]
        assert storage.read_bytes(record.image) == storage.read_bytes(str(tmp_path / relative))


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"num_images": 0},
    {"num_images": -5},
    {"num_images": 10, "seed": -1},
    {"num_images": 10, "image_size": 31},
    {"num_images": 10, "captions_per_image": 0},
    {"num_images": 10, "train_fraction": 0.9},  # sums to 1.1
    {"num_images": 10, "train_fraction": 0.0, "val_fraction": 0.5, "test_fraction": 0.5},
    {"num_images": 10, "train_fraction": 1.2, "val_fraction": -0.1, "test_fraction": -0.1},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SynthConfig(**kwargs)


def test_config_accepts_the_smallest_image_size(tmp_path):
    manifest = generate(str(tmp_path), SynthConfig(num_images=40, image_size=32))
    rows = [json.loads(line) for line in storage.read_text(manifest).splitlines()]
    assert any(len(r["objects"]) == 2 for r in rows)


# --- webdataset and Parquet shards -----------------------------------------------------------

SHARDED = SynthConfig(num_images=12, seed=11, image_size=32)
PER_SHARD = 5


@pytest.fixture(scope="module")
def manifest_rows(tmp_path_factory) -> list[dict]:
    """The files layout of ``SHARDED``: what every other layout must agree with."""
    manifest = generate(str(tmp_path_factory.mktemp("files")), SHARDED)
    return [json.loads(line) for line in storage.read_text(manifest).splitlines()]


@pytest.fixture(scope="module")
def tar_shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("webdataset"))
    assert generate(out, SHARDED, format="webdataset", samples_per_shard=PER_SHARD) == os.path.join(out, "shards")
    return out


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("parquet"))
    assert generate(out, SHARDED, format="parquet", samples_per_shard=PER_SHARD) == os.path.join(out, "parquet")
    return out


def _members(tar_path: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]


def test_webdataset_shards_are_numbered_and_hold_samples_per_shard_images(tar_shards):
    shards = os.path.join(tar_shards, "shards")
    assert sorted(os.listdir(shards)) == ["00000.tar", "00001.tar", "00002.tar"]
    sizes = [len(_members(os.path.join(shards, name))) // 3 for name in sorted(os.listdir(shards))]
    assert sizes == [5, 5, 2]


def test_webdataset_members_are_jpg_txt_json_per_key_in_index_order(tar_shards):
    names = [info.name for name in ("00000.tar", "00001.tar", "00002.tar")
             for info, _ in _members(os.path.join(tar_shards, "shards", name))]
    assert names == [f"{i:09d}.{ext}" for i in range(12) for ext in ("jpg", "txt", "json")]


def test_webdataset_samples_match_the_files_manifest(tar_shards, manifest_rows):
    members = {info.name: data for name in ("00000.tar", "00001.tar", "00002.tar")
               for info, data in _members(os.path.join(tar_shards, "shards", name))}
    for index, row in enumerate(manifest_rows):
        key = f"{index:09d}"
        meta = json.loads(members[f"{key}.json"].decode("utf-8"))
        assert meta == {"key": key, "url": f"shapes://11/{index}", "caption": row["captions"][0],
                        "captions": row["captions"], "split": row["split"], "objects": row["objects"],
                        "width": 32, "height": 32}
        assert members[f"{key}.txt"].decode("utf-8") == row["captions"][0]
        image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32)


def test_webdataset_members_carry_no_time_or_owner(tar_shards):
    for info, _ in _members(os.path.join(tar_shards, "shards", "00000.tar")):
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)


def test_webdataset_same_seed_gives_identical_tars(tar_shards, tmp_path):
    generate(str(tmp_path), SHARDED, format="webdataset", samples_per_shard=PER_SHARD)
    assert _files(str(tmp_path / "shards")) == _files(os.path.join(tar_shards, "shards"))


def test_sharded_formats_record_format_and_shard_size(tar_shards, parquet_shards):
    for out, fmt in ((tar_shards, "webdataset"), (parquet_shards, "parquet")):
        written = storage.read_json(os.path.join(out, "synth.json"))
        assert written["format"] == fmt and written["samples_per_shard"] == PER_SHARD
        assert written["num_images"] == 12 and written["seed"] == 11
        assert not os.path.exists(os.path.join(out, "manifest.jsonl"))


def test_parquet_files_hold_samples_per_shard_rows_of_the_schema(parquet_shards):
    folder = os.path.join(parquet_shards, "parquet")
    assert sorted(os.listdir(folder)) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    tables = [pq.read_table(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    assert [t.num_rows for t in tables] == [5, 5, 2]
    for table in tables:
        assert table.schema.names == ["key", "url", "caption", "captions", "split", "objects", "jpg", "width",
                                      "height"]
        assert table.schema.equals(PARQUET_SCHEMA)
        assert table.schema.field("captions").type == pa.list_(pa.string())
        assert table.schema.field("jpg").type == pa.binary()
        assert table.schema.field("width").type == pa.int32()


def test_parquet_rows_match_the_files_manifest(parquet_shards, manifest_rows):
    rows = pq.read_table(os.path.join(parquet_shards, "parquet")).to_pylist()
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(12)]
    for row, expected in zip(rows, manifest_rows):
        assert row["captions"] == expected["captions"] and row["caption"] == expected["captions"][0]
        assert row["split"] == expected["split"]
        assert json.loads(row["objects"]) == expected["objects"]
        assert Image.open(io.BytesIO(row["jpg"])).size == (row["width"], row["height"]) == (32, 32)


def test_generate_into_s3_writes_the_same_tar_shards(s3_bucket, tar_shards):
    folder = generate(storage.join(s3_bucket, "wds"), SHARDED, format="webdataset", samples_per_shard=PER_SHARD)
    assert folder == f"{s3_bucket}/wds/shards"
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert storage.read_bytes(f"{folder}/{name}") == storage.read_bytes(os.path.join(tar_shards, "shards", name))


@pytest.mark.parametrize("kwargs", [{"format": "tfrecord"}, {"samples_per_shard": 0}])
def test_generate_rejects_bad_shard_options(kwargs, tmp_path):
    with pytest.raises(ValueError):
        generate(str(tmp_path), SHARDED, **kwargs)


@pytest.mark.parametrize("kwargs", [{"format": "tfrecord"}, {"format": "WebDataset"}, {"samples_per_shard": 0},
                                    {"samples_per_shard": -1}])
def test_synth_job_rejects_bad_format_and_shard_size(kwargs):
    with pytest.raises(ValueError, match="--format|--samples-per-shard"):
        SynthJob(out="o", world=SynthConfig(num_images=10), **kwargs)


def test_synth_job_defaults_to_files_in_shards_of_a_thousand():
    job = SynthJob(out="o", world=SynthConfig(num_images=10))
    assert (job.format, job.samples_per_shard) == ("files", 1000)
