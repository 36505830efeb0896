"""One storage layer for every location: local paths and ``s3://`` URIs look the same.

Everything goes through pyarrow's filesystems. ``FileSystem.from_uri`` honours the AWS way of
configuring S3 (``AWS_ENDPOINT_URL``, keys, region, instance profiles), so the same URIs work here,
in Ray Data and in Ray Train's ``storage_path``.
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs


class StorageError(ValueError):
    """A location that cannot be used (missing bucket, unreadable file, ...)."""


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
    # The filesystem comes from scheme://bucket only: keys are taken as they are (spaces, '#', '%',
    # non-ASCII), never parsed as URL syntax.
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return _remote_filesystem(scheme, bucket, endpoint), rest.rstrip("/") if rest != bucket else bucket


@functools.lru_cache(maxsize=64)
def _remote_filesystem(scheme: str, bucket: str, endpoint: str) -> pafs.FileSystem:
    """One filesystem object per bucket (and endpoint), as ``FileSystem.from_uri`` configures it."""
    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with long messages
        raise StorageError(f"cannot open {scheme}://{bucket}: {_first_line(exc)}") from exc


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
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {_first_line(exc)}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that it appears whole or not at all.

    An S3 object appears when its upload completes. A local file is written under a hidden temporary
    name, ``.NAME.tmp-<8 hex digits>`` (which dataset readers skip, like every dot file), and renamed.
    """
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), recursive=True)
    target = path if is_remote(uri) else os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(target) as f:
        f.write(data)
    if target != path:
        os.replace(target, path)


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


def list_files(uri: str, *, extensions: tuple[str, ...] | None = None) -> Iterator[str]:
    """URIs of the files under ``uri`` (recursive), optionally kept by extension (lower-case, no dot).

    A generator: a prefix of millions of objects is listed page by page, not held in memory.
    """
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    wanted = tuple(f".{e.lower().lstrip('.')}" for e in extensions) if extensions else None
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if wanted and not info.path.lower().endswith(wanted):
            continue
        yield to_uri(fs, info.path)


def list_dirs(uri: str) -> list[str]:
    """URIs of the folders directly under ``uri`` (none if it does not exist)."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    return sorted(to_uri(fs, i.path) for i in fs.get_file_info(selector) if i.type == pafs.FileType.Directory)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if _info(fs, path, uri).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    if _info(fs, path, uri).type == pafs.FileType.File:
        fs.delete_file(path)


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
        raise StorageError(f"cannot access {uri}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
