"""capray.annotations: COCO captions JSON, Karpathy split JSON and JSONL manifests → Records."""
from __future__ import annotations

import json
import math

import pytest

from capray import storage
from capray.annotations import AnnotationError, Record, pair_sources, read_annotations, read_sources
from capray.errors import ConfigError

COCO = {
    "info": {"description": "tiny"},
    "images": [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640, "height": 480},
        {"id": 7, "file_name": "sub/7.jpg"},
        {"id": 9, "file_name": "9.jpg"},  # no captions: captioned only, never trained on
    ],
    "annotations": [
        {"id": 1, "image_id": 42, "caption": "A dog on grass. "},
        {"id": 2, "image_id": 7, "caption": "a red bus"},
        {"id": 3, "image_id": 42, "caption": "  the dog runs"},
    ],
}

KARPATHY = {
    "dataset": "coco",
    "images": [
        {"filepath": "train2014", "filename": "a.jpg", "imgid": 0, "split": "train", "cocoid": 11,
         "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}, {"raw": " a sleeping cat "}]},
        {"filepath": "val2014", "filename": "b.jpg", "imgid": 1, "split": "restval", "cocoid": 12,
         "sentences": [{"raw": "two dogs"}]},
        {"filepath": "val2014", "filename": "c.jpg", "imgid": 2, "split": "val", "cocoid": 13,
         "sentences": [{"raw": "a kite"}]},
        {"filepath": "val2014", "filename": "d.jpg", "imgid": 3, "split": "test", "cocoid": 14,
         "sentences": [{"raw": "a boat"}]},
        {"filename": "e.jpg", "imgid": 4, "split": "test", "sentences": []},  # no filepath, no cocoid
    ],
}

MANIFEST = [
    {"image": "img/0.png", "captions": ["a red circle", "a large red circle"], "split": "train",
     "objects": [{"shape": "circle", "color": "red", "size": "large", "box": [1, 2, 30, 40]}]},
    {"image": "img/1.png", "captions": ["a blue square"], "split": "val"},
    {"image": "img/2.png", "captions": [], "split": "test", "image_id": "two"},
    {"image": "img/3.png"},
]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.image_id: r for r in records}


# --- COCO --------------------------------------------------------------------------------------------

def test_coco_groups_captions_per_image(tmp_path):
    records = by_id(read_annotations(write(tmp_path, "captions_train2014.json", COCO)))
    assert set(records) == {"42", "7", "9"}
    assert records["42"].captions == ("A dog on grass.", "the dog runs")
    assert records["7"].captions == ("a red bus",)
    assert records["9"].captions == ()


def test_coco_images_resolve_against_the_file_folder_by_default(tmp_path):
    records = by_id(read_annotations(write(tmp_path, "ann/captions_train2014.json", COCO)))
    assert records["42"].image == str(tmp_path / "ann" / "COCO_val2014_000000000042.jpg")
    assert records["7"].image == str(tmp_path / "ann" / "sub" / "7.jpg")


def test_coco_images_resolve_against_the_images_root(tmp_path):
    uri = write(tmp_path, "captions_train2014.json", COCO)
    records = by_id(read_annotations(uri, images="s3://bucket/train2014"))
    assert records["7"].image == "s3://bucket/train2014/sub/7.jpg"
    local = by_id(read_annotations(uri, images=str(tmp_path / "imgs")))
    assert local["9"].image == str(tmp_path / "imgs" / "9.jpg")


@pytest.mark.parametrize("name,split", [("captions_train2014.json", "train"), ("captions_val2014.json", "val"),
                                        ("coco.json", "train")])
def test_coco_split_from_the_file_name(tmp_path, name, split):
    assert {r.split for r in read_annotations(write(tmp_path, name, COCO))} == {split}


def test_coco_split_given_explicitly(tmp_path):
    uri = write(tmp_path, "captions_val2014.json", COCO)
    assert {r.split for r in read_annotations(uri, split="test")} == {"test"}


def test_coco_bad_split_argument(tmp_path):
    uri = write(tmp_path, "captions_train2014.json", COCO)
    with pytest.raises(AnnotationError, match="captions_train2014.json.*split must be one of"):
        read_annotations(uri, split="dev")


def test_coco_file_with_one_object_per_line_is_not_taken_for_a_manifest(tmp_path):
    # Hand-formatted JSON often puts each image on a line of its own: still one JSON document.
    lines = ['{"images": [']
    lines += [json.dumps(img) + "," for img in COCO["images"][:-1]] + [json.dumps(COCO["images"][-1])]
    lines += ['], "annotations": [']
    lines += [json.dumps(a) + "," for a in COCO["annotations"][:-1]] + [json.dumps(COCO["annotations"][-1])]
    lines += ["]}"]
    uri = write(tmp_path, "captions_train2014.json", "\n".join(lines) + "\n")
    assert json.loads((tmp_path / "captions_train2014.json").read_text()) == {
        "images": COCO["images"], "annotations": COCO["annotations"]}
    assert by_id(read_annotations(uri))["42"].captions == ("A dog on grass.", "the dog runs")


def test_relative_images_root_resolves_where_it_was_typed(tmp_path, monkeypatch):
    # Ray workers run in another working directory: image URIs must not stay relative.
    uri = write(tmp_path, "captions_train2014.json", COCO)
    monkeypatch.chdir(tmp_path)
    assert by_id(read_annotations(uri, images="train2014"))["9"].image == str(tmp_path / "train2014" / "9.jpg")


# --- Karpathy ----------------------------------------------------------------------------------------

def test_karpathy_records(tmp_path):
    records = by_id(read_annotations(write(tmp_path, "dataset_coco.json", KARPATHY), images="/data/coco"))
    assert records["11"] == Record(image_id="11", image="/data/coco/train2014/a.jpg",
                                   captions=("A cat.", "a sleeping cat"), split="train")
    assert records["13"].image == "/data/coco/val2014/c.jpg"


def test_karpathy_restval_is_train(tmp_path):
    records = by_id(read_annotations(write(tmp_path, "dataset_coco.json", KARPATHY)))
    assert {i: r.split for i, r in records.items()} == {"11": "train", "12": "train", "13": "val", "14": "test",
                                                        "4": "test"}


def test_karpathy_without_filepath_or_cocoid(tmp_path):
    records = by_id(read_annotations(write(tmp_path, "k/dataset_coco.json", KARPATHY)))
    assert records["4"].image == str(tmp_path / "k" / "e.jpg")  # imgid stands in for the missing cocoid
    assert records["4"].captions == ()


# --- JSONL manifest ----------------------------------------------------------------------------------

def test_manifest_records(tmp_path):
    records = read_annotations(write(tmp_path, "data/manifest.jsonl", jsonl(MANIFEST)))
    assert [r.image for r in records] == [str(tmp_path / "data" / "img" / f"{i}.png") for i in range(4)]
    assert [r.split for r in records] == ["train", "val", "test", "train"]  # train by default
    assert [r.captions for r in records] == [("a red circle", "a large red circle"), ("a blue square",), (), ()]
    assert [r.image_id for r in records] == ["img/0.png", "img/1.png", "two", "img/3.png"]
    assert records[0].objects == tuple(MANIFEST[0]["objects"])
    assert records[1].objects is None


def test_manifest_images_resolve_against_the_images_root(tmp_path):
    records = read_annotations(write(tmp_path, "manifest.jsonl", jsonl(MANIFEST)), images="s3://b/shapes")
    assert records[0].image == "s3://b/shapes/img/0.png"


def test_manifest_keeps_absolute_paths_and_uris(tmp_path):
    rows = [{"image": "/abs/a.png"}, {"image": "s3://other/b.png"}]
    records = read_annotations(write(tmp_path, "m.jsonl", jsonl(rows)), images="s3://b/root")
    assert [r.image for r in records] == ["/abs/a.png", "s3://other/b.png"]


def test_manifest_relative_location_resolves_to_absolute_images(tmp_path, monkeypatch):
    write(tmp_path, "data/m.jsonl", jsonl(MANIFEST[:1]))
    monkeypatch.chdir(tmp_path)
    assert read_annotations("data/m.jsonl")[0].image == str(tmp_path / "data" / "img" / "0.png")


def test_manifest_detected_by_content_whatever_the_name(tmp_path):
    records = read_annotations(write(tmp_path, "manifest.json", jsonl(MANIFEST)))
    assert len(records) == 4


def test_one_line_manifest(tmp_path):
    records = read_annotations(write(tmp_path, "one.json", json.dumps(MANIFEST[1])))
    assert [(r.image, r.captions, r.split) for r in records] == [
        (str(tmp_path / "img" / "1.png"), ("a blue square",), "val")]


def test_manifest_skips_blank_lines(tmp_path):
    text = "\n" + jsonl(MANIFEST[:1]) + "\n   \n" + jsonl(MANIFEST[1:2])
    assert len(read_annotations(write(tmp_path, "m.jsonl", text))) == 2


# --- S3 ----------------------------------------------------------------------------------------------

def test_manifest_on_s3_resolves_images_beside_it(s3_bucket):
    uri = f"{s3_bucket}/shapes/manifest.jsonl"
    storage.write_text(uri, jsonl(MANIFEST))
    records = read_annotations(uri)
    assert records[0].image == f"{s3_bucket}/shapes/img/0.png"
    assert records[0].captions == ("a red circle", "a large red circle")


def test_coco_on_s3(s3_bucket):
    uri = f"{s3_bucket}/annotations/captions_val2014.json"
    storage.write_json(uri, COCO)
    records = by_id(read_annotations(uri, images=f"{s3_bucket}/val2014"))
    assert records["7"].image == f"{s3_bucket}/val2014/sub/7.jpg"
    assert records["42"].split == "val"


def test_karpathy_on_s3(s3_bucket):
    uri = f"{s3_bucket}/dataset_coco.json"
    storage.write_json(uri, KARPATHY)
    assert by_id(read_annotations(uri))["12"].image == f"{s3_bucket}/val2014/b.jpg"


# --- malformed files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("{not json at all", "not valid JSON"),
    ('{"images": [], "annotations": {}}', '"annotations" must be a list'),
    ('{"images": {}, "annotations": []}', '"images" must be a list'),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
     r'annotations\[0\] needs "image_id" and a "caption"'),
    ('{"images": [{"file_name": "a.jpg"}], "annotations": []}', r'images\[0\] needs "id"'),
    ('{"images": [{"id": 1, "file_name": 5}], "annotations": []}', r'images\[0\] needs "id" and a "file_name"'),
    ('{"whatever": 1}', "not a COCO captions file"),
    ("[1, 2, 3]", "not a COCO captions file"),
])
def test_malformed_json_names_the_file(tmp_path, content, message):
    uri = write(tmp_path, "broken.json", content)
    with pytest.raises(AnnotationError, match=message) as info:
        read_annotations(uri)
    assert uri in str(info.value)


@pytest.mark.parametrize("change,message", [
    ({"split": "dev"}, r"images\[1\]: split must be one of"),
    ({"split": None}, r"images\[1\]: split must be one of"),
    ({"sentences": "two dogs"}, r'images\[1\] needs "sentences"'),
    ({"sentences": [{"tokens": ["x"]}]}, r'images\[1\] needs "sentences" with a "raw"'),
    ({"filename": None}, r'images\[1\] needs a "filename"'),
])
def test_malformed_karpathy_names_the_file_and_image(tmp_path, change, message):
    obj = json.loads(json.dumps(KARPATHY))
    obj["images"][1].update(change)
    uri = write(tmp_path, "dataset_coco.json", obj)
    with pytest.raises(AnnotationError, match=message) as info:
        read_annotations(uri)
    assert uri in str(info.value)


@pytest.mark.parametrize("bad_line,message", [
    ("{oops", "not valid JSON"),
    ('{"captions": ["a"]}', 'needs an "image" string'),
    ('{"image": 3}', 'needs an "image" string'),
    ('["img/x.png"]', 'needs an "image" string'),
    ('{"image": "x.png", "captions": "a red circle"}', '"captions" must be a list of strings'),
    ('{"image": "x.png", "captions": ["a", 3]}', '"captions" must be a list of strings'),
    ('{"image": "x.png", "split": "validation"}', "split must be one of train, val, test"),
])
def test_malformed_manifest_line_names_the_file_and_line(tmp_path, bad_line, message):
    text = jsonl(MANIFEST[:2]) + "\n" + bad_line + "\n" + jsonl(MANIFEST[2:])  # the bad line is line 4
    uri = write(tmp_path, "manifest.jsonl", text)
    with pytest.raises(AnnotationError, match=message) as info:
        read_annotations(uri)
    assert f"{uri} line 4:" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_manifest(tmp_path, content):
    uri = write(tmp_path, "manifest.jsonl", content)
    with pytest.raises(AnnotationError, match="no records") as info:
        read_annotations(uri)
    assert uri in str(info.value)


def test_empty_json_file_names_the_file(tmp_path):
    uri = write(tmp_path, "captions.json", "")
    with pytest.raises(AnnotationError) as info:
        read_annotations(uri)
    assert uri in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(storage.StorageError, match="nope.jsonl"):
        read_annotations(str(tmp_path / "nope.jsonl"))


def test_annotation_error_is_a_value_error():
    # the command line reports every ConfigError as bad usage (exit code 2)
    assert issubclass(AnnotationError, ConfigError) and issubclass(AnnotationError, ValueError)


# --- several sources: COCO as it comes (two files, two image folders) ---------------------------------

def coco_file(ids: range, split: str) -> dict:
    """An official-style COCO captions file: images named ``COCO_<split>2014_<12-digit id>.jpg``."""
    images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "width": 640, "height": 480} for i in ids]
    annotations = [{"id": 10 * i + k, "image_id": i, "caption": f"image {i} caption {k}"}
                   for i in ids for k in range(2)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


TRAIN_IDS, VAL_IDS = range(1, 31), range(1001, 1201)


@pytest.fixture
def coco_release(tmp_path) -> list[tuple[str, str]]:
    """``annotations/captions_{train,val}2014.json`` with ``train2014/`` and ``val2014/`` beside them."""
    sources = []
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        folder = tmp_path / f"{split}2014"
        folder.mkdir()
        for i in ids:
            (folder / f"COCO_{split}2014_{i:012d}.jpg").write_bytes(b"jpeg")
        sources.append((write(tmp_path, f"annotations/captions_{split}2014.json", coco_file(ids, split)), str(folder)))
    return sources


def splits_of(records: list[Record]) -> dict[str, str]:
    return {r.image_id: r.split for r in records}


def test_coco_release_gives_train_val_and_test_with_their_images(coco_release, tmp_path):
    records = by_id(read_sources(coco_release, test_fraction=0.2))
    assert set(records) == {str(i) for i in (*TRAIN_IDS, *VAL_IDS)}
    assert {records[str(i)].split for i in TRAIN_IDS} == {"train"}
    val_splits = [records[str(i)].split for i in VAL_IDS]
    assert set(val_splits) == {"val", "test"}  # the test split comes out of val only
    for r in records.values():
        folder = "train2014" if int(r.image_id) in TRAIN_IDS else "val2014"
        assert r.image == str(tmp_path / folder / f"COCO_{folder[:-4]}2014_{int(r.image_id):012d}.jpg")
        assert storage.exists(r.image)
        assert r.captions == (f"image {r.image_id} caption 0", f"image {r.image_id} caption 1")


def test_without_test_fraction_the_files_give_train_and_val(coco_release):
    records = read_sources(coco_release)
    assert splits_of(records) == {**{str(i): "train" for i in TRAIN_IDS}, **{str(i): "val" for i in VAL_IDS}}


def test_without_images_roots_each_file_uses_its_own_folder(coco_release, tmp_path):
    records = by_id(read_sources(pair_sources([uri for uri, _ in coco_release], [])))
    assert records["1001"].image == str(tmp_path / "annotations" / "COCO_val2014_000000001001.jpg")


def test_one_source_reads_as_read_annotations(tmp_path):
    uri = write(tmp_path, "dataset_coco.json", KARPATHY)
    assert read_sources([(uri, "/data/coco")]) == read_annotations(uri, images="/data/coco")


def test_coco_release_on_s3(s3_bucket):
    sources = []
    for split, ids in (("train", range(1, 4)), ("val", range(11, 14))):
        uri = f"{s3_bucket}/coco/annotations/captions_{split}2014.json"
        storage.write_json(uri, coco_file(ids, split))
        sources.append((uri, f"{s3_bucket}/coco/{split}2014"))
    records = by_id(read_sources(sources))
    assert records["2"] == Record(image_id="2", image=f"{s3_bucket}/coco/train2014/COCO_train2014_000000000002.jpg",
                                  captions=("image 2 caption 0", "image 2 caption 1"), split="train")
    assert records["12"].image == f"{s3_bucket}/coco/val2014/COCO_val2014_000000000012.jpg"
    assert records["12"].split == "val"


# --- the test carve --------------------------------------------------------------------------------

def test_test_carve_is_the_same_every_time_and_in_any_order(coco_release):
    once = splits_of(read_sources(coco_release, test_fraction=0.3))
    assert splits_of(read_sources(coco_release, test_fraction=0.3)) == once
    assert splits_of(read_sources(coco_release[::-1], test_fraction=0.3)) == once


def test_test_carve_of_an_image_does_not_depend_on_the_other_images(tmp_path, coco_release):
    whole = splits_of(read_sources(coco_release, test_fraction=0.3))
    every_third = range(VAL_IDS.start, VAL_IDS.stop, 3)
    fewer = write(tmp_path, "fewer/captions_val2014.json", coco_file(every_third, "val"))
    part = splits_of(read_sources([(fewer, None)], test_fraction=0.3))
    assert part == {str(i): whole[str(i)] for i in every_third}


def test_test_carve_is_pinned_across_processes_and_releases(tmp_path):
    # A feature dataset's test split must not move when capray is upgraded or Python's hash seed changes:
    # these ids were carved by SHA-256 of the id when the carve was introduced.
    uri = write(tmp_path, "captions_val2014.json", coco_file(range(1, 21), "val"))
    test_ids = sorted(int(r.image_id) for r in read_sources([(uri, None)], test_fraction=0.25) if r.split == "test")
    assert test_ids == [8, 9, 13]


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_test_carve_takes_about_the_fraction_of_val(tmp_path, fraction):
    num_val = 4000
    uri = write(tmp_path, "captions_val2014.json", coco_file(range(num_val), "val"))
    num_test = sum(r.split == "test" for r in read_sources([(uri, None)], test_fraction=fraction))
    # binomial: within 4 standard deviations
    assert abs(num_test - fraction * num_val) < 4 * math.sqrt(num_val * fraction * (1 - fraction))


def test_test_carve_grows_with_the_fraction(coco_release):
    # a larger fraction only adds images to test: a run with 0.1 tests on a subset of a run with 0.3's
    small = {i for i, s in splits_of(read_sources(coco_release, test_fraction=0.1)).items() if s == "test"}
    large = {i for i, s in splits_of(read_sources(coco_release, test_fraction=0.3)).items() if s == "test"}
    assert small < large


def test_test_carve_keeps_a_files_own_test_split(tmp_path):
    # Karpathy's file has its own test images: they stay test, its val images are carved like COCO's
    uri = write(tmp_path, "dataset_coco.json", KARPATHY)
    splits = splits_of(read_sources([(uri, None)], test_fraction=0.99))
    assert splits["14"] == splits["4"] == "test"  # already test
    assert splits["11"] == splits["12"] == "train"  # train (and restval) never carved
    assert splits["13"] == "test"  # the one val image, carved at 0.99 (its share is below 0.99)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), True])
def test_test_fraction_out_of_range(coco_release, fraction):
    with pytest.raises(AnnotationError, match="--test-fraction must be at least 0 and below 1") as info:
        read_sources(coco_release, test_fraction=fraction)
    assert isinstance(info.value, ValueError)


def test_test_fraction_without_val_images(coco_release):
    train_only = coco_release[:1]
    with pytest.raises(AnnotationError, match="no val images") as info:
        read_sources(train_only, test_fraction=0.1)
    assert train_only[0][0] in str(info.value) and "\n" not in str(info.value)
    assert splits_of(read_sources(train_only)) == {str(i): "train" for i in TRAIN_IDS}  # fine without a carve


# --- duplicates and pairing ------------------------------------------------------------------------

def test_image_in_two_splits_is_refused(tmp_path):
    train = write(tmp_path, "captions_train2014.json", coco_file(range(1, 5), "train"))
    val = write(tmp_path, "captions_val2014.json", coco_file(range(4, 8), "val"))
    with pytest.raises(AnnotationError) as info:
        read_sources([(train, None), (val, None)])
    message = str(info.value)
    assert "image id 4 " in message and train in message and val in message and "\n" not in message
    assert "(train)" in message and "(val)" in message


def test_same_file_twice_is_refused(tmp_path):
    train = write(tmp_path, "captions_train2014.json", coco_file(range(1, 5), "train"))
    with pytest.raises(AnnotationError, match="image id 1 is in .*captions_train2014.json"):
        read_sources([(train, None), (train, None)])


def test_no_sources():
    with pytest.raises(AnnotationError, match="no annotation files"):
        read_sources([])


def test_pair_sources_without_images_uses_each_files_folder():
    assert pair_sources(["a.json", "s3://b/v.json"], []) == [("a.json", None), ("s3://b/v.json", None)]


def test_pair_sources_pairs_in_order():
    assert pair_sources(["t.json", "v.json"], ["s3://b/train2014", "s3://b/val2014"]) == [
        ("t.json", "s3://b/train2014"), ("v.json", "s3://b/val2014")]


@pytest.mark.parametrize("annotations,images,message", [
    (["t.json", "v.json"], ["s3://b/train2014"], "1 --images for 2 --annotations"),
    (["t.json"], ["s3://b/train2014", "s3://b/val2014"], "2 --images for 1 --annotations"),
    ([], [], "at least one --annotations"),
    ([], ["s3://b/train2014"], "at least one --annotations"),
])
def test_pair_sources_refuses_other_counts(annotations, images, message):
    with pytest.raises(ValueError, match=message) as info:
        pair_sources(annotations, images)
    assert "\n" not in str(info.value)


def test_a_jsonl_manifest_is_read_one_line_at_a_time(tmp_path):
    """A record comes out before a bad line further down is read: the file is never parsed whole."""
    from capray.annotations import iter_manifest

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "captions": ["a red circle"]}\n\n{"image": "b.png"}\nnot json\n')
    records = iter_manifest(str(manifest))
    first = next(records)
    assert (first.image, first.captions) == (str(tmp_path / "a.png"), ("a red circle",))
    assert next(records).image == str(tmp_path / "b.png")
    with pytest.raises(AnnotationError, match="line 4"):
        next(records)
