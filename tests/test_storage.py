"""capray.storage: one layer for local folders and S3 (here moto's S3 server)."""
from __future__ import annotations

import os

import pytest

from capray import storage
from capray.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh, empty location: a local folder or a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return f"{request.getfixturevalue('s3_bucket')}/root"


def write_tree(root: str, names: list[str]) -> None:
    for name in names:
        storage.write_text(storage.join(root, name), name)


def relative(root: str, uris) -> list[str]:
    prefix = storage.normalize(root) + "/"
    uris = list(uris)
    assert all(u.startswith(prefix) for u in uris), uris
    return sorted(u[len(prefix):] for u in uris)


# --- round trips -------------------------------------------------------------------------------------

def test_bytes_round_trip(root):
    data = bytes(range(256)) * 10
    uri = storage.join(root, "deep", "er", "blob.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data


def test_text_round_trip_is_utf8(root):
    uri = storage.join(root, "t.txt")
    storage.write_text(uri, "crème brûlée — 東京\n")
    assert storage.read_text(uri) == "crème brûlée — 東京\n"
    assert storage.read_bytes(uri) == "crème brûlée — 東京\n".encode("utf-8")


def test_json_round_trip(root):
    obj = {"words": ["<pad>", "é"], "n": 3, "x": 0.5, "nested": {"ok": True, "none": None}}
    uri = storage.join(root, "obj.json")
    storage.write_json(uri, obj)
    assert storage.read_json(uri) == obj


def test_write_replaces_existing_content(root):
    uri = storage.join(root, "f.txt")
    storage.write_text(uri, "a much longer first version")
    storage.write_text(uri, "second")
    assert storage.read_text(uri) == "second"


def test_local_write_leaves_no_temporary_file(tmp_path):
    storage.write_text(str(tmp_path / "f.txt"), "x")
    assert os.listdir(tmp_path) == ["f.txt"]


def test_file_uri_is_a_local_path(tmp_path):
    storage.write_text(f"file://{tmp_path}/a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert storage.read_text(f"file://{tmp_path}/a.txt") == "hello"


# --- errors ------------------------------------------------------------------------------------------

def test_read_missing_file_is_a_one_line_storage_error(root):
    uri = storage.join(root, "missing.txt")
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value) and "\n" not in str(info.value)


def test_read_json_of_invalid_json(root):
    uri = storage.join(root, "bad.json")
    storage.write_text(uri, "{oops")
    with pytest.raises(StorageError, match="bad.json: not valid JSON"):
        storage.read_json(uri)


def test_check_bucket_of_a_missing_bucket(s3_server):
    with pytest.raises(StorageError, match="bucket 'capray-no-such-bucket' does not exist") as info:
        storage.check_bucket("s3://capray-no-such-bucket/some/prefix")
    assert "\n" not in str(info.value)


def test_check_bucket_of_an_existing_bucket_and_a_local_path(s3_bucket, tmp_path):
    storage.check_bucket(f"{s3_bucket}/not/yet/written")  # the prefix need not exist
    storage.check_bucket(str(tmp_path / "anything"))  # local: nothing to check


def test_empty_location_is_an_error():
    with pytest.raises(StorageError, match="empty location"):
        storage.resolve("")


# --- listing -----------------------------------------------------------------------------------------

TREE = ["a.jpg", "b.PNG", "notes.txt", "sub/c.jpeg", "sub/deeper/d.JPG", "sub/e.gif", "other/f.png"]


def test_list_files_is_recursive(root):
    write_tree(root, TREE)
    assert relative(root, storage.list_files(root)) == sorted(TREE)


def test_list_files_filters_extensions_case_insensitively(root):
    write_tree(root, TREE)
    found = relative(root, storage.list_files(root, extensions=("jpg", "PNG", ".jpeg")))
    assert found == ["a.jpg", "b.PNG", "other/f.png", "sub/c.jpeg", "sub/deeper/d.JPG"]


def test_list_files_of_a_sub_prefix(root):
    write_tree(root, TREE)
    assert relative(root, storage.list_files(storage.join(root, "sub"))) == \
        ["sub/c.jpeg", "sub/deeper/d.JPG", "sub/e.gif"]


def test_list_files_returns_uris_that_can_be_read(root):
    write_tree(root, TREE[:3])
    for uri in storage.list_files(root):
        assert storage.read_text(uri) == storage.basename(uri)


def test_list_files_of_a_missing_location_is_empty(root):
    assert list(storage.list_files(storage.join(root, "nothing", "here"))) == []


def test_list_files_is_a_generator(root):
    write_tree(root, TREE[:2])
    files = storage.list_files(root)
    assert iter(files) is files


@pytest.mark.parametrize("name", ["with space.jpg", "dir with space/ü.jpg", "日本/写真 1.png", "crème.JPG"])
def test_keys_with_spaces_and_non_ascii(root, name):
    uri = storage.join(root, name)
    storage.write_text(uri, "x")
    assert relative(root, storage.list_files(root, extensions=("jpg", "png"))) == [name]
    assert storage.read_text(next(storage.list_files(root))) == "x"
    assert storage.is_file(uri)


def test_hash_in_a_key_is_not_a_url_fragment(root):
    # Read as a fragment, "photo#2.jpg" would silently write over and read back "photo".
    write_tree(root, ["photo", "photo#2.jpg"])
    assert storage.read_text(storage.join(root, "photo")) == "photo"
    assert storage.read_text(storage.join(root, "photo#2.jpg")) == "photo#2.jpg"
    assert relative(root, storage.list_files(root)) == ["photo", "photo#2.jpg"]


@pytest.mark.parametrize("name", ["100%.jpg", "a%20b.jpg"])
def test_percent_in_a_key_is_literal(root, name):
    # "a%20b.jpg" is a key of its own, not "a b.jpg".
    write_tree(root, [name])
    assert relative(root, storage.list_files(root)) == [name]
    assert storage.read_text(storage.join(root, name)) == name


def test_list_dirs_gives_direct_children_only(root):
    write_tree(root, TREE)
    assert relative(root, storage.list_dirs(root)) == ["other", "sub"]
    assert relative(root, storage.list_dirs(storage.join(root, "sub"))) == ["sub/deeper"]
    assert storage.list_dirs(storage.join(root, "missing")) == []


def test_exists_is_dir_is_file(root):
    write_tree(root, ["sub/f.txt"])
    folder, file, missing = storage.join(root, "sub"), storage.join(root, "sub", "f.txt"), storage.join(root, "no")
    assert storage.exists(folder) and storage.is_dir(folder) and not storage.is_file(folder)
    assert storage.exists(file) and storage.is_file(file) and not storage.is_dir(file)
    assert not storage.exists(missing) and not storage.is_dir(missing) and not storage.is_file(missing)


def test_delete_dir_removes_everything_under_it_and_nothing_else(root):
    write_tree(root, TREE)
    storage.delete_dir(storage.join(root, "sub"))
    assert relative(root, storage.list_files(root)) == ["a.jpg", "b.PNG", "notes.txt", "other/f.png"]
    assert not storage.exists(storage.join(root, "sub"))
    storage.delete_dir(storage.join(root, "sub"))  # already gone: no error


def test_delete_file(root):
    write_tree(root, ["a.txt", "b.txt"])
    storage.delete_file(storage.join(root, "a.txt"))
    storage.delete_file(storage.join(root, "a.txt"))  # already gone: no error
    assert relative(root, storage.list_files(root)) == ["b.txt"]


def test_makedirs_makes_a_listable_local_folder(tmp_path):
    storage.makedirs(str(tmp_path / "x" / "y"))
    assert storage.is_dir(str(tmp_path / "x" / "y"))


# --- URI helpers -------------------------------------------------------------------------------------

def test_is_remote():
    assert storage.is_remote("s3://b/k")
    assert not storage.is_remote("/data/x") and not storage.is_remote("rel/x")
    assert not storage.is_remote("file:///data/x")


def test_join():
    assert storage.join("s3://b/prefix", "a", "b.jpg") == "s3://b/prefix/a/b.jpg"
    assert storage.join("s3://b/prefix/", "a") == "s3://b/prefix/a"
    assert storage.join("s3://b", "a") == "s3://b/a"
    assert storage.join("/data", "a", "b.jpg") == "/data/a/b.jpg"


def test_parent():
    assert storage.parent("s3://b/prefix/a.json") == "s3://b/prefix"
    assert storage.parent("s3://b/prefix/dir/") == "s3://b/prefix"
    assert storage.parent("s3://b/a.json") == "s3://b"
    assert storage.parent("/data/x/a.json") == "/data/x"


def test_parent_of_a_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.parent("ann/a.json") == str(tmp_path / "ann")
    assert storage.parent("a.json") == str(tmp_path)


def test_parent_of_a_file_uri_is_its_folder():
    assert storage.parent("file:///data/x/a.json") in ("/data/x", "file:///data/x")


def test_basename():
    assert storage.basename("s3://b/prefix/a.json") == "a.json"
    assert storage.basename("s3://b/prefix/dir/") == "dir"
    assert storage.basename("/data/x/a.json") == "a.json"


def test_normalize(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("s3://b/prefix/") == "s3://b/prefix"
    assert storage.normalize("s3://b/") == "s3://b"
    assert storage.normalize("/data/x/../y/") == "/data/y"
    assert storage.normalize("rel/dir") == str(tmp_path / "rel" / "dir")
    assert storage.normalize("file:///data/x") == "/data/x"
