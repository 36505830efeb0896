"""One storage layer for every location: local paths and ``s3://`` URIs look the same.

Reads, writes and metadata go through pyarrow's filesystems; S3 listings go through boto3's
ListObjectsV2 paginator, page by page, and local listings through ``os.scandir``, so a prefix of
millions of objects is never held in memory. S3 is configured the AWS way only
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, keys, ``AWS_DEFAULT_REGION``/``AWS_REGION``,
instance profiles), as ``FileSystem.from_uri`` reads it, so the same URIs work here, in Ray Data
and in Ray Train's ``storage_path``.

Errors, the rule: an ``OSError`` or S3 error out of this module is one of two kinds.

- ``TransientStorageError`` (an ``OSError``, not a ``ValueError``): what running the same command
  again can fix. Throttling (503 SlowDown, 429), 5xx answers, timeouts, refused or reset
  connections, after the S3 clients' own retries (``S3_MAX_ATTEMPTS``, or ``AWS_MAX_ATTEMPTS``) have given up.
- ``StorageError`` (a ``capray.errors.ConfigError``: the command line exits 2, "fix it"): everything else. A
  missing object or file ("no such file"), a missing bucket, access denied, bad credentials, a local
  path that is not a folder, invalid JSON.

Retries happen inside the S3 clients (both SDKs' "standard" mode: exponential backoff with jitter),
never in loops here. One gap, in the AWS C++ SDK under pyarrow: a GET of a range shorter than S3's
XML error document (~250 bytes: a tiny object, or the last bytes of one) answered with an error
overflows the SDK's preallocated buffer, surfaces as ``INTERNAL_FAILURE ... Failed to flush response
stream`` and is not retried; it is classed transient.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import posixpath
import re
import stat
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.fs as pafs

from capray.errors import ConfigError, first_line

log = logging.getLogger(__name__)

S3_MAX_ATTEMPTS = 10
"""Attempts per S3 request, pyarrow and boto3 alike, before an error reaches the caller. Both SDKs'
"standard" mode wait a random time of up to 1, 2, 4, ... s (at most 20 s) before each retry, so 10
attempts ride out about a minute of throttling (measured here: a GET answered 503 every time gives
up after 77 s), while a store that stays down still ends a run in minutes, not hours."""
LIST_PAGE_SIZE = 1000  # keys per ListObjectsV2 request: S3's maximum, so 1M objects are 1,000 requests
LIST_PROGRESS_S = 5.0  # a listing that runs longer than this logs its progress this often (seconds)

TRANSIENT_AWS_ERRORS = frozenset({
    "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "NETWORK_CONNECTION",
    "REQUEST_TIMEOUT"})
"""Error types in pyarrow's S3 messages ("AWS Error SLOW_DOWN during GetObject operation: ...")
that another attempt can fix."""
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "BandwidthLimitExceeded", "PriorRequestNotComplete"})
"""S3 error codes (boto3's ``ClientError``) that another attempt can fix; any 5xx or 429 is too."""
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ESTALE})
"""Local (network filesystem) errors that another attempt can fix."""
_AWS_ERROR = re.compile(r"AWS Error (\w+|\[code \d+\])(?: \(HTTP status (\d+)\))?")


class StorageError(ConfigError):
    """A location that cannot be used as it is (missing bucket or file, access denied, invalid JSON):
    running the same command again will not help."""


class TransientStorageError(OSError):
    """The store failed for now (throttled, unreachable, 5xx) even after the client's retries:
    running the same command again can succeed."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the filesystem-relative path of ``uri``."""
    if not uri:
        raise StorageError("empty location")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    bucket, key = _bucket_and_key(uri)
    return _remote_filesystem(bucket, _s3_endpoint(), max_attempts()), f"{bucket}/{key}" if key else bucket


def _bucket_and_key(uri: str) -> tuple[str, str]:
    """(bucket, key without trailing slashes) of an ``s3://`` URI.

    Keys are taken as they are (spaces, '#', '%', non-ASCII), never parsed as URL syntax.
    """
    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    if scheme != "s3":
        raise StorageError(f"{uri}: unsupported scheme {scheme}:// (locations are local paths or s3:// URIs)")
    return bucket, key.rstrip("/")


def max_attempts() -> int:
    """Attempts per S3 request: ``AWS_MAX_ATTEMPTS`` (the AWS SDKs' own variable) or ``S3_MAX_ATTEMPTS``."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    try:
        attempts = int(value) if value else S3_MAX_ATTEMPTS
    except ValueError:
        raise StorageError(f"AWS_MAX_ATTEMPTS must be a whole number, got {value!r}") from None
    if attempts < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS must be at least 1, got {attempts}")
    return attempts


def _s3_endpoint() -> str:
    """The endpoint the AWS variables name (the S3-specific one first, as pyarrow and boto3 read them)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


@functools.lru_cache(maxsize=64)
def _remote_filesystem(bucket: str, endpoint: str, max_attempts: int) -> pafs.S3FileSystem:
    """One S3 filesystem per bucket, endpoint and attempt count: ``FileSystem.from_uri``'s, plus retries.

    ``from_uri`` takes no retry strategy, and the bare constructor reads no endpoint variable, so this
    does what ``from_uri`` does (pyarrow 26): the endpoint from the variables; without one, the
    bucket's region resolved by a request to AWS; keys, session token, region and instance profiles
    from the SDK's default chains. The endpoint is part of the cache key: changing
    ``AWS_ENDPOINT_URL`` gives a new filesystem. An S3FileSystem's pickled form (pyarrow 26) carries no
    retry strategy: resolve URIs in the process that uses them rather than shipping filesystems.
    """
    retries = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
    try:
        if endpoint:
            return pafs.S3FileSystem(endpoint_override=endpoint, retry_strategy=retries)
        return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket), retry_strategy=retries)
    except OSError as exc:
        raise classified(f"cannot open s3://{bucket}", exc) from exc


def _s3_client():
    """A boto3 S3 client with the same retries and region as the pyarrow filesystems.

    boto3 finds keys and instance profiles itself. The endpoint is passed (the one the filesystems
    use, not one from ~/.aws/config that pyarrow would not see), and so is the region, in pyarrow's
    order (``AWS_DEFAULT_REGION`` first, measured): boto3 alone ignores ``AWS_REGION``.
    """
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
    return _cached_s3_client(_s3_endpoint(), region, max_attempts())


@functools.lru_cache(maxsize=8)
def _cached_s3_client(endpoint: str, region: str | None, attempts: int):
    """One client per endpoint, region and attempt count, shared by threads (boto3's clients are
    thread-safe): creating one takes ~80 ms, and every object read goes through one."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": attempts},  # first call included
                    max_pool_connections=READ_AHEAD)
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, region_name=region, config=config)


def normalize(uri: str) -> str:
    """A canonical form: absolute local paths, ``s3://bucket/key`` without trailing slashes."""
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.strip('/')}"
    return resolve(uri)[1]


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def parent(uri: str) -> str:
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(resolve(uri)[1])


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The user-facing URI of a filesystem path returned by a listing (``bucket/key`` for S3)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return _info(fs, path, uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return _info(fs, path, uri).type == pafs.FileType.File


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise classified(f"cannot create {uri}", exc) from exc


def read_bytes(uri: str) -> bytes:
    """The whole file. On S3 that is one GET without a range (``read_versioned``): one version of the
    object even while another writer replaces it (a lease's heartbeat), and one request however large
    it is, where pyarrow's input stream asks for a chunk per GET (hundreds for a model checkpoint)."""
    found = read_versioned(uri)
    if found is None:
        raise StorageError(f"{uri}: no such file")
    return found[0]


READ_AHEAD = 16
"""Object reads in flight in ``read_many``: S3 GETs wait on the network, not on the CPU."""


def read_many(uris: Sequence[str], *, ahead: int = READ_AHEAD) -> Iterator[bytes | StorageError |
                                                                         TransientStorageError]:
    """The objects' bytes in order, ``ahead`` reads in flight; a read that fails yields its exception.

    prepare's and caption's decode tasks read through this: the reads overlap, decoding stays on the
    caller's one thread (a task is sized for one CPU, and a few huge images decoded at once could
    take gigabytes).
    """
    def read(uri: str) -> bytes | StorageError | TransientStorageError:
        try:
            return read_bytes(uri)
        except (StorageError, TransientStorageError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending = deque(pool.submit(read, uri) for uri in uris[:ahead])
        for uri in uris[ahead:]:
            yield pending.popleft().result()
            pending.append(pool.submit(read, uri))
        while pending:
            yield pending.popleft().result()


def iter_lines(uri: str) -> Iterator[str]:
    """The lines of a UTF-8 text file, read as a stream: a manifest of millions of lines is never whole
    in memory."""
    import io

    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
            yield from text
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise StorageError(f"{uri}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise classified(f"cannot read {uri}", exc) from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that it appears whole or not at all, and stays whole after a crash.

    An S3 object appears when its upload completes. A local file is written under a hidden temporary
    name, ``.NAME.tmp-<8 hex digits>`` (which dataset readers skip, like every dot file), flushed to
    the disk (fsync), renamed, and the folder's entry is flushed too: without the two fsyncs a host
    crash can leave the new name pointing at a truncated file.
    """
    fs, path = resolve(uri)
    if is_remote(uri):
        try:
            fs.create_dir(posixpath.dirname(path), recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as exc:
            raise classified(f"cannot write {uri}", exc) from exc
        return
    try:
        _write_local_durably(path, data, lambda temporary: os.replace(temporary, path))
    except OSError as exc:
        raise classified(f"cannot write {uri}", exc) from exc


def _write_local_durably(path: str, data: bytes, publish) -> None:
    """``data`` into a hidden temporary file beside ``path``, fsynced; ``publish(temporary)`` gives it its
    name (a rename or a link); then the folder is fsynced. The temporary file never outlives the call."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(temporary)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename, a new link) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- conditional writes: a small file that one writer at a time may create, replace or delete ----------
# S3 has them natively (PUT with If-None-Match: * or If-Match: <ETag>, DELETE with If-Match). A local
# file's version is (inode, mtime, size); a replace or delete compares it under an exclusive flock on
# a hidden ``.NAME.lock`` beside the file (never deleted), and a create hard-links a complete
# temporary file to the name, which fails if the name exists. capray.lease builds on these.

def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """The content of a file and its version (the S3 ETag), or None if it does not exist."""
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_and_key(uri)
        try:
            answer = _s3_client().get_object(Bucket=bucket, Key=key)
            return answer["Body"].read(), answer["ETag"]
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _classified_boto(f"cannot read {uri}", exc) from exc
    path = resolve(uri)[1]
    try:
        with open(path, "rb") as f:
            return f.read(), _local_version(os.fstat(f.fileno()))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise classified(f"cannot read {uri}", exc) from exc


def create_new(uri: str, data: bytes) -> str | None:
    """Create ``uri`` with ``data`` if it does not exist, atomically; its version, or None if it existed."""
    if is_remote(uri):
        return _put_if(uri, data, IfNoneMatch="*")
    path = resolve(uri)[1]
    try:
        _write_local_durably(path, data, lambda temporary: os.link(temporary, path))
        return _local_version(os.stat(path))
    except FileExistsError:
        return None
    except OSError as exc:
        raise classified(f"cannot write {uri}", exc) from exc


def replace_if(uri: str, data: bytes, version: str) -> str | None:
    """Replace ``uri`` with ``data`` only if its version is still ``version``; the new version, or None
    if the file changed or went away meanwhile."""
    if is_remote(uri):
        return _put_if(uri, data, IfMatch=version)
    path = resolve(uri)[1]
    try:
        with _local_lock(path):
            if _current_local_version(path) != version:
                return None
            _write_local_durably(path, data, lambda temporary: os.replace(temporary, path))
            return _local_version(os.stat(path))
    except OSError as exc:
        raise classified(f"cannot write {uri}", exc) from exc


def delete_if(uri: str, version: str) -> bool:
    """Delete ``uri`` only if its version is still ``version``; whether it did."""
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_and_key(uri)
        try:
            _s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
            return True
        except (BotoCoreError, ClientError) as exc:
            if isinstance(exc, ClientError) and _lost_condition(exc):
                return False
            raise _classified_boto(f"cannot delete {uri}", exc) from exc
    path = resolve(uri)[1]
    try:
        with _local_lock(path):
            if _current_local_version(path) != version:
                return False
            os.unlink(path)
        _fsync_dir(os.path.dirname(path))
        return True
    except OSError as exc:
        raise classified(f"cannot delete {uri}", exc) from exc


def _put_if(uri: str, data: bytes, **condition: str) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_and_key(uri)
    try:
        return _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except (BotoCoreError, ClientError) as exc:
        if isinstance(exc, ClientError) and _lost_condition(exc):
            return None
        raise _classified_boto(f"cannot write {uri}", exc) from exc


def _lost_condition(exc) -> bool:
    """412 (the condition failed), 409 (another conditional write to the key was in flight) or 404
    (If-Match on a key that is gone): another writer won."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status in (404, 409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


def _local_version(info: os.stat_result) -> str:
    return f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}"


def _current_local_version(path: str) -> str | None:
    try:
        return _local_version(os.stat(path))
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive flock on ``.NAME.lock`` beside ``path``, held for the ``with`` block."""
    import fcntl

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f".{os.path.basename(path)}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri}: not valid JSON ({exc})") from exc


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def list_files(uri: str, *, extensions: tuple[str, ...] | None = None,
               page_size: int = LIST_PAGE_SIZE) -> Iterator[str]:
    """URIs of the files under ``uri`` (recursive, in no set order), optionally kept by extension
    (no dot needed, any case); a location that does not exist lists nothing.

    A generator that never holds the listing: S3 is read one ListObjectsV2 page of ``page_size``
    keys at a time (a key ending in "/" is a folder marker, not a file), a local folder one directory
    entry at a time (symbolic links followed). A listing that runs long logs its progress every
    ``LIST_PROGRESS_S`` seconds.
    """
    if not 1 <= page_size <= LIST_PAGE_SIZE:
        raise ValueError(f"page_size must be 1..{LIST_PAGE_SIZE}, got {page_size}")
    wanted = tuple(f".{e.lower().lstrip('.')}" for e in extensions) if extensions else None
    found = _list_s3(uri, page_size) if is_remote(uri) else _list_local(resolve(uri)[1])
    listed = kept = 0
    started = reported = time.monotonic()
    for file_uri in found:
        listed += 1
        if wanted is None or file_uri.lower().endswith(wanted):
            kept += 1
            yield file_uri
        now = time.monotonic()
        if now - reported >= LIST_PROGRESS_S:
            reported = now
            log.info("listing %s: %d objects listed so far, %d kept (%.0f objects/s)",
                     uri, listed, kept, listed / max(now - started, 1e-9))
    if reported > started:
        elapsed = time.monotonic() - started
        log.info("listing %s: done, %d objects listed, %d kept, in %.1f s (%.0f objects/s)",
                 uri, listed, kept, elapsed, listed / max(elapsed, 1e-9))


def _list_s3(uri: str, page_size: int) -> Iterator[str]:
    """Object URIs under an S3 prefix, one ListObjectsV2 request per page, retried by the client."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_and_key(uri)
    pages = iter(_s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{key}/" if key else "", PaginationConfig={"PageSize": page_size}))
    while True:
        try:
            page = next(pages)
        except StopIteration:
            return
        except (BotoCoreError, ClientError) as exc:
            raise _classified_boto(f"cannot list {uri}", exc) from exc
        for item in page.get("Contents", ()):
            if not item["Key"].endswith("/"):
                yield f"s3://{bucket}/{item['Key']}"


def _list_local(root: str) -> Iterator[str]:
    """Paths of the files under the folder ``root``, depth first, following symbolic links as pyarrow's
    listing did; a link back to a folder above it is not followed (it would never end)."""
    try:
        top = os.stat(root)
    except FileNotFoundError:
        return  # nothing under a folder that does not exist (pyarrow's allow_not_found)
    except OSError as exc:
        raise classified(f"cannot list {root}", exc) from exc
    if not stat.S_ISDIR(top.st_mode):
        raise StorageError(f"{root}: not a folder")
    pending = [(root, frozenset({(top.st_dev, top.st_ino)}))]  # folders to list, with their ancestors
    while pending:
        folder, above = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        yield entry.path
                    elif entry.is_dir():
                        try:
                            info = entry.stat()
                        except FileNotFoundError:
                            continue  # deleted since the folder was read
                        if (info.st_dev, info.st_ino) in above:
                            log.warning("listing %s: not following %s, a link to a folder above it", root, entry.path)
                        else:
                            pending.append((entry.path, above | {(info.st_dev, info.st_ino)}))
        except FileNotFoundError:
            continue  # deleted since its parent was read: its files are gone too
        except OSError as exc:
            raise classified(f"cannot list {folder}", exc) from exc


def list_dirs(uri: str) -> list[str]:
    """URIs of the folders directly under ``uri`` (none if it does not exist)."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError as exc:
        raise classified(f"cannot list {uri}", exc) from exc
    return sorted(to_uri(fs, i.path) for i in infos if i.type == pafs.FileType.Directory)


def move(source: str, target: str) -> None:
    """Move a file within one store (S3: a server-side copy, then a delete). A move that was already
    done (``source`` gone, ``target`` there) does nothing, so an interrupted series of moves can be repeated."""
    fs, path = resolve(source)
    _, target_path = resolve(target)
    if _info(fs, path, source).type != pafs.FileType.File and exists(target):
        return
    try:
        if is_remote(source):
            fs.move(path, target_path)
        else:
            os.makedirs(os.path.dirname(target_path), exist_ok=True)
            os.replace(path, target_path)
            _fsync_dir(os.path.dirname(target_path))
    except FileNotFoundError as exc:
        raise StorageError(f"{source}: no such file") from exc
    except OSError as exc:
        raise classified(f"cannot move {source} to {target}", exc) from exc


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if _info(fs, path, uri).type == pafs.FileType.Directory:
        try:
            fs.delete_dir(path)
        except OSError as exc:
            raise classified(f"cannot delete {uri}", exc) from exc


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    if _info(fs, path, uri).type == pafs.FileType.File:
        try:
            fs.delete_file(path)
        except OSError as exc:
            raise classified(f"cannot delete {uri}", exc) from exc


def check_bucket(uri: str) -> None:
    """Raise ``StorageError`` in one line if an S3 bucket behind ``uri`` does not exist."""
    if not is_remote(uri):
        return
    fs, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    if _info(fs, bucket, uri).type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist or is not reachable")


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise classified(f"cannot access {uri}", exc) from exc


def classified(what: str, exc: OSError) -> StorageError | TransientStorageError:
    """The error to raise for an ``OSError`` from pyarrow or the OS, by the rule in the module docstring."""
    match = _AWS_ERROR.search(str(exc))
    if match:  # pyarrow's S3 errors carry the AWS SDK's error type (and, if unknown, the HTTP status)
        status = int(match.group(2) or 0)
        transient = match.group(1) in TRANSIENT_AWS_ERRORS or status >= 500 or status == 429
    else:
        transient = exc.errno in TRANSIENT_ERRNOS or isinstance(exc, (ConnectionError, TimeoutError))
    return _error(what, exc, transient=transient)


def _classified_boto(what: str, exc: Exception) -> StorageError | TransientStorageError:
    """The error to raise for an exception out of boto3, by the rule in the module docstring."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, SSLError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        transient = code in TRANSIENT_S3_CODES or status >= 500 or status == 429
    else:  # timeouts, resets, refused connections; a certificate problem will not go away by itself
        transient = isinstance(exc, (HTTPClientError, BotoConnectionError, IncompleteReadError)) and \
            not isinstance(exc, SSLError)
    return _error(what, exc, transient=transient)


def _error(what: str, exc: BaseException, *, transient: bool) -> StorageError | TransientStorageError:
    if transient:
        return TransientStorageError(f"{what}: {first_line(exc)} (transient: running it again may succeed)")
    return StorageError(f"{what}: {first_line(exc)}")
