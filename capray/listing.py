"""What a caption run has to do: the input listed into Parquet listing shards, minus what the output holds.

The driver streams the input's paths (a prefix, a manifest or one image) into ``OUT/_listing/<run>/``
shards, one decode task per row group, and leaves out every path already in a caption shard of OUT.
Those are read as 16-byte digests of the ``path`` column, so millions of done paths cost tens of MB
(collisions: ~n²/2¹²⁹), and the driver never holds more than one listing shard's worth of paths.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capray import storage
from capray.errors import ConfigError, first_line
from capray.formats import ERROR, PATH
from capray.shards import shard_of
from capray.sink import (COMPATIBLE_DEFAULTS, COMPATIBLE_KEYS, META_PREFIX, delete_temporaries, shard_metadata,
                         shard_uris, write_parquet)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".jsonl", ".json")
SHARDS_DIR = "_shards"
"""``OUT/_shards/``: one marker per input shard read whole (see ``complete_shards``)."""
LISTING_DIR = "_listing"
"""``OUT/_listing/<run id>/``: the paths a run has to caption, deleted when the run ends."""
LISTING_ROWS = 65_536
"""Paths per listing shard: the driver never holds more than one shard's worth of the listing."""


def input_kind(uri: str) -> str:
    """``manifest``, ``image`` (a single file) or ``prefix``; raises ``ValueError`` if there is nothing."""
    if storage.is_file(uri):
        if uri.lower().endswith(MANIFEST_SUFFIXES):
            return "manifest"
        return "image"
    if storage.is_dir(uri):
        return "prefix"
    raise ConfigError(f"--input {uri}: no such folder, prefix or file")


def input_paths(uri: str, kind: str, extensions: tuple[str, ...]) -> Iterator[str]:
    """URIs of the images to caption, each once."""
    if kind == "prefix":
        yield from storage.list_files(uri, extensions=extensions)
    elif kind == "image":
        yield storage.normalize(uri)
    elif uri.lower().endswith(".jsonl"):  # a manifest lists its images explicitly: no extension filter
        from capray.annotations import iter_manifest

        yield from (storage.normalize(r.image) for r in iter_manifest(uri))  # streamed, line by line
    else:  # COCO / Karpathy JSON: one document, parsed whole
        from capray.annotations import read_annotations

        yield from (storage.normalize(r.image) for r in read_annotations(uri))


def digests_of(paths: Iterable[str]) -> np.ndarray:
    """16-byte digests of paths: millions of them fit in tens of MB (collisions: ~n²/2¹²⁹)."""
    return np.array([hashlib.blake2b(p.encode(), digest_size=16).digest() for p in paths], dtype="S16")


def digests_bytes(digests: np.ndarray) -> bytes:
    """Sorted digests as a ``.npy`` file's bytes, for the tasks that skip done samples (``load_digests``)."""
    buffer = io.BytesIO()
    np.save(buffer, np.sort(digests), allow_pickle=False)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def load_digests(uri: str) -> np.ndarray:
    """A run's sorted done digests (``digests_bytes``), read once per worker process."""
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def finished_paths(output: str, settings: dict, *, retry_errors: bool = False,
                   count_in: Collection[str] = frozenset()) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Sorted digests of every path already in ``output``, the shards that hold error rows, and the
    digests of those paths that belong to each of the input shards ``count_in`` (``capray.shards``:
    their samples are not listed up front, so this is what a sharded run has already done).

    With ``retry_errors`` the paths of error rows do not count as done. Removes the temporary files a
    killed run may have left (a shard itself only ever appears whole): the caller holds the output's
    lease, so no live run is writing them. A shard that cannot be read is
    never deleted: a transient failure raises ``TransientStorageError`` (run again), anything else a
    ``ValueError``. Also raises ``ValueError`` if the shards were made with another checkpoint or settings.
    """
    if not storage.exists(output):
        return np.empty(0, dtype="S16"), [], {}
    delete_temporaries(output)

    def digests(uri: str) -> tuple[np.ndarray, bool, dict[str, np.ndarray]]:
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                metadata = parquet.schema_arrow.metadata or {}
                table = parquet.read(columns=[PATH, ERROR])
        except pa.ArrowInvalid as exc:
            raise ConfigError(f"--out {output} holds {storage.basename(uri)}, which is not a caption shard "
                              f"({first_line(exc)}): move it away or use --overwrite") from exc
        except OSError as exc:
            raise storage.TransientStorageError(f"cannot read {uri}: {first_line(exc)}") from exc
        check_compatible(uri, metadata, settings)
        failed = table.column(ERROR).is_valid().to_numpy(zero_copy_only=False)
        paths = table.column(PATH).to_pylist()
        if retry_errors:
            paths = [p for p, f in zip(paths, failed) if not f]
        hashed = digests_of(paths)
        by_shard: dict[str, list[int]] = defaultdict(list)
        for i, shard in enumerate(map(shard_of, paths) if count_in else ()):
            if shard in count_in:
                by_shard[shard].append(i)
        return hashed, bool(failed.any()), {s: hashed[rows] for s, rows in by_shard.items()}

    uris = shard_uris(output)
    with ThreadPoolExecutor(max_workers=8) as pool:  # shards are read one request each: overlap them
        parts = list(pool.map(digests, uris))
    done = np.concatenate([d for d, _, _ in parts]) if parts else np.empty(0, dtype="S16")
    done.sort()
    with_errors = [uri for uri, (_, failed, _) in zip(uris, parts) if failed] if retry_errors else []
    in_shards: dict[str, list[np.ndarray]] = defaultdict(list)
    for _, _, part in parts:
        for shard, digests in part.items():
            in_shards[shard].append(digests)
    return done, with_errors, {s: np.concatenate(d) for s, d in in_shards.items()}


def marker_uri(output: str, shard: str) -> str:
    """``OUT/_shards/<digest>.json``: how many rows an input shard gave when a task read it whole."""
    return storage.join(output, SHARDS_DIR, hashlib.blake2b(shard.encode(), digest_size=16).hexdigest() + ".json")


def write_marker(output: str, shard: str, rows: int) -> None:
    storage.write_json(marker_uri(output, shard), {"shard": shard, "rows": rows})


def complete_shards(output: str, shards: Sequence[str], done: dict[str, np.ndarray]) -> set[str]:
    """The input shards whose every row is in ``output``: read whole before (their marker), and as many
    of their rows done as that read gave. A re-run does not read them again; shards are taken as
    immutable, as img2dataset writes them (``--retry-errors`` and ``--overwrite`` read them again)."""
    candidates = [s for s in shards if len(done.get(s, ()))]
    if not candidates:
        return set()

    def rows(shard: str) -> int | None:
        uri = marker_uri(output, shard)
        return storage.read_json(uri).get("rows") if storage.exists(uri) else None

    with ThreadPoolExecutor(max_workers=16) as pool:  # one small GET each: overlap them
        counts = list(pool.map(rows, candidates))
    return {s for s, n in zip(candidates, counts) if n is not None and n == len(done[s])}


def drop_error_rows(uri: str) -> None:
    """Rewrite a shard without its error rows (in place: the new file replaces the old one whole)."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    kept = table.filter(table.column(ERROR).is_null())
    log.info("caption: --retry-errors: %d error row(s) of %s will be captioned again",
             table.num_rows - kept.num_rows, storage.basename(uri))
    if kept.num_rows:
        write_parquet(uri, kept)
    else:
        storage.delete_file(uri)


def check_compatible(uri: str, metadata: dict, settings: dict) -> None:
    found = {k.decode()[len(META_PREFIX):]: v.decode() for k, v in metadata.items()
             if k.decode().startswith(META_PREFIX)}
    ours = shard_metadata(settings)
    for key in COMPATIBLE_KEYS:
        theirs, mine = found.get(key, COMPATIBLE_DEFAULTS.get(key)), ours[f"{META_PREFIX}{key}".encode()].decode()
        if theirs != mine:
            raise ConfigError(f"--out already holds captions made with {key}={theirs} ({storage.basename(uri)}), "
                              f"this run has {key}={mine}: use --overwrite or another --out")


def write_listing(paths: Iterable[str], done: np.ndarray, listing: str, *, group_rows: int,
                   dedupe: bool = True) -> tuple[int, int, list[tuple[str, int]]]:
    """Stream the paths not in ``done`` into Parquet shards under ``listing``, each path once.

    Returns (total, skipped, units): ``total`` distinct paths; a unit is (listing shard, row group) of
    ``group_rows`` paths, the work of one decode task. The driver holds one listing shard's paths at a
    time, and with ``dedupe`` 16-byte digests of the paths listed so far (a manifest may name an image
    twice; a prefix listing cannot, so it goes without).
    """
    total = skipped = 0
    units: list[tuple[str, int]] = []
    chunk: list[str] = []
    seen: list[np.ndarray] = []  # sorted digests of each earlier chunk's paths (no copies of a growing array)

    def flush():
        nonlocal total, skipped
        digests = digests_of(chunk)
        fresh = np.ones(len(chunk), dtype=bool)
        if dedupe:
            _, first = np.unique(digests, return_index=True)
            fresh[:] = False
            fresh[first] = True
            for earlier in seen:
                fresh &= ~contains(earlier, digests)
            seen.append(np.sort(digests[fresh]))
        total += int(fresh.sum())
        finished = fresh & contains(done, digests)
        skipped += int(finished.sum())
        todo = [p for p, f, d in zip(chunk, fresh, finished) if f and not d]
        if todo:
            uri = storage.join(listing, f"paths-{len(units):07d}.parquet")  # unique: units only grow
            write_parquet(uri, pa.table({PATH: pa.array(todo, pa.string())}), row_group_size=group_rows)
            units.extend((uri, g) for g in range((len(todo) + group_rows - 1) // group_rows))

    for path in paths:
        chunk.append(path)
        if len(chunk) == LISTING_ROWS:
            flush()
            chunk = []
    if chunk:
        flush()
    return total, skipped, units


def contains(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Which of ``digests`` are in ``sorted_digests`` (a binary search each)."""
    if not len(sorted_digests):
        return np.zeros(len(digests), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_digests, digests), len(sorted_digests) - 1)
    return sorted_digests[where] == digests


