"""Bulk captioning (``capray caption``): a bucket, folder or manifest of images → Parquet captions.

The data path, and where each step runs::

    driver   capray.listing: list the input, drop what OUT already holds, stream the rest into listing shards
             (for WebDataset / Parquet input, capray.shards: list the shards, one unit of work each)
    tasks    read each object's bytes (through capray.storage) and decode it (CPU, one row per image);
             or stream one shard, skip the samples OUT holds, decode the rest (a block every ~256)
    actors   Captioner: encoder + batched beam search, the checkpoint loaded once per actor
    tasks    capray.sink: one Parquet shard per write task, written atomically under a run-unique name

One row per image, always: an object that cannot be read or decoded becomes a row whose ``error``
says why. A run is resumable because a shard only ever appears whole (local files are written to a
hidden temporary name and renamed; an S3 object appears when its upload completes) and its name is
fixed by (run, write task), so a retried write task overwrites its own shard instead of adding one.
Before a run, the ``path`` column of the shards already in OUT is read (as 16-byte digests, so
millions of paths cost tens of MB) and those images are not listed again. A shard's samples are only
known once it is read, so for sharded input those digests go to the tasks, which skip done samples.

A run holds the output's lease (``capray.lease``) from before it reads OUT until it ends: a second run
into the same output is refused, a dead run's lease is taken over, and only then are the dead run's
leftovers (``_listing``, temporary files) deleted. ``--overwrite`` builds the new output in
``OUT/_overwrite/`` (resumable like any output) and replaces the old shards only once it is complete.
Reads that fail for a transient reason after the S3 client's retries go to a retry listing; once the
rest is done they are tried again, with growing pauses, for ``retry_window_s`` seconds.

Why not Ray Data's own checkpointing (``DataContext.checkpoint_config``)? It does the same
filtering, but adds an actor pool of at least one 1-CPU actor with a 1 GiB memory reservation
to every resumed run (on a 2-core machine that starves the decode tasks: a hang), holds every
finished path as a Python string in each of those actors, must keep its id files forever for a
re-run to skip anything, and would still need the full-URI path shards below.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capray import lease, reader, shards, storage
from capray.config import CaptionConfig
from capray.errors import ConfigError
from capray.formats import CAPTION, CAPTION_SCHEMA, ERROR, HEIGHT, PATH, SCORE, SUMMARY_FILE, WIDTH
from capray.listing import (LISTING_DIR, SHARDS_DIR, complete_shards, contains, digests_bytes, digests_of,
                            drop_error_rows, finished_paths, input_kind, input_paths, load_digests, write_listing,
                            write_marker)
from capray.progress import Progress, report
from capray.sink import RETRY, ShardSink, caption_schema, shard_metadata, shard_uris
from capray.sizing import plan_pipeline
from capray.tasks import MAX_BLOCKS, READ_TASK_RETRIES, ModelThread

log = logging.getLogger(__name__)

LISTING, GROUP = "listing", "group"  # a decode task's unit of work: one row group of a listing shard
IMAGE = "image"  # decoded pixels between the decode tasks and the captioners (never written)
RETRY_FIRST_PAUSE_S = 5.0
"""Pause before the first pass that retries transient read failures; it doubles for every further pass."""
RETRY_MAX_PAUSE_S = 60.0
DONE_FILE = "done.npy"
"""``OUT/_listing/<run>/done.npy``: sorted digests of the paths OUT holds, for the tasks reading shards."""


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
    """Caption every image of ``config.input`` not yet in ``config.out``; returns the run summary.

    Configuration errors (missing bucket, no images, unusable checkpoint, an output written with other
    settings, an output another live run holds) raise ``ValueError`` before Ray or any actor starts.
    """
    started = time.perf_counter()
    storage.check_bucket(config.input)
    storage.check_bucket(config.out)
    source = _input_kind(config)
    sharded = source in (shards.WEBDATASET, shards.PARQUET)
    columns = config.keep_columns if sharded else ()
    model = _validate_checkpoint(config.checkpoint)
    settings = {
        "checkpoint": model["uri"],
        "beam_size": config.beam_size,
        "max_length": config.max_length,
        "encoder": model["encoder"],
        "columns": list(columns),
        "key_column": config.shard_columns.key_column,  # it names the samples: another one would caption them again
    }
    input_shards = _input_shards(config, source) if sharded else []
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    with lease.acquire(config.out, run_id=run_id, timeout_s=config.lease_timeout_s, what="caption run") as held:
        return _caption_holding(config, held, started=started, source=source, settings=settings,
                                input_shards=input_shards, image_size=model["image_size"])


def _caption_holding(config: CaptionConfig, held: lease.Lease, *, started: float, source: str, settings: dict,
                     input_shards: list[str], image_size: int) -> CaptionSummary:
    """``caption`` once the run holds the output's lease: anything in OUT that is not ours is a dead run's."""
    run_id, final = held.run_id, config.out
    _finish_replacement(final, held)  # an --overwrite killed while it replaced the output: finish that first
    staging = storage.join(final, OVERWRITE_DIR)
    output = staging if config.overwrite else final
    if config.overwrite:
        _start_or_resume_overwrite(staging, run_id=run_id, settings=settings)
    done, with_errors, done_in_shards = finished_paths(
        output, settings, retry_errors=config.retry_errors, count_in=frozenset(input_shards))
    if not config.overwrite and storage.exists(staging):
        log.warning("caption: %s holds an unfinished --overwrite; without --overwrite it is abandoned and "
                    "the output as it was is resumed", final)
        storage.delete_dir(staging)
    storage.delete_dir(storage.join(output, LISTING_DIR))  # listings of dead runs (we hold the lease)
    listing = storage.join(output, LISTING_DIR, run_id)
    sharded = bool(input_shards)
    plan = _plan_shards(input_shards, done_in_shards, output=output, listing=listing) if sharded else \
        _plan_images(config, source, done, listing=listing)
    for uri in with_errors:  # --retry-errors: their images are listed again, so their error rows go
        drop_error_rows(uri)
    if not config.overwrite:  # its presence means "the last run finished"; an --overwrite keeps the old one
        storage.delete_file(storage.join(final, SUMMARY_FILE))
    log.info("caption: %s in %s, %s → %s (run %s)", plan.input_line, config.input, plan.done_line, output, run_id)

    ok = errors = retryable = written = 0
    units, retry_pass, deadline, pause = plan.units, 0, None, RETRY_FIRST_PAUSE_S
    while units:
        result = _run(config, units=units, output=output, run_id=run_id, image_size=image_size,
                      settings=settings, done=plan.done if retry_pass == 0 else None, held=held, retry_pass=retry_pass,
                      retry_listing=storage.join(listing, f"retry-{retry_pass + 1}"),
                      progress=(plan.total, plan.skipped) if retry_pass == 0 else (retryable, 0))
        ok, errors, written = ok + result.ok, errors + result.errors, written + result.shards
        retryable, units = result.retryable, result.retry_units
        if not units:
            break
        deadline = deadline or time.monotonic() + config.retry_window_s
        left = deadline - time.monotonic()
        if left <= 0:
            break
        pause = min(pause, left, RETRY_MAX_PAUSE_S)
        retry_pass += 1
        log.warning("caption: %d image(s) could not be read for a transient reason; retrying them in %.0f s "
                    "(pass %d, %.0f s of --retry-window-s left)", retryable, pause, retry_pass, left)
        time.sleep(pause)
        pause *= 2
    total = plan.total if plan.total is not None else plan.skipped + ok + errors + retryable
    held.check()  # a run robbed of its output deletes nothing
    storage.delete_dir(storage.join(output, LISTING_DIR))  # ours (any other run's went when we took the lease)
    wall = time.perf_counter() - started
    if retryable:
        log.warning("caption: %d image(s) could not be read for a transient reason (see the log); they are "
                    "not in the output yet: run the same command again to caption them", retryable)
    summary = CaptionSummary(total=total, ok=ok, errors=errors, skipped=plan.skipped, retryable=retryable,
                             wall_seconds=round(wall, 3),
                             images_per_s=round((ok + errors) / wall, 3) if wall > 0 else 0.0,
                             output=final, run_id=run_id, shards=written, settings=settings)
    if config.overwrite and retryable:  # not complete: the old output stays; --overwrite again resumes
        log.warning("caption: the new output is not complete, so it does not replace the old one yet; it waits "
                    "in %s for the same command again", staging)
        return summary
    if config.overwrite:
        _replace_output(final, staging, held)
    storage.write_json(storage.join(final, SUMMARY_FILE), summary.to_dict())  # written last
    return summary


# --- --overwrite: the new output is built in OUT/_overwrite/ and replaces the old one when complete ----------

OVERWRITE_DIR = "_overwrite"
"""``OUT/_overwrite/``: an --overwrite run's shards (and its ``_listing``, ``_shards``) until it has finished.
Readers of OUT never see it (dataset readers skip names that start with ``_``)."""
OVERWRITE_FILE = "_overwrite.json"
"""``OUT/_overwrite/_overwrite.json``: the settings of the pending replacement (written before any shard)."""
REPLACE_FILE = "_replace.json"
"""``OUT/_overwrite/_replace.json``: the old shards to delete and the new ones to move up, written before
the replacement starts, so a run killed during it can be finished by the next run, whatever its flags."""


def _start_or_resume_overwrite(staging: str, *, run_id: str, settings: dict) -> None:
    """Resume a pending --overwrite with the same settings; start afresh if there is none, or it had others."""
    marker = storage.join(staging, OVERWRITE_FILE)
    if storage.exists(marker):
        pending = storage.read_json(marker)
        if pending.get("settings") == json.loads(json.dumps(settings)):
            log.info("caption: resuming the unfinished --overwrite of run %s", pending.get("run_id"))
            return
        log.warning("caption: an unfinished --overwrite with other settings (run %s) is dropped",
                    pending.get("run_id"))
    storage.delete_dir(staging)
    storage.write_json(marker, {"run_id": run_id, "settings": settings})


def _replace_output(final: str, staging: str, held: lease.Lease) -> None:
    """The complete new output in ``staging`` replaces the old one in ``final``."""
    held.check()
    old = [storage.basename(u) for u in shard_uris(final)]
    new = [storage.basename(u) for u in shard_uris(staging)]
    markers = [storage.basename(u) for u in storage.list_files(storage.join(staging, SHARDS_DIR))]
    old_markers = [storage.basename(u) for u in storage.list_files(storage.join(final, SHARDS_DIR))]
    storage.write_json(storage.join(staging, REPLACE_FILE),
                       {"old": old, "new": new, "markers": markers, "old_markers": old_markers})
    _finish_replacement(final, held)


def _finish_replacement(final: str, held: lease.Lease) -> None:
    """Carry out ``REPLACE_FILE`` if there is one: move the new shards up, then delete the old ones.

    Every step can be repeated: a killed replacement is finished by the next run. Until it is, OUT can
    hold old and new rows of the same image; ``REPLACE_FILE`` says which shards are the old ones.
    """
    staging = storage.join(final, OVERWRITE_DIR)
    plan_uri = storage.join(staging, REPLACE_FILE)
    if not storage.exists(plan_uri):
        return
    held.check()
    plan = storage.read_json(plan_uri)
    log.info("caption: replacing the %d shard(s) of %s with the %d new one(s)", len(plan["old"]), final,
             len(plan["new"]))
    for name in plan["new"]:
        storage.move(storage.join(staging, name), storage.join(final, name))
    for name in plan["old"]:
        storage.delete_file(storage.join(final, name))
    for name in plan["markers"]:  # which input shards were read whole: the new run's word replaces the old
        storage.move(storage.join(staging, SHARDS_DIR, name), storage.join(final, SHARDS_DIR, name))
    for name in set(plan["old_markers"]) - set(plan["markers"]):
        storage.delete_file(storage.join(final, SHARDS_DIR, name))
    storage.delete_file(plan_uri)
    storage.delete_dir(staging)


@dataclass
class _Plan:
    """What a run has to do: its units of work (listing shard, row group) and what is done already."""

    units: list[tuple[str, int]]
    skipped: int
    """Images (samples) of the input already in the output."""
    total: int | None
    """Images in the input; None for shards, whose samples are counted as they are read."""
    done: str | None
    """Shards only: the digests of the samples the tasks skip (``DONE_FILE``)."""
    input_line: str
    done_line: str


def _plan_images(config: CaptionConfig, source: str, done: np.ndarray, *, listing: str) -> _Plan:
    """Loose images: every path listed once, minus those done, in listing shards of a decode task's rows."""
    paths = input_paths(config.input, source, config.extensions)
    total, skipped, units = write_listing(paths, done, listing, dedupe=source != "prefix",
                                          group_rows=_decode_rows(config.batch_size, config.rows_per_shard))
    if total == 0:
        storage.delete_dir(listing)
        raise ConfigError(f"--input {config.input}: no images (extensions: {','.join(config.extensions)})")
    return _Plan(units=units if total > skipped else [], skipped=skipped, total=total, done=None,
                 input_line=f"{total} images", done_line=f"{skipped} already captioned, {total - skipped} to do")


def _input_shards(config: CaptionConfig, source: str) -> list[str]:
    found = shards.list_shards(config.input, source, image_extensions=config.extensions)
    if not found:
        raise ConfigError(f"--input {config.input}: no {source} shards")
    if source == shards.PARQUET:  # the first file's schema: a mistyped column fails here, not per file
        shards.check_columns(found[0], image_column=config.shard_columns.image_column,
                             key_column=config.shard_columns.key_column)
    return found


def _plan_shards(input_shards: list[str], done_in_shards: dict[str, np.ndarray], *, output: str,
                 listing: str) -> _Plan:
    """Shards: a unit each, but none for a shard whose rows are all in the output; its task skips the
    samples of ``DONE_FILE`` (the digests of the shards not complete: the only ones it can meet)."""
    complete = complete_shards(output, input_shards, done_in_shards)
    todo = [s for s in input_shards if s not in complete]
    partly = [done_in_shards[s] for s in todo if s in done_in_shards]
    done = storage.join(listing, DONE_FILE)
    storage.write_bytes(done, digests_bytes(np.concatenate(partly) if partly else np.empty(0, dtype="S16")))
    _, _, units = write_listing(iter(todo), np.empty(0, dtype="S16"), listing, group_rows=1)
    skipped = sum(len(d) for d in done_in_shards.values())
    return _Plan(units=units, skipped=skipped, total=None, done=done,
                 input_line=f"{len(input_shards)} {shards.shard_kind(input_shards[0])} shard(s)",
                 done_line=f"{len(complete)} of them complete, {skipped} of their samples captioned already")


def print_summary(summary: CaptionSummary) -> None:
    """One table: images, ok, errors, skipped, wall time, images/s."""
    header = ("images", "ok", "errors", "skipped", "retry", "wall s", "images/s")
    values = (summary.total, summary.ok, summary.errors, summary.skipped, summary.retryable,
              f"{summary.wall_seconds:.1f}", f"{summary.images_per_s:.1f}")
    widths = [max(len(h), len(str(v))) for h, v in zip(header, values)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join(str(v).rjust(w) for v, w in zip(values, widths)))
    print(f"captions: {summary.output} ({summary.shards} new shard(s), run {summary.run_id})")


def _input_kind(config: CaptionConfig) -> str:
    """``prefix``, ``manifest``, ``image`` (loose images) or ``webdataset`` / ``parquet`` (shards)."""
    if shards.is_pattern(config.input):
        return shards.detect(config.input, config.extensions)
    kind = input_kind(config.input)
    if kind in ("prefix", "image"):
        return shards.detect(config.input, config.extensions) or kind
    return kind


def _validate_checkpoint(uri: str) -> dict:
    """Load the checkpoint once in the driver (seconds), so a bad one fails before any actor starts."""
    from capray.checkpoint import load_checkpoint

    model = load_checkpoint(uri, device="cpu")
    expected, produced = model.decoder.config.feature_dim, model.encoder.num_features
    if expected != produced:
        raise ConfigError(f"--checkpoint {model.uri}: the decoder expects {expected} feature channels, "
                          f"the encoder gives {produced}")
    spec = model.encoder.spec
    return {"uri": storage.normalize(model.uri), "encoder": spec.to_dict(), "image_size": spec.image_size}


def _run(config: CaptionConfig, *, units: list[tuple[str, int]], output: str, run_id: str, image_size: int,
         settings: dict, done: str | None, held: lease.Lease, retry_pass: int, retry_listing: str,
         progress: tuple[int | None, int]) -> ShardSink:
    """Caption the listed paths (or, with ``done``, the listed input shards) into shards in ``output``;
    returns the sink, which counts what was written (``ok``, ``errors``, ``shards``) and what is to be
    retried (``retryable`` images, in ``retry_units`` of ``retry_listing``). ``progress``: (images in
    all, None if unknown until the shards are read; images done before) for the progress lines."""
    import ray

    from capray.autoscaler import wait_for_resources
    from capray.connect import ensure_ray
    from capray.sizing import local_machine
    from capray.tasks import map_with_retries

    ensure_ray()
    machine = local_machine()
    shares = plan_pipeline(config.pool, machine=machine)
    plan = shares.actors
    log.info("caption: %s; decode tasks × %g CPU", plan.describe(), shares.read_cpus)
    if machine is None:  # a cluster: the first captioner may need a node that is not up yet
        wait_for_resources([plan.bundle()] * plan.min_actors, timeout_s=config.wait_timeout, what="caption")
    columns = tuple(settings["columns"])
    sink = ShardSink(output, run_id=run_id, metadata=shard_metadata(settings), rows_per_shard=config.rows_per_shard,
                     columns=columns, retry_pass=retry_pass, retry_listing=retry_listing,
                     retry_group_rows=_decode_rows(config.batch_size, config.rows_per_shard),
                     lease=(held.uri, held.token))
    # One block per unit (up to MAX_BLOCKS), so decode tasks spread over the nodes as they join. Ray's
    # file readers are not used: their listing task takes a whole CPU, which the captioners hold on a
    # small machine.
    ds = ray.data.from_items([{LISTING: uri, GROUP: group} for uri, group in units],
                             override_num_blocks=min(len(units), MAX_BLOCKS))
    if done is None:
        decode, kwargs = read_and_decode, {"image_size": image_size}
    else:
        decode, kwargs = read_shard, {
            "image_size": image_size, "done": done, "output": output,
            "rows": _decode_rows(config.batch_size, config.rows_per_shard),
            "image_extensions": config.extensions, "image_column": config.shard_columns.image_column,
            "key_column": config.shard_columns.key_column, "columns": columns}
    ds = map_with_retries(ds, decode, fn_kwargs=kwargs, batch_size=1, batch_format="numpy", num_cpus=shares.read_cpus,
                          max_retries=READ_TASK_RETRIES, retry_exceptions=[storage.TransientStorageError])
    what = f"caption (retry pass {retry_pass})" if retry_pass else "caption"
    total, done_before = progress
    with Progress(what, total=total, every_s=config.progress_s, done_before=done_before) as progress:
        ds = ds.map_batches(Captioner, fn_constructor_kwargs={
                                "checkpoint": settings["checkpoint"], "beam_size": config.beam_size,
                                "max_length": config.max_length, "threads": plan.threads,
                                "use_gpu": plan.num_gpus > 0, "warmup_batch": config.batch_size,
                                "progress": progress.counter},
                            compute=plan.strategy(), batch_size=config.batch_size,
                            batch_format="numpy", **plan.remote_args())
        ds.write_datasink(sink, ray_remote_args={"num_cpus": shares.write_cpus})
    log.debug("caption: Ray Data stats:\n%s", ds.stats())
    held.check()
    return sink


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
    paths = _listed(batch)
    return _rows(paths, reader.read_objects(paths, image_size=image_size))


def _listed(batch: dict[str, np.ndarray]) -> list[str]:
    """The paths of a decode task's listing units (listing shard, row group)."""
    paths = []
    for uri, group in zip(batch[LISTING], batch[GROUP]):
        fs, path = storage.resolve(str(uri))
        with fs.open_input_file(path) as f:
            paths += pq.ParquetFile(f).read_row_group(int(group), columns=[PATH]).column(PATH).to_pylist()
    return paths


def _rows(paths: list[str], decoded: reader.Decoded) -> dict[str, np.ndarray]:
    """The decode tasks' rows (``read_and_decode``'s columns) of images the reader decoded."""
    for error in np.array(decoded.errors, dtype=object)[decoded.transient]:
        log.warning("caption: %s (after the S3 client's retries); a re-run will caption it", error)
    return {PATH: np.array(paths, dtype=object), IMAGE: decoded.pixels, WIDTH: decoded.widths,
            HEIGHT: decoded.heights, ERROR: np.array(decoded.errors, dtype=object), RETRY: decoded.transient}


def read_shard(batch: dict[str, np.ndarray], *, image_size: int, done: str, output: str, rows: int,
               image_extensions: tuple[str, ...], image_column: str, key_column: str,
               columns: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    """CPU task: the input shards of listing units → decoded samples, ``rows`` at a time, skipping done ones.

    The columns of ``read_and_decode``, plus each of ``columns`` (text, None where a sample lacks it).
    A broken sample, and a shard that is missing, truncated or unreadable, is a row with ``error``.
    A shard read whole leaves its row count in ``output`` (``capray.listing.complete_shards``).
    """
    finished = load_digests(done)
    for shard in _listed(batch):
        seen = 0

        def to_do() -> Iterator[shards.Sample]:
            nonlocal seen
            for sample in shards.iter_samples(shard, image_extensions=image_extensions, image_column=image_column,
                                              key_column=key_column, columns=columns):
                seen += 1
                if not contains(finished, digests_of([sample.path]))[0]:
                    yield sample

        for samples, decoded in reader.decode_chunks(to_do(), content=reader.sample_content, rows=rows,
                                                     image_size=image_size):
            out = _rows([s.path for s in samples], decoded)
            for column in columns:
                out[column] = np.array([s.value(column) for s in samples], dtype=object)
            yield out
        write_marker(output, shard, seen)


_DECODED = frozenset({PATH, IMAGE, WIDTH, HEIGHT, ERROR, RETRY})
"""The columns a decode task always gives; any other is a kept source column."""


class Captioner:
    """Ray Data actor: encoder + decoder loaded once; a batch of decoded images → caption rows.

    torch is imported here, not at the top of the module: the decode and write workers never need it.
    """

    def __init__(self, checkpoint: str, *, beam_size: int, max_length: int, threads: int, use_gpu: bool,
                 warmup_batch: int = 0, progress=None):
        """``progress``: a ``capray.progress`` counter that each batch's finished images are added to."""
        self._model_thread = ModelThread()
        self.progress = progress
        self.max_batch = 0
        """Most images per forward pass: 0 (any) until an out-of-memory error halves it."""
        self.halved = False
        self._model_thread.run(self._load, checkpoint, threads=threads, use_gpu=use_gpu)
        self.beam_size, self.max_length = beam_size, max_length
        if warmup_batch:  # kernels are picked per shape on the first call: pay that before the first real batch
            size = self.encoder.spec.image_size
            self.caption(np.zeros((warmup_batch, size, size, 3), dtype=np.uint8))

    def _load(self, checkpoint: str, *, threads: int, use_gpu: bool) -> None:
        import torch

        from capray.checkpoint import load_checkpoint
        from capray.precision import EncoderStage

        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = load_checkpoint(checkpoint, device=self.device)
        self.encoder = EncoderStage(model.encoder, self.device, threads=threads)  # as prepare runs it
        self.decoder, self.vocab = model.decoder, model.vocab

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
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
        kept = [c for c in batch if c not in _DECODED]  # the source's kept columns (sharded input)
        unread = np.asarray(batch[RETRY], dtype=bool)  # not done: the run reads them again
        report(self.progress, int((~unread).sum()), errors=int((~ok & ~unread).sum()))
        return pa.table({
            PATH: pa.array([str(p) for p in batch[PATH]], pa.string()),
            CAPTION: pa.array(captions, pa.string()),
            SCORE: pa.array(scores, pa.float32(), mask=~ok),
            WIDTH: pa.array(batch[WIDTH], pa.int32(), mask=~ok),
            HEIGHT: pa.array(batch[HEIGHT], pa.int32(), mask=~ok),
            ERROR: pa.array([e or None for e in errors], pa.string()),
            RETRY: pa.array(batch[RETRY], pa.bool_()),
            **{c: pa.array([v if v is None else str(v) for v in batch[c]], pa.string()) for c in kept},
        }, schema=caption_schema(tuple(kept)).insert(len(CAPTION_SCHEMA), pa.field(RETRY, pa.bool_())))

    def caption(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        """uint8 (B, H, W, 3) → B captions and their mean log-probability per token.

        Runs in slices of ``max_batch`` images. On out-of-memory the slice size is halved for the rest
        of the actor's life (warned once) and the slice is redone, down to one image. One image that
        still does not fit raises: every image is resized to the same input, so none would fit, and
        error rows would mark them all done.
        """
        return self._model_thread.run(self._caption_in_slices, images)

    def _caption_in_slices(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        import torch

        texts: list[str] = []
        scores: list[np.ndarray] = []
        start = 0
        while start < len(images):
            size = min(self.max_batch or len(images), len(images) - start)
            try:
                part_texts, part_scores = self._caption(images[start:start + size])
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                self.max_batch = size // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                (log.debug if self.halved else log.warning)(
                    "caption: out of GPU memory with a batch of %d images; going on with batches of %d%s", size,
                    self.max_batch, "" if self.halved else " (further halvings are logged at debug level)")
                self.halved = True
                continue
            texts += part_texts
            scores.append(part_scores)
            start += size
        return texts, np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def _caption(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        import torch

        features = self.encoder(images)  # (B, P, E) fp16, as prepare stores them
        with torch.inference_mode():  # fp32 search, as evaluate and validation run it (capray.precision)
            decoded = self.decoder.beam_search(features.float(), beam_size=self.beam_size,
                                                   max_length=self.max_length, attention=False)
        texts = [self.vocab.decode(row) for row in decoded.tokens.tolist()]
        return texts, decoded.scores.float().cpu().numpy().astype(np.float32)


