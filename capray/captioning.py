"""Bulk captioning (``capray caption``): a bucket, folder or manifest of images → Parquet captions.

The data path, and where each step runs::

    driver   list the input, drop what OUTPUT already holds, stream the rest into Parquet path shards
    tasks    read each object's bytes (through capray.storage) and decode it (CPU, one row per image)
    actors   Captioner: encoder + batched beam search, the checkpoint loaded once per actor
    tasks    _ShardSink: one Parquet shard per write task, written atomically under a run-unique name

One row per image, always: an object that cannot be read or decoded becomes a row whose ``error``
says why. A run is resumable because a shard only ever appears whole (local files are written to a
hidden temporary name and renamed; an S3 object appears when its upload completes) and its name is
fixed by (run, write task), so a retried write task overwrites its own shard instead of adding one.
Before a run, the ``path`` column of the shards already in OUTPUT is read (as 16-byte digests, so
millions of paths cost tens of MB) and those images are not listed again.

Why not Ray Data's own checkpointing (``DataContext.checkpoint_config``)? It does the same
filtering, but adds an actor pool of at least one 1-CPU actor with a 1 GiB memory reservation
to every resumed run (on a 2-core machine that starves the decode tasks: a hang), holds every
finished path as a Python string in each of those actors, must keep its id files forever for a
re-run to skip anything, and would still need the full-URI path shards below.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from capray import storage
from capray.formats import CAPTION, CAPTION_SCHEMA, ERROR, HEIGHT, PATH, SCORE, SUMMARY_FILE, WIDTH
from capray.images import ImageDecodeError, decode_image
from capray.runtime import ActorPlan, Machine, ModelThread, plan_actors, task_cpus

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MANIFEST_SUFFIXES = (".jsonl", ".json")

SHARD_PREFIX = "part-"
"""Caption shards are ``OUTPUT/part-<run id>-<write task>.parquet``."""
SHARD_NAME = re.compile(r"part-\d{8}T\d{6}-[0-9a-f]{6}-\d{6}\.parquet")
TEMPORARY_NAME = re.compile(r"\.part-.*\.parquet\.tmp-[0-9a-f]{8}")
LISTING_DIR = "_listing"
"""``OUTPUT/_listing/<run id>/``: the paths a run has to caption, deleted when the run ends."""
LISTING_ROWS = 65_536
"""Paths per listing shard: the driver never holds more than one shard's worth of the listing."""
META_PREFIX = "capray."
"""Parquet key-value metadata of a shard: ``capray.checkpoint``, ``capray.beam_size``, ..."""
COMPATIBLE_KEYS = ("checkpoint", "beam_size", "max_length", "encoder")
"""Metadata that must agree for a run to add shards to an output that already holds some."""
LISTING, GROUP = "listing", "group"  # a decode task's unit of work: one row group of a listing shard
IMAGE = "image"  # decoded pixels between the decode tasks and the captioners (never written)
RETRY = "retry"
"""Between the decode tasks and the sink: the image's read failed for a transient reason (throttling,
a reset connection) even after the S3 client's retries. Such a row is never written, so the image is
not done: the next run lists and captions it again (``capray caption`` exits 1 and says so)."""
DECODE_TASK_RETRIES = 10
"""Ray retries of a decode task that raised ``TransientStorageError`` (reading its listing shard)."""
READ_THREADS = 16  # concurrent object reads per decode task: S3 GETs are latency-bound
MAX_BLOCKS = 10_000  # decode tasks per run at most: Ray Data keeps some driver memory per block


@dataclass(frozen=True)
class CaptionConfig:
    """One ``capray caption`` run."""

    input: str
    """An ``s3://`` prefix or local folder (recursive), a manifest (.jsonl/.json) or a single image."""
    output: str
    """Where the Parquet shards and ``summary.json`` go; re-running into it resumes."""
    checkpoint: str
    """A checkpoint directory, or a training run directory (its best checkpoint is used)."""
    beam_size: int = 3
    """K: beams per image."""
    batch_size: int = 32
    """Images per encoder forward pass and beam search."""
    actors: int = 0
    """A fixed number of captioner actors; 0 lets the pool scale (on a cluster: from 1 up to
    ``max_actors`` as work queues up and nodes join; locally: one per GPU, else one)."""
    max_actors: int = 0
    """Most captioner actors an autoscaling pool grows to; 0: no limit (the cluster's node caps bound it)."""
    gpus_per_actor: float = 0.0
    """GPUs per actor; 0 captions on CPU."""
    cpus_per_actor: float = 0.0
    """CPUs per actor (also its torch threads on CPU); 0: 1 on a cluster, the machine's spare cores locally."""
    wait_timeout: float = 600.0
    """Seconds to wait for the cluster to make room for the first actor (GPU nodes take minutes to start)."""
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    """File name endings (lower-case, no dot) of the objects to caption when listing a prefix."""
    max_length: int = 20
    """Most words per caption (``<end>`` included)."""
    overwrite: bool = False
    """Delete the shards already in ``output`` and caption everything again."""
    retry_errors: bool = False
    """Caption again every image that has an error row in ``output`` (after the cause is fixed); its
    error row is replaced, so the output still holds one row per image."""
    rows_per_shard: int = 10_000
    """Rows per Parquet shard (the last of a run may have fewer): few, large files read back fast."""
    fault: str = ""
    """Tests only: ``crash-after:K:MARKER`` makes a captioner exit hard at its K-th batch, once (the
    marker file records that it happened); ``sleep:SECONDS`` slows every batch down."""

    def __post_init__(self):
        for name in ("input", "output", "checkpoint"):
            if not getattr(self, name):
                raise ValueError(f"--{name} must not be empty")
            # Resolved where the user typed it: Ray's workers run in another working directory.
            object.__setattr__(self, name, storage.normalize(getattr(self, name)))
        for name in ("beam_size", "batch_size", "max_length", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("actors", "max_actors", "gpus_per_actor", "cpus_per_actor", "wait_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.overwrite and self.retry_errors:
            raise ValueError("--overwrite and --retry-errors exclude each other (--overwrite redoes everything)")
        if not self.extensions or any(not e or e != e.lower().lstrip(".") for e in self.extensions):
            raise ValueError(f"--extensions must be lower-case endings without dots, got {self.extensions}")
        if self.fault and not _parse_fault(self.fault):
            raise ValueError(f"fault must be crash-after:K:MARKER or sleep:SECONDS, got {self.fault!r}")

    @classmethod
    def from_flags(cls, *, extensions: str | Iterable[str] = DEFAULT_EXTENSIONS, **values) -> "CaptionConfig":
        """Build from the parsed command-line flags (``--extensions`` is a comma-separated string)."""
        if isinstance(extensions, str):
            extensions = extensions.split(",")
        parsed = tuple(dict.fromkeys(e.strip().lower().lstrip(".") for e in extensions if e.strip()))
        if not parsed:
            raise ValueError("--extensions must name at least one file type (e.g. jpg,png)")
        return cls(extensions=parsed, **values)


@dataclass
class CaptionSummary:
    """What a run did; also written to ``OUTPUT/summary.json``."""

    total: int
    """Images in the input."""
    ok: int
    """Captioned by this run."""
    errors: int
    """Rows this run wrote with ``error`` set (unreadable or undecodable objects)."""
    skipped: int
    """Already in the output before this run started."""
    retryable: int
    """Images whose read failed for a transient reason (throttling, timeouts) after the client's
    retries: not written, so running the same command again captions them."""
    wall_seconds: float
    images_per_s: float
    """(ok + errors) / wall_seconds."""
    output: str
    run_id: str
    shards: int
    """Parquet shards this run wrote."""
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def caption(config: CaptionConfig) -> CaptionSummary:
    """Caption every image of ``config.input`` not yet in ``config.output``; returns the run summary.

    Configuration errors (missing bucket, no images, unusable checkpoint, an output written with other
    settings) raise ``ValueError`` before Ray or any actor starts.
    """
    started = time.perf_counter()
    storage.check_bucket(config.input)
    storage.check_bucket(config.output)
    source = _input_kind(config.input)
    model = _validate_checkpoint(config.checkpoint)
    settings = {
        "checkpoint": model["uri"],
        "beam_size": config.beam_size,
        "max_length": config.max_length,
        "encoder": model["encoder"],
    }
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    output = config.output
    done, with_errors = (np.empty(0, dtype="S16"), []) if config.overwrite else _finished_paths(
        output, settings, retry_errors=config.retry_errors)
    listing = storage.join(output, LISTING_DIR, run_id)
    storage.delete_dir(storage.join(output, LISTING_DIR))  # stale listings of killed runs
    paths = _input_paths(config.input, source, config.extensions)
    total, skipped, units = _write_listing(paths, done, listing, dedupe=source != "prefix",
                                           group_rows=_decode_rows(config.batch_size, config.rows_per_shard))
    if total == 0:
        storage.delete_dir(storage.join(output, LISTING_DIR))
        raise ValueError(f"--input {config.input}: no images (extensions: {','.join(config.extensions)})")
    if config.overwrite:
        _delete_shards(output)
    for uri in with_errors:  # --retry-errors: their images are listed again, so their error rows go
        _drop_error_rows(uri)
    storage.delete_file(storage.join(output, SUMMARY_FILE))  # its presence means "the last run finished"
    log.info("caption: %d images in %s, %d already captioned, %d to do → %s (run %s)",
             total, config.input, skipped, total - skipped, output, run_id)

    ok = errors = retryable = shards = 0
    if total > skipped:
        ok, errors, retryable, shards = _run(config, units=units, output=output, run_id=run_id,
                                  image_size=model["image_size"], settings=settings)
    storage.delete_dir(storage.join(output, LISTING_DIR))
    wall = time.perf_counter() - started
    if retryable:
        log.warning("caption: %d image(s) could not be read for a transient reason (see the log); they are "
                    "not in the output yet: run the same command again to caption them", retryable)
    summary = CaptionSummary(total=total, ok=ok, errors=errors, skipped=skipped, retryable=retryable,
                             wall_seconds=round(wall, 3),
                             images_per_s=round((ok + errors) / wall, 3) if wall > 0 else 0.0,
                             output=output, run_id=run_id, shards=shards, settings=settings)
    storage.write_json(storage.join(output, SUMMARY_FILE), summary.to_dict())  # written last
    return summary


def print_summary(summary: CaptionSummary) -> None:
    """One table: images, ok, errors, skipped, wall time, images/s."""
    header = ("images", "ok", "errors", "skipped", "retry", "wall s", "images/s")
    values = (summary.total, summary.ok, summary.errors, summary.skipped, summary.retryable,
              f"{summary.wall_seconds:.1f}", f"{summary.images_per_s:.1f}")
    widths = [max(len(h), len(str(v))) for h, v in zip(header, values)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join(str(v).rjust(w) for v, w in zip(values, widths)))
    print(f"captions: {summary.output} ({summary.shards} new shard(s), run {summary.run_id})")


# ---------------------------------------------------------------------------------------------------
# Driver side: validation, what is done already, the listing.

def _input_kind(uri: str) -> str:
    """``manifest``, ``image`` (a single file) or ``prefix``; raises ``ValueError`` if there is nothing."""
    if storage.is_file(uri):
        if uri.lower().endswith(MANIFEST_SUFFIXES):
            return "manifest"
        return "image"
    if storage.is_dir(uri):
        return "prefix"
    raise ValueError(f"--input {uri}: no such folder, prefix or file")


def _input_paths(uri: str, kind: str, extensions: tuple[str, ...]) -> Iterator[str]:
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


def _validate_checkpoint(uri: str) -> dict:
    """Load the checkpoint once in the driver (seconds), so a bad one fails before any actor starts."""
    from capray.checkpoint import load_checkpoint

    model = load_checkpoint(uri, device="cpu")
    expected, produced = model.decoder.config.feature_dim, model.encoder.num_features
    if expected != produced:
        raise ValueError(f"--checkpoint {model.uri}: the decoder expects {expected} feature channels, "
                         f"the encoder gives {produced}")
    spec = model.encoder.spec
    return {"uri": storage.normalize(model.uri), "encoder": spec.to_dict(), "image_size": spec.image_size}


def _digests(paths: Iterable[str]) -> np.ndarray:
    """16-byte digests of paths: millions of them fit in tens of MB (collisions: ~n²/2¹²⁹)."""
    return np.array([hashlib.blake2b(p.encode(), digest_size=16).digest() for p in paths], dtype="S16")


def _shard_uris(output: str) -> list[str]:
    """The caption shards directly in ``output`` (named as this module names them)."""
    return sorted(uri for uri in storage.list_files(output, extensions=("parquet",))
                  if SHARD_NAME.fullmatch(storage.basename(uri)) and storage.parent(uri) == output)


def _finished_paths(output: str, settings: dict, *, retry_errors: bool = False) -> tuple[np.ndarray, list[str]]:
    """Sorted digests of every path already in ``output``, and the shards that hold error rows.

    With ``retry_errors`` the paths of error rows do not count as done. Removes the temporary files a
    killed run may have left (a shard itself only ever appears whole). A shard that cannot be read is
    never deleted: a transient failure raises ``TransientStorageError`` (run again), anything else a
    ``ValueError``. Also raises ``ValueError`` if the shards were made with another checkpoint or settings.
    """
    if not storage.exists(output):
        return np.empty(0, dtype="S16"), []
    _delete_temporaries(output)

    def digests(uri: str) -> tuple[np.ndarray, bool]:
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                metadata = parquet.schema_arrow.metadata or {}
                table = parquet.read(columns=[PATH, ERROR])
        except pa.ArrowInvalid as exc:
            raise ValueError(f"--output {output} holds {storage.basename(uri)}, which is not a caption shard "
                             f"({str(exc).splitlines()[0]}): move it away or use --overwrite") from exc
        except OSError as exc:
            raise storage.TransientStorageError(f"cannot read {uri}: {str(exc).splitlines()[0]}") from exc
        _check_compatible(uri, metadata, settings)
        failed = table.column(ERROR).is_valid().to_numpy(zero_copy_only=False)
        paths = table.column(PATH).to_pylist()
        if retry_errors:
            paths = [p for p, f in zip(paths, failed) if not f]
        return _digests(paths), bool(failed.any())

    uris = _shard_uris(output)
    with ThreadPoolExecutor(max_workers=8) as pool:  # shards are read one request each: overlap them
        parts = list(pool.map(digests, uris))
    done = np.concatenate([d for d, _ in parts]) if parts else np.empty(0, dtype="S16")
    done.sort()
    with_errors = [uri for uri, (_, failed) in zip(uris, parts) if failed] if retry_errors else []
    return done, with_errors


def _drop_error_rows(uri: str) -> None:
    """Rewrite a shard without its error rows (in place: the new file replaces the old one whole)."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    kept = table.filter(table.column(ERROR).is_null())
    log.info("caption: --retry-errors: %d error row(s) of %s will be captioned again",
             table.num_rows - kept.num_rows, storage.basename(uri))
    if kept.num_rows:
        _write_parquet(uri, kept)
    else:
        storage.delete_file(uri)


def _check_compatible(uri: str, metadata: dict, settings: dict) -> None:
    found = {k.decode()[len(META_PREFIX):]: v.decode() for k, v in metadata.items()
             if k.decode().startswith(META_PREFIX)}
    ours = _metadata(settings)
    for key in COMPATIBLE_KEYS:
        theirs, mine = found.get(key), ours[f"{META_PREFIX}{key}".encode()].decode()
        if theirs != mine:
            raise ValueError(f"--output already holds captions made with {key}={theirs} ({storage.basename(uri)}), "
                             f"this run has {key}={mine}: use --overwrite or another --output")


def _metadata(settings: dict) -> dict[bytes, bytes]:
    """Parquet key-value metadata of every shard: the checkpoint and the decoding settings."""
    values = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in settings.items()}
    return {f"{META_PREFIX}{k}".encode(): v.encode() for k, v in values.items()}


def _write_listing(paths: Iterable[str], done: np.ndarray, listing: str, *, group_rows: int,
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
        digests = _digests(chunk)
        fresh = np.ones(len(chunk), dtype=bool)
        if dedupe:
            _, first = np.unique(digests, return_index=True)
            fresh[:] = False
            fresh[first] = True
            for earlier in seen:
                fresh &= ~_contains(earlier, digests)
            seen.append(np.sort(digests[fresh]))
        total += int(fresh.sum())
        finished = fresh & _contains(done, digests)
        skipped += int(finished.sum())
        todo = [p for p, f, d in zip(chunk, fresh, finished) if f and not d]
        if todo:
            uri = storage.join(listing, f"paths-{len(units):07d}.parquet")  # unique: units only grow
            _write_parquet(uri, pa.table({PATH: pa.array(todo, pa.string())}), row_group_size=group_rows)
            units.extend((uri, g) for g in range((len(todo) + group_rows - 1) // group_rows))

    for path in paths:
        chunk.append(path)
        if len(chunk) == LISTING_ROWS:
            flush()
            chunk = []
    if chunk:
        flush()
    return total, skipped, units


def _contains(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Which of ``digests`` are in ``sorted_digests`` (a binary search each)."""
    if not len(sorted_digests):
        return np.zeros(len(digests), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_digests, digests), len(sorted_digests) - 1)
    return sorted_digests[where] == digests


def _delete_shards(output: str) -> None:
    for uri in _shard_uris(output):
        storage.delete_file(uri)
    _delete_temporaries(output)


def _delete_temporaries(output: str) -> None:
    """Shards a killed run was still writing under a temporary name (local disks only)."""
    if storage.is_remote(output):
        return
    for uri in storage.list_files(output):
        if TEMPORARY_NAME.fullmatch(storage.basename(uri)) and storage.parent(uri) == output:
            storage.delete_file(uri)


def _write_parquet(uri: str, table: pa.Table, *, row_group_size: int | None = None) -> None:
    """Write a whole Parquet file so that it appears complete or not at all."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


# ---------------------------------------------------------------------------------------------------
# The Ray Data pipeline.

def _run(config: CaptionConfig, *, units: list[tuple[str, int]], output: str, run_id: str, image_size: int,
         settings: dict) -> tuple[int, int, int, int]:
    """Caption the listed paths into shards in ``output``; returns (ok, errors, retryable, shards)."""
    import ray

    from capray.runtime import ensure_ray, local_machine, wait_for_resources

    ensure_ray()
    machine = local_machine()
    plan, decode_cpus, write_cpus = plan_resources(config, machine=machine)
    log.info("caption: %s; decode tasks × %g CPU", plan.describe(), decode_cpus)
    if machine is None:  # a cluster: the first captioner may need a node that is not up yet
        wait_for_resources([plan.bundle()] * plan.min_actors, timeout_s=config.wait_timeout, what="caption")
    sink = _ShardSink(output, run_id=run_id, metadata=_metadata(settings), rows_per_shard=config.rows_per_shard)
    # One block per unit (up to MAX_BLOCKS), so decode tasks spread over the nodes as they join. Ray's
    # file readers are not used: their listing task takes a whole CPU, which the captioners hold on a
    # small machine.
    ds = ray.data.from_items([{LISTING: uri, GROUP: group} for uri, group in units],
                             override_num_blocks=min(len(units), MAX_BLOCKS))
    ds = ds.map_batches(read_and_decode, fn_kwargs={"image_size": image_size}, batch_size=1,
                        batch_format="numpy", num_cpus=decode_cpus, max_retries=DECODE_TASK_RETRIES,
                        retry_exceptions=[storage.TransientStorageError])
    ds = ds.map_batches(Captioner, fn_constructor_kwargs={
                            "checkpoint": settings["checkpoint"], "beam_size": config.beam_size,
                            "max_length": config.max_length, "threads": plan.threads,
                            "use_gpu": plan.num_gpus > 0, "warmup_batch": config.batch_size,
                            "fault": config.fault},
                        compute=plan.strategy(), batch_size=config.batch_size,
                        batch_format="numpy", **plan.remote_args())
    ds.write_datasink(sink, ray_remote_args={"num_cpus": write_cpus})
    log.debug("caption: Ray Data stats:\n%s", ds.stats())
    return sink.ok, sink.errors, sink.retryable, sink.shards


def plan_resources(config: CaptionConfig, *, machine: Machine | None) -> tuple[ActorPlan, float, float]:
    """The captioners' plan and the CPU shares of a decode task and of a write task.

    ``machine``: the local machine's resources, or None on a cluster (see ``capray.runtime``).
    """
    decode_cpus = task_cpus(machine, small=0.4, cluster=1.0)
    write_cpus = task_cpus(machine, small=0.1, cluster=0.25)
    plan = plan_actors(actors=config.actors, max_actors=config.max_actors, gpus_per_actor=config.gpus_per_actor,
                       cpus_per_actor=config.cpus_per_actor, machine=machine, reserve_cpus=decode_cpus + write_cpus)
    return plan, decode_cpus, write_cpus


def _decode_rows(batch_size: int, rows_per_shard: int) -> int:
    """Images per decode task: a whole number of captioner batches, about 256, at most a shard.

    A captioner task returns one block per decode task, and a shard holds whole blocks.
    """
    return batch_size * max(1, min(256, rows_per_shard) // batch_size)


def read_and_decode(batch: dict[str, np.ndarray], *, image_size: int) -> dict[str, np.ndarray]:
    """CPU task: the paths of listing units → decoded images; a failure is a row with ``error``, not an exception.

    Returns ``path``, ``image`` uint8 (N, S, S, 3) (zeros where decoding failed), ``width``, ``height``
    int32 (0 on error), ``error`` ("" when fine) and ``retry`` (the error is transient: see ``RETRY``).
    """
    paths = []
    for uri, group in zip(batch[LISTING], batch[GROUP]):
        fs, path = storage.resolve(str(uri))
        with fs.open_input_file(path) as f:
            paths += pq.ParquetFile(f).read_row_group(int(group), columns=[PATH]).column(PATH).to_pylist()
    n = len(paths)
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors, retry = np.full(n, "", dtype=object), np.zeros(n, dtype=bool)
    for i, data in enumerate(_prefetch(paths)):
        try:
            if isinstance(data, Exception):
                raise data
            images[i], widths[i], heights[i] = decode_image(data, image_size)
        except (ImageDecodeError, storage.StorageError, storage.TransientStorageError) as exc:
            errors[i] = str(exc) or type(exc).__name__
            retry[i] = isinstance(exc, storage.TransientStorageError)
            if retry[i]:
                log.warning("caption: %s (after the S3 client's retries); a re-run will caption it", errors[i])
    return {PATH: np.array(paths, dtype=object), IMAGE: images, WIDTH: widths, HEIGHT: heights, ERROR: errors,
            RETRY: retry}


def _prefetch(uris: list[str]) -> Iterator[bytes | storage.StorageError | storage.TransientStorageError]:
    """The objects' bytes in order, ``READ_THREADS`` reads in flight (S3 GETs wait on the network).

    Decoding stays on one thread: a decode task is sized for one CPU, and a few huge images decoded
    at once could take gigabytes. A read that fails yields its exception instead of bytes.
    """
    def read(uri: str) -> bytes | storage.StorageError | storage.TransientStorageError:
        try:
            return storage.read_bytes(uri)
        except (storage.StorageError, storage.TransientStorageError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        pending = deque(pool.submit(read, uri) for uri in uris[:READ_THREADS])
        for uri in uris[READ_THREADS:]:
            yield pending.popleft().result()
            pending.append(pool.submit(read, uri))
        while pending:
            yield pending.popleft().result()


class Captioner:
    """Ray Data actor: encoder + decoder loaded once; a batch of decoded images → caption rows.

    torch is imported here, not at the top of the module: the decode and write workers never need it.
    """

    def __init__(self, checkpoint: str, *, beam_size: int, max_length: int, threads: int, use_gpu: bool,
                 warmup_batch: int = 0, fault: str = ""):
        self._model_thread = ModelThread()
        self._model_thread.run(self._load, checkpoint, threads=threads, use_gpu=use_gpu)
        self.beam_size, self.max_length = beam_size, max_length
        self.fault = _parse_fault(fault)
        self.batches = 0
        if warmup_batch:  # kernels are picked per shape on the first call: pay that before the first real batch
            size = self.encoder.spec.image_size
            self.caption(np.zeros((warmup_batch, size, size, 3), dtype=np.uint8))

    def _load(self, checkpoint: str, *, threads: int, use_gpu: bool) -> None:
        import torch

        from capray.checkpoint import load_checkpoint

        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch.set_num_threads(threads)  # its CPU share: decode tasks use the rest
        model = load_checkpoint(checkpoint, device=self.device)
        self.encoder, self.decoder, self.vocab = model.encoder, model.decoder, model.vocab
        self.autocast_dtype = None
        if use_gpu:  # channels-last convolutions and half precision: the tensor cores' fast path
            self.encoder.to(memory_format=torch.channels_last)
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.batches += 1
        self._inject_fault()
        errors = [str(e) for e in batch[ERROR]]
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(errors)
        captions: list[str | None] = [None] * n
        scores = np.zeros(n, dtype=np.float32)
        if ok.any():
            texts, values = self.caption(batch[IMAGE][ok])
            for i, text in zip(np.flatnonzero(ok), texts):
                captions[i] = text
            scores[ok] = values
        return pa.table({
            PATH: pa.array([str(p) for p in batch[PATH]], pa.string()),
            CAPTION: pa.array(captions, pa.string()),
            SCORE: pa.array(scores, pa.float32(), mask=~ok),
            WIDTH: pa.array(batch[WIDTH], pa.int32(), mask=~ok),
            HEIGHT: pa.array(batch[HEIGHT], pa.int32(), mask=~ok),
            ERROR: pa.array([e or None for e in errors], pa.string()),
            RETRY: pa.array(batch[RETRY], pa.bool_()),
        }, schema=CAPTION_SCHEMA.append(pa.field(RETRY, pa.bool_())))

    def caption(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        """uint8 (B, H, W, 3) → B captions and their mean log-probability per token."""
        return self._model_thread.run(self._caption, images)

    def _caption(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                    enabled=self.autocast_dtype is not None):
            pixels = torch.from_numpy(np.ascontiguousarray(images))
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            features = self.encoder(pixels)  # (B, P, E)
            decoded = self.decoder.beam_search(features, beam_size=self.beam_size, max_length=self.max_length)
        texts = [self.vocab.decode(row) for row in decoded.tokens.tolist()]
        return texts, decoded.scores.float().cpu().numpy().astype(np.float32)

    def _inject_fault(self) -> None:
        if self.fault is None:
            return
        kind, value, marker = self.fault
        if kind == "sleep":
            time.sleep(value)
        elif self.batches == value and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"captioner pid {os.getpid()} exited at batch {self.batches}\n")
            os._exit(1)


def _parse_fault(fault: str) -> tuple[str, float, str] | None:
    """``crash-after:K:MARKER`` → ("crash-after", K, MARKER); ``sleep:S`` → ("sleep", S, ""); else None."""
    if not fault:
        return None
    parts = fault.split(":", 2)
    try:
        if parts[0] == "crash-after" and len(parts) == 3 and parts[2]:
            return "crash-after", int(parts[1]), parts[2]
        if parts[0] == "sleep" and len(parts) == 2:
            return "sleep", float(parts[1]), ""
    except ValueError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------
# Writing the shards.

class _ShardSink(Datasink):
    """One whole Parquet shard per write task, named by (run, task): a retried task overwrites its own."""

    def __init__(self, output: str, *, run_id: str, metadata: dict[bytes, bytes], rows_per_shard: int):
        self.output, self.run_id, self.rows_per_shard = output, run_id, rows_per_shard
        self.schema = CAPTION_SCHEMA.with_metadata({**metadata, f"{META_PREFIX}run_id".encode(): run_id.encode()})
        self.ok = self.errors = self.retryable = self.shards = 0

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        retryable = sum(int(pc.sum(t.column(RETRY)).as_py() or 0) for t in tables)
        tables = [t.filter(pc.invert(t.column(RETRY))) for t in tables]  # not done: never written
        tables = [t.select(CAPTION_SCHEMA.names).cast(self.schema) for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "errors": 0, "retryable": retryable, "shards": 0}
        table = pa.concat_tables(tables)
        name = f"{SHARD_PREFIX}{self.run_id}-{ctx.task_idx:06d}.parquet"
        _write_parquet(storage.join(self.output, name), table)
        return {"rows": table.num_rows, "errors": table.num_rows - table.column(ERROR).null_count,
                "retryable": retryable, "shards": 1}

    def on_write_complete(self, write_result) -> None:  # on the driver, once every write task is done
        returns = [r for r in write_result.write_returns if r]
        rows = sum(r["rows"] for r in returns)
        self.errors = sum(r["errors"] for r in returns)
        self.ok = rows - self.errors
        self.retryable = sum(r["retryable"] for r in returns)
        self.shards = sum(r["shards"] for r in returns)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def get_name(self) -> str:
        return "WriteCaptionShards"
