"""Sample shards, as large image collections come: WebDataset tar files and Parquet files of image bytes.

img2dataset (LAION, CC3M/CC12M, DataComp, COYO) writes either **WebDataset shards** — ``00000.tar``
holding ``000000000.jpg``, ``000000000.txt`` (the caption), ``000000000.json`` (metadata such as the
source URL), the files of one sample next to each other — or **Parquet files** with the image bytes in
a column. A few thousand shards list and read far faster than millions of small objects.

A sample is named ``<shard URI>#<key>`` everywhere (a caption row's ``path``, a feature row's
``image``): the WebDataset sample key, or the Parquet key column (else the row's number in its file).
A problem with a whole shard (missing, not a tar, truncated, an unreadable Parquet file) is one
sample named by the shard URI itself, with the error: the samples read before it stay good.

Tars are read as a stream with the standard library's ``tarfile`` and Parquet files a batch at a
time with pyarrow, inside capray's own tasks rather than through ``ray.data.read_webdataset`` /
``read_parquet``: those fail the whole job on one truncated shard (a read task either returns every
row of its file or raises), cannot skip the samples a previous run already captioned, and their
listing task asks for a whole CPU that a small machine's captioners hold.
"""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage
from capray.errors import ConfigError, first_line

WEBDATASET, PARQUET = "webdataset", "parquet"
KINDS = {"tar": WEBDATASET, "parquet": PARQUET}
"""Shard kind by file extension."""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""A WebDataset sample's image is its first file with one of these extensions (unless told others)."""
IMAGE_COLUMNS = (*IMAGE_EXTENSIONS, "image", "img", "image_bytes")
"""Parquet columns tried, in order, for the image bytes when ``--image-column`` is not given."""
KEY_COLUMNS = ("key", "id", "image_id")
"""Parquet columns tried, in order, for a sample's key when ``--key-column`` is not given."""
CAPTION_FIELDS = ("captions", "caption", "txt", "text")
"""Where prepare finds a sample's captions: a list of strings or one string (``txt`` is a tar's .txt)."""
KEY = "key"
"""A kept column that is always there: the sample's key."""
BATCH_ROWS = 256
"""Parquet rows read at a time: a shard's images are never all in memory."""


@dataclass
class Sample:
    """One sample of a shard: its image bytes and its other fields, or why it cannot be used."""

    path: str
    """``<shard>#<key>``, or the shard URI alone for a failure of the whole shard."""
    key: str | None
    image: bytes | None
    fields: dict[str, Any] = field(default_factory=dict)
    """The tar's ``.json`` fields and ``txt``, or the Parquet row's other columns."""
    error: str | None = None
    numbered: bool = False
    """The key is the row's number in its file (a Parquet file without a key column)."""

    def value(self, name: str) -> str | None:
        """A field as text (JSON for lists and objects); ``key`` is the sample's key."""
        if name == KEY:
            return self.key
        value = self.fields.get(name)
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)


def shard_kind(uri: str) -> str | None:
    """``webdataset``, ``parquet`` or None, by the file extension."""
    name = storage.basename(uri).lower()
    return KINDS.get(name.rpartition(".")[2]) if "." in name else None


def is_pattern(uri: str) -> bool:
    """A brace pattern such as ``s3://b/shards/{00000..01023}.tar``."""
    return "{" in uri and "}" in uri


def sample_path(shard: str, key: str) -> str:
    return f"{shard}#{key}"


def shard_of(path: str) -> str:
    """The shard a sample path names (the path itself for a shard-level row or a plain file): up to the
    first ``.tar#`` or ``.parquet#``, in any case (a key may hold either; a folder name should not)."""
    lowered = path.lower()
    cuts = [(cut + len(extension) + 1) for extension in KINDS if (cut := lowered.find(f".{extension}#")) >= 0]
    return path[:min(cuts)] if cuts else path


def expand(pattern: str) -> list[str]:
    """The shard URIs of a brace pattern, in order, each once (the way webdataset expands them)."""
    from braceexpand import braceexpand

    try:
        return list(dict.fromkeys(braceexpand(pattern)))
    except Exception as exc:  # braceexpand raises plain exceptions for unbalanced braces
        raise ConfigError(f"--input {pattern}: not a brace pattern ({exc})") from None


def detect(uri: str, extensions: Sequence[str]) -> str | None:
    """What ``uri`` holds: ``webdataset``, ``parquet`` or None (loose images or a manifest).

    A brace pattern or a single file goes by its extension; a folder or prefix by the first file
    found whose extension is an image's or a shard's (a prefix holds one kind of input).
    """
    if is_pattern(uri):
        kinds = {shard_kind(u) for u in expand(uri)}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(f"--input {uri}: a pattern must name .tar or .parquet files only, of one kind")
        return kinds.pop()
    if storage.is_file(uri):
        return shard_kind(uri)
    for found in storage.list_files(uri, extensions=(*extensions, *KINDS)):
        return shard_kind(found)
    return None


def list_shards(uri: str, kind: str, *, image_extensions: Sequence[str] = ()) -> list[str]:
    """The shard URIs of a pattern, file or prefix, sorted (a pattern's may not exist: a missing
    shard becomes an error row when it is read, not a silent gap). A prefix that also holds images
    (``image_extensions``) is refused: which of the two the user meant cannot be told."""
    if is_pattern(uri):
        return [storage.normalize(u) for u in expand(uri)]
    if storage.is_file(uri):
        return [storage.normalize(uri)]
    extension = next(e for e, k in KINDS.items() if k == kind)
    found = []
    for listed in storage.list_files(uri, extensions=(extension, *image_extensions)):
        if shard_kind(listed) != kind:
            raise ConfigError(f"--input {uri} holds {kind} shards and images ({storage.basename(listed)}): give a "
                              "prefix of one kind, or a brace pattern of the shards")
        found.append(listed)
    return sorted(found)


def check_columns(shard: str, *, image_column: str = "", key_column: str = "") -> None:
    """Raise ``ValueError`` (one line) if a Parquet shard lacks the named or any known image column, or
    the named key column: a mistyped ``--image-column`` fails before the run, not as a row per file.
    A file that cannot be read is left for the run to report as an error row."""
    fs, path = storage.resolve(shard)
    try:
        with fs.open_input_file(path) as f:
            names = pq.ParquetFile(f).schema_arrow.names
    except (OSError, pa.ArrowException):
        return
    image = image_column or next((c for c in IMAGE_COLUMNS if c in names), "")
    for flag, column in (("--image-column", image), ("--key-column", key_column)):
        if (column and column not in names) or (flag == "--image-column" and not column):
            wanted = column or f"any of {', '.join(IMAGE_COLUMNS)}"
            raise ConfigError(f"{shard}: no column {wanted} for {flag} (it has {', '.join(names)})")


def iter_samples(shard: str, *, image_extensions: Sequence[str], image_column: str = "", key_column: str = "",
                 columns: Sequence[str] = (), images: bool = True) -> Iterator[Sample]:
    """The samples of one shard, in order, streamed; the last may be a failure of the whole shard.

    A transient storage failure raises ``TransientStorageError`` (the task reading the shard runs
    again); everything else wrong is a ``Sample`` with ``error`` set. ``columns``: the Parquet columns to
    read besides the image and the key (a tar's ``.json`` and ``.txt`` are always read).

    ``images=False`` reads the text only: a tar's image members are streamed past, never kept, and a
    Parquet file's image column is not read at all. Each sample then has ``image`` None and is the same
    sample (path, key, fields) as with images, except that a missing image is not noticed.
    """
    kind = shard_kind(shard)
    if kind == WEBDATASET:
        yield from _tar_samples(shard, tuple(e.lower().lstrip(".") for e in image_extensions), images=images)
    elif kind == PARQUET:
        yield from _parquet_samples(shard, image_column=image_column, key_column=key_column, columns=columns,
                                    images=images)
    else:
        raise ConfigError(f"{shard}: not a .tar or .parquet shard")


class _Counting:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read() if size is None or size < 0 else self.raw.read(size)
        self.count += len(data)
        return data


def _tar_samples(shard: str, image_extensions: tuple[str, ...], *, images: bool = True) -> Iterator[Sample]:
    fs, path = storage.resolve(shard)
    try:
        raw = fs.open_input_stream(path)
    except FileNotFoundError:
        yield Sample(shard, None, None, error="no such shard")
        return
    except OSError as exc:
        failure = storage.classified(f"cannot read {shard}", exc)
        if isinstance(failure, storage.TransientStorageError):
            raise failure from exc
        yield Sample(shard, None, None, error=str(failure))
        return
    count, seen = 0, set()
    key, members = None, {}
    with raw:
        stream = _Counting(raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # uncompressed, as WebDataset's .tar
                for member in tar:
                    if not member.isreg():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, extension = name.partition(".")  # WebDataset: the key ends at the first dot
                    if not dot or not stem:
                        continue
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key:
                        if key is not None:
                            repeat = count if key in seen else None
                            yield _tar_sample(shard, key, members, image_extensions, repeat=repeat)
                            seen.add(key)
                            count += 1
                        key, members = member_key, {}
                    extension = extension.lower()
                    if images or extension not in image_extensions:
                        members[extension] = tar.extractfile(member).read()
                    else:  # text only: the stream moves past the image's bytes; none are kept
                        members[extension] = None
                end = tar.offset
            problem = _tail_problem(stream, end)
        except (tarfile.TarError, EOFError) as exc:
            problem = str(exc) or type(exc).__name__
        except OSError as exc:
            failure = storage.classified(f"cannot read {shard}", exc)
            if isinstance(failure, storage.TransientStorageError):
                raise failure from exc
            problem = str(failure)
    if key is not None:  # the last sample: a cut may have taken its last files, so it is never trusted then
        sample = _tar_sample(shard, key, members, image_extensions, repeat=count if key in seen else None)
        if problem is not None:
            sample.error, sample.image = f"cut off: the shard ends in or right after this sample ({problem})", None
        yield sample
        count += 1
    if problem is not None:
        if count == 0:
            yield Sample(shard, None, None, error=f"not a tar file ({problem})")
        else:
            yield Sample(shard, None, None, error=f"truncated or corrupt after {count} sample(s) ({problem}): "
                                                  "whatever followed cannot be read")


def _tail_problem(stream: _Counting, end: int) -> str | None:
    """What is wrong after a tar's last member (``end``): the end-of-archive blocks missing (a cut), or
    data after them (tars joined end to end, whose later members ``tarfile`` would skip silently)."""
    nonzero = False
    while chunk := stream.read(1 << 20):
        nonzero = nonzero or chunk.count(0) != len(chunk)
    if stream.count < end + 2 * tarfile.BLOCKSIZE:
        return "no end-of-archive marker"
    return "data after the end-of-archive marker (tars joined end to end?)" if nonzero else None


def _tar_sample(shard: str, key: str, members: dict[str, bytes | None], image_extensions: tuple[str, ...], *,
                repeat: int | None) -> Sample:
    if repeat is not None:  # WebDataset keeps a sample's files together; a key seen again is another sample
        return Sample(sample_path(shard, f"{key}#{repeat}"), key, None,
                      error="the key appears twice in the shard (its files are not together)")
    path = sample_path(shard, key)
    fields: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            fields.update(meta if isinstance(meta, dict) else {"json": meta})
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return Sample(path, key, None, error=f"{key}.json is not valid JSON ({exc})")
    if "txt" in members:
        try:
            fields["txt"] = members["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            return Sample(path, key, None, error=f"{key}.txt is not UTF-8 ({exc.reason})")
    found_image = next((e for e in image_extensions if e in members), None)
    image = members[found_image] if found_image is not None else None
    if found_image is None:
        found = ", ".join(sorted(members)) or "nothing"
        return Sample(path, key, None, fields, error=f"no image ({', '.join(image_extensions)}) in the sample, "
                                                       f"only {found}")
    return Sample(path, key, image, fields)


def _parquet_samples(shard: str, *, image_column: str, key_column: str, columns: Sequence[str],
                     images: bool = True) -> Iterator[Sample]:
    fs, path = storage.resolve(shard)
    count = 0
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            image = image_column or next((c for c in IMAGE_COLUMNS if c in names), "")
            key = key_column or next((c for c in KEY_COLUMNS if c in names), "")
            missing = [c for c in (image, key_column) if c and c not in names]
            if not image or missing:
                wanted = ", ".join(missing) if missing else f"any of {', '.join(IMAGE_COLUMNS)}"
                yield Sample(shard, None, None, error=f"no column {wanted} (it has {', '.join(names)})")
                return
            read = list(dict.fromkeys(c for c in (image if images else "", key, *columns) if c and c in names))
            seen: set[str] = set()
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=read):
                rows = batch.to_pydict()
                for i in range(batch.num_rows):
                    numbered = not key or rows[key][i] is None
                    sample_key = str(count) if numbered else str(rows[key][i])
                    data = rows[image][i] if images else None
                    if isinstance(data, dict):  # a Hugging Face image struct: {"bytes": ..., "path": ...}
                        data = data.get("bytes")
                    fields = {c: rows[c][i] for c in read if c != image}
                    path = sample_path(shard, sample_key)
                    error = None if data or not images else f"no image bytes in column {image}"
                    if sample_key in seen:  # another row with this key: its own path, and an error
                        path, error = sample_path(shard, f"{sample_key}#{count}"), "the key repeats an earlier row's"
                    seen.add(sample_key)
                    yield Sample(path, sample_key, None if error else data, fields, error, numbered)
                    count += 1
    except FileNotFoundError:
        yield Sample(shard, None, None, error="no such shard")
    except OSError as exc:
        failure = storage.classified(f"cannot read {shard}", exc)
        if isinstance(failure, storage.TransientStorageError):
            raise failure from exc
        yield Sample(shard, None, None, error=f"unreadable after {count} row(s) ({failure})")
    except pa.ArrowException as exc:  # not Parquet, corrupt, or too big to read
        what = "not a Parquet file" if count == 0 else f"unreadable after {count} row(s)"
        yield Sample(shard, None, None, error=f"{what} ({first_line(exc)})")


def read_any(uri: str, *, image_extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bytes:
    """The bytes of an image object, or of a shard sample (``shard#key``: its shard is read up to it)."""
    shard = shard_of(uri)
    if shard == uri:
        return storage.read_bytes(uri)
    path = uri
    for sample in iter_samples(shard, image_extensions=image_extensions):
        if sample.path == path:
            if sample.image is None:
                raise storage.StorageError(f"{path}: {sample.error}")
            return sample.image
    raise storage.StorageError(f"{path}: no such sample in {shard}")
