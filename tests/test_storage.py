"""capray.storage: one layer for local folders and S3 (here moto's S3 server)."""
from __future__ import annotations

import logging
import os
import socket
import tracemalloc

import boto3
import pytest
from s3faults import ALWAYS, FaultPlan, faulty_s3, keys  # noqa: F401 (faulty_s3 is a fixture)

from capray import storage
from capray.storage import StorageError, TransientStorageError


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


def test_a_read_while_another_writer_replaces_the_file_gets_one_whole_version(root):
    """A lease's heartbeat rewrites its file while others read it: a read that asked for the size first
    and the bytes after (a ranged GET) could join two versions of different lengths."""
    import threading

    uri = storage.join(root, "often.json")
    versions = [b'{"beat": 1}', b'{"beat": 1.25, "padding": "' + b"x" * 300 + b'"}']
    storage.write_bytes(uri, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            storage.write_bytes(uri, versions[i % 2])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        reads = [storage.read_bytes(uri) for _ in range(200)]
    finally:
        stop.set()
        writer.join()
    assert set(reads) <= set(versions)


def test_local_write_leaves_no_temporary_file(tmp_path):
    storage.write_text(str(tmp_path / "f.txt"), "x")
    assert os.listdir(tmp_path) == ["f.txt"]


def test_local_write_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A host crash cannot be simulated here: record what os.fsync is called on, and when."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "shard.parquet"
    data = os.urandom(1 << 20)

    storage.write_bytes(str(target), data)

    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert os.path.basename(events[0][1]).startswith(".shard.parquet.tmp-")  # the file's content, before its name
    assert events[1][1] == str(target) and events[2][1] == str(tmp_path)  # then the folder's entry
    assert target.read_bytes() == data and os.listdir(tmp_path) == ["shard.parquet"]


def test_a_failed_local_write_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    storage.write_text(str(target), "old and whole")

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StorageError):
        storage.write_text(str(target), "new")
    assert target.read_text() == "old and whole" and os.listdir(tmp_path) == ["f.txt"]


def test_conditional_writes_create_once_and_swap_only_the_version_read(root):
    uri = storage.join(root, "lease.json")
    first = storage.create_new(uri, b"one")
    assert first is not None and storage.create_new(uri, b"two") is None
    assert storage.read_versioned(uri) == (b"one", first)
    second = storage.replace_if(uri, b"three", first)
    assert second is not None and second != first
    assert storage.replace_if(uri, b"four", first) is None  # a stale version loses
    assert not storage.delete_if(uri, first)
    assert storage.read_bytes(uri) == b"three"
    assert storage.delete_if(uri, second) and storage.read_versioned(uri) is None
    assert storage.replace_if(uri, b"five", second) is None  # gone: nothing to swap


def test_move_is_repeatable(root):
    source, target = storage.join(root, "a", "x.bin"), storage.join(root, "b", "x.bin")
    storage.write_bytes(source, b"payload")
    storage.move(source, target)
    storage.move(source, target)  # already done: nothing happens
    assert not storage.exists(source) and storage.read_bytes(target) == b"payload"


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


BODY = bytes(range(256)) * 16  # 4 KB: larger than S3's error document (see the storage module docstring)


def put(bucket_uri: str, key: str, data: bytes = BODY) -> str:
    boto3.client("s3").put_object(Bucket=bucket_uri.removeprefix("s3://"), Key=key, Body=data)
    return f"{bucket_uri}/{key}"


# --- streaming listings ------------------------------------------------------------------------------

LOCAL_FILES = 20_000  # a listing held in memory costs ~2 MB at this size (~90 bytes a path)


def test_s3_listing_asks_for_one_page_at_a_time(s3_bucket, request):
    # More objects than any client puts in one page (S3's maximum is 1,000), so that a listing held
    # whole, even one that ignores page_size, needs a second request before its first item.
    names = [f"root/k{i:04d}.jpg" for i in range(storage.LIST_PAGE_SIZE + 50)]
    client, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")
    for key in [*names, "root/folder-marker/"]:  # straight to moto, not through the proxy
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    faulty_s3 = request.getfixturevalue("faulty_s3")
    files = storage.list_files(f"{s3_bucket}/root")
    first = next(files)
    assert faulty_s3.counts.get("list") == 1
    rest = list(files)
    assert faulty_s3.counts.get("list") == 2
    assert sorted([first, *rest]) == [f"{s3_bucket}/{name}" for name in names]


def test_s3_listing_pages_are_page_size_keys(s3_bucket, faulty_s3):
    for i in range(25):
        put(s3_bucket, f"root/k{i:02d}.jpg", b"x")
    faulty_s3.reset_counts()
    assert len(list(storage.list_files(f"{s3_bucket}/root", page_size=10))) == 25
    assert faulty_s3.counts.get("list") == 3


@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> str:
    """A local folder of LOCAL_FILES empty files in two subfolders."""
    root = tmp_path_factory.mktemp("many")
    for sub in ("a", "b/c"):
        (root / sub).mkdir(parents=True)
        for i in range(LOCAL_FILES // 2):
            (root / sub / f"img-{i:06d}.jpg").touch()
    return str(root)


def test_local_listing_holds_one_entry_at_a_time(many_files):
    tracemalloc.start()
    try:
        listed = sum(1 for _ in storage.list_files(many_files, extensions=("jpg",)))
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        held = list(storage.list_files(many_files))
        materialised = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert listed == len(held) == LOCAL_FILES
    assert materialised > 1_000_000, materialised  # what a listing held as a list costs
    assert streamed < materialised / 20, (streamed, materialised)


def test_a_long_listing_logs_its_progress(tmp_path, caplog, monkeypatch):
    write_tree(str(tmp_path), ["a.jpg", "b.jpg", "sub/c.txt"])
    monkeypatch.setattr(storage, "LIST_PROGRESS_S", 0.0)  # every listing is "long"
    with caplog.at_level(logging.INFO, logger="capray.storage"):
        assert len(list(storage.list_files(str(tmp_path), extensions=("jpg",)))) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert f"listing {tmp_path}: 3 objects listed so far, 2 kept" in lines[-2], lines
    assert f"listing {tmp_path}: done, 3 objects listed, 2 kept" in lines[-1], lines
    assert "objects/s" in lines[-1]


def test_a_short_listing_logs_nothing(tmp_path, caplog):
    write_tree(str(tmp_path), ["a.jpg", "b.jpg"])
    with caplog.at_level(logging.INFO, logger="capray.storage"):
        assert len(list(storage.list_files(str(tmp_path)))) == 2
    assert not caplog.records


def test_a_symlink_loop_is_listed_once(tmp_path):
    write_tree(str(tmp_path), ["a.jpg", "sub/b.jpg"])
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    assert relative(str(tmp_path), storage.list_files(str(tmp_path))) == ["a.jpg", "sub/b.jpg"]


def test_listing_a_local_file_is_a_storage_error(tmp_path):
    write_tree(str(tmp_path), ["a.jpg"])
    with pytest.raises(StorageError, match="not a folder"):
        list(storage.list_files(str(tmp_path / "a.jpg")))


# --- transient and permanent failures (a proxy that throttles like S3) ---------------------------------

def test_a_throttled_read_is_retried_by_the_client(s3_bucket, faulty_s3):
    uri = put(s3_bucket, "img/a.jpg")
    faulty_s3.configure(FaultPlan(get_keys=keys({"img/a.jpg"}), get_failures=3))
    faulty_s3.reset_counts()
    assert storage.read_bytes(uri) == BODY
    assert faulty_s3.counts["injected"] == 3 and faulty_s3.counts["get"] == 4


def test_a_read_throttled_past_the_attempts_is_transient(s3_bucket, faulty_s3, monkeypatch):
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)  # not 10 (a minute of backoff), nor pyarrow's default 3
    uri = put(s3_bucket, "img/a.jpg")
    faulty_s3.configure(FaultPlan(get_keys=keys({"img/a.jpg"}), get_failures=ALWAYS))
    faulty_s3.reset_counts()
    with pytest.raises(TransientStorageError) as info:
        storage.read_bytes(uri)
    assert faulty_s3.counts["get"] == 2  # the configured attempts, all made by the S3 client
    assert not isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert uri in str(info.value) and "\n" not in str(info.value)
    faulty_s3.heal()  # the store recovers: the same call succeeds
    assert storage.read_bytes(uri) == BODY


def test_a_missing_key_is_permanent(s3_bucket, faulty_s3):
    with pytest.raises(StorageError, match="no such file") as info:
        storage.read_bytes(f"{s3_bucket}/img/missing.jpg")
    assert not isinstance(info.value, TransientStorageError)
    assert faulty_s3.counts.get("injected", 0) == 0


def test_a_throttled_listing_is_retried_by_the_client(s3_bucket, faulty_s3):
    uris = [put(s3_bucket, f"img/{i}.jpg") for i in range(3)]
    faulty_s3.configure(FaultPlan(list_failures=2))
    faulty_s3.reset_counts()
    assert sorted(storage.list_files(f"{s3_bucket}/img")) == uris
    assert faulty_s3.counts["list"] == 3 and faulty_s3.counts["injected"] == 2


def test_a_listing_throttled_past_the_attempts_is_transient(s3_bucket, faulty_s3, monkeypatch):
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    put(s3_bucket, "img/a.jpg")
    faulty_s3.configure(FaultPlan(list_failures=ALWAYS))
    faulty_s3.reset_counts()
    with pytest.raises(TransientStorageError, match="SlowDown"):
        list(storage.list_files(f"{s3_bucket}/img"))
    assert faulty_s3.counts["list"] == 2


def test_an_unreachable_store_is_transient(s3_bucket, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    uri = f"{s3_bucket}/img/a.jpg"
    for call in (storage.exists, storage.read_bytes, lambda u: list(storage.list_files(u))):
        with pytest.raises(TransientStorageError):
            call(uri)


def test_switching_endpoints_switches_clients(s3_bucket, request):
    uri = storage.join(s3_bucket, "a.txt")
    storage.write_text(uri, "hello")  # straight to moto, caching that bucket's filesystem
    proxy = request.getfixturevalue("faulty_s3")
    assert storage.read_text(uri) == "hello"
    assert proxy.counts["get"] == 1


def test_every_request_passes_through_the_proxy_unchanged(s3_bucket, faulty_s3):
    big = os.urandom(12 << 20)  # a multipart upload in chunked requests with checksum trailers
    storage.write_bytes(storage.join(s3_bucket, "big.bin"), big)
    storage.write_text(storage.join(s3_bucket, "sub/small.txt"), "small")
    assert storage.read_bytes(storage.join(s3_bucket, "big.bin")) == big
    assert storage.is_file(storage.join(s3_bucket, "sub/small.txt"))  # HEAD
    assert relative(s3_bucket, storage.list_files(s3_bucket)) == ["big.bin", "sub/small.txt"]
    counts = faulty_s3.counts
    assert counts["put"] and counts["get"] and counts["head"] and counts["list"], counts
    assert "injected" not in counts


def test_only_s3_and_local_locations():
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/key")


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


def test_aws_max_attempts_sets_the_attempts_of_both_clients(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert storage.max_attempts() == 3
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert storage.max_attempts() == storage.S3_MAX_ATTEMPTS
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(storage.StorageError, match="AWS_MAX_ATTEMPTS"):
        storage.max_attempts()
