"""``capray prepare``: run the frozen encoder once over captioned images into a sharded feature dataset.

One pipeline for all splits (Ray Data, streaming, so memory does not grow with the number of images):
records → read + decode + resize (CPU tasks) → Encoder actors (GPU or CPU) → Parquet shards per split.
An image that cannot be decoded is left out and listed with its error in ``prepare.json``.
Shards (``capray.shards``) are never read on the driver: a text pass (a task per shard, image bytes
skipped) counts their samples per split and the words of their train captions, which the driver merges
into the vocabulary; the encode pass then streams each shard once in a task that decodes, splits and
tokenizes its samples itself. The driver holds per-shard counts and the vocabulary, not a record per image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch
from ray.data.datasource import FilenameProvider

from capray import lease, reader, shards, storage
from capray.annotations import (SPLITS, AnnotationError, Record, caption_fields, carved_split, carves_val,
                                pair_sources, read_sources, shard_record, shard_text_columns, source_kind)
from capray.autoscaler import wait_for_resources
from capray.checkpoint import state_bytes
from capray.config import PrepareConfig, option_values
from capray.connect import ensure_ray
from capray.encoders import EncoderSpec, build_encoder
from capray.errors import ConfigError
from capray.formats import (CAPTIONS, ENCODER_STATE_FILE, FEATURES, IMAGE, IMAGE_ID, PREPARE_FILE, TOKENS,
                            VOCAB_FILE)
from capray.listing import contains, digests_bytes, digests_of, load_digests
from capray.precision import EncoderStage
from capray.progress import Progress, report
from capray.sizing import PipelinePlan, local_machine, plan_pipeline, read_cpus
from capray.tasks import MAX_BLOCKS, READ_TASK_RETRIES, ModelThread, map_with_retries
from capray.vocab import Vocabulary, word_counts

log = logging.getLogger(__name__)
ERRORS_DIR = "_errors"
"""Decode tasks leave one small JSONL per batch with failures here; merged into prepare.json."""
PIXELS = "pixels"
SPLIT = "split"
"""The column that routes a row to ``OUT/<split>/``; the writer makes it the folder, the files never hold it."""
BATCHES_PER_BLOCK = 2
"""Encoder batches per input block: the block count follows the data, not the nodes up at submit
time, so decode tasks spread over nodes that join later."""
SHARD = "shard"
RUN_FILE = "_prepare_run.json"
"""``OUT/_prepare_run.json``: the settings the rows in OUT's split folders were made with (see ``_run_record``),
written before the first row. A run with the same settings resumes: it keeps those rows and encodes the rest."""
DONE_FILE = "_prepare_done.npy"
"""``OUT/_prepare_done.npy``: the digests of the images a resumed run skips, for the tasks streaming shards."""
STREAM = "stream"
"""Input-block column: True on a row that names a whole shard (in ``IMAGE``), which its task streams,
splitting and tokenizing the samples itself; False on a record read from an annotation file."""


class Encoder:
    """Ray Data actor: loads the encoder once, turns batches of decoded images into fp16 features."""

    def __init__(self, spec: dict, *, use_gpu: bool, threads: int, progress=None):
        """``progress``: a ``capray.progress`` counter that each batch's images are added to."""
        self.progress = progress
        self._model_thread = ModelThread()
        self._model_thread.run(self._load, spec, use_gpu=use_gpu, threads=threads)

    def _load(self, spec: dict, *, use_gpu: bool, threads: int) -> None:
        device = torch.device("cuda" if use_gpu else "cpu")
        self.encoder = EncoderStage(build_encoder(EncoderSpec(**spec)), device, threads=threads)  # as caption runs it

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = self._model_thread.run(self._encode, batch)
        report(self.progress, encoded.num_rows)
        return encoded

    def _encode(self, batch: pa.Table) -> pa.Table:
        pixels = batch[PIXELS].combine_chunks().to_numpy_ndarray()  # (B, H, W, 3) uint8, zero-copy
        features = self.encoder(pixels).cpu().numpy()  # (B, P, E) fp16
        return batch.drop_columns([PIXELS]).append_column(
            FEATURES, pa.FixedShapeTensorArray.from_numpy_ndarray(features)).select(
            [IMAGE_ID, IMAGE, FEATURES, CAPTIONS, TOKENS, SPLIT])


def read_config_records(config: dict) -> list[Record]:
    """The records a prepare config names, given as a dict: a ``PrepareConfig``'s ``option_values``, or the
    ``config`` of a ``prepare.json`` (whose older versions lack the newer keys)."""
    annotations, images = config.get("annotations") or [], config.get("images") or []
    if isinstance(annotations, str):  # prepare.json of a dataset written before several files were allowed
        annotations, images = [annotations], [images] if images else []
    return read_sources(pair_sources(annotations, images), test_fraction=config.get("test_fraction", 0.0),
                        val_fraction=config.get("val_fraction", 0.0), image_column=config.get("image_column", ""),
                        key_column=config.get("key_column", ""), caption_column=config.get("caption_column", ""))


def _record_failures(failures: list[dict], errors_dir: str, progress=None) -> None:
    """One small JSONL of a task's decode failures in ``errors_dir`` (merged into prepare.json at the end),
    counted in the run's progress (``progress``: its counter, or None) as done images that are error
    rows, as caption counts them: a listed image is as finished as an encoded one."""
    report(progress, len(failures), len(failures))
    if failures:
        text = "".join(json.dumps(f) + "\n" for f in failures)
        storage.write_text(storage.join(errors_dir, f"{uuid.uuid4().hex}.jsonl"), text)


def read_and_decode(batch: pa.Table, *, image_size: int, errors_dir: str, progress=None) -> pa.Table:
    """CPU task: loose images read and decoded (``capray.reader``).

    A permanent failure (missing object, undecodable bytes) is recorded and the image left out; a
    transient one (throttling, a reset connection) raises, and Ray runs the task again.
    """
    decoded = reader.read_objects(batch[IMAGE].to_pylist(), image_size=image_size)
    _raise_transient(decoded)
    _record_failures([{"image_id": image_id, "image": uri, "error": error}
                      for image_id, uri, error in zip(batch[IMAGE_ID].to_pylist(), batch[IMAGE].to_pylist(),
                                                      decoded.errors) if error], errors_dir, progress)
    return _with_pixels(batch.filter(pa.array(decoded.ok)), decoded)


def _raise_transient(decoded: reader.Decoded) -> None:
    """Raise a transient read failure of the batch, if any: prepare never drops an image for one."""
    if decoded.transient.any():
        raise storage.TransientStorageError(decoded.errors[int(np.argmax(decoded.transient))])


def _with_pixels(rows: pa.Table, decoded: reader.Decoded) -> pa.Table:
    """``rows`` (those of the images that decoded, in order) with their pixels."""
    pixels = np.ascontiguousarray(decoded.pixels[decoded.ok])
    return rows.append_column(PIXELS, pa.FixedShapeTensorArray.from_numpy_ndarray(pixels))


def _blocks(table: pa.Table, shard_of_row: list[str], *, rows: int) -> list[pa.Table]:
    """The input blocks of a split: loose images ``rows`` at a time; the samples of shards grouped by
    shard, whole shards to a block (one stream each), at most ``MAX_BLOCKS`` blocks of either."""
    uris = table[IMAGE].to_pylist()
    loose = [i for i, (s, uri) in enumerate(zip(shard_of_row, uris)) if s == uri]
    blocks = []
    if loose:
        files = table.take(loose)
        n = max(1, min(MAX_BLOCKS, math.ceil(len(loose) / rows)))
        bounds = [i * len(loose) // n for i in range(n + 1)]
        blocks += [files.slice(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    names = sorted({s for s, uri in zip(shard_of_row, uris) if s != uri})
    if names:
        n = min(MAX_BLOCKS, len(names))
        block_of = {name: j * n // len(names) for j, name in enumerate(names)}
        members: list[list[int]] = [[] for _ in range(n)]
        for i, (s, uri) in enumerate(zip(shard_of_row, uris)):
            if s != uri:
                members[block_of[s]].append(i)
        blocks += [table.take(sorted(m, key=lambda i: shard_of_row[i])) for m in members]
    return blocks


@dataclass
class ShardText:
    """What the text pass learns of shards: samples and captions per split, the words of the train
    captions. Per shard in a task, then merged on the driver (``merge``): its size follows the
    vocabulary and the number of shards, never the number of images."""

    images: Counter = field(default_factory=Counter)
    """Samples per split; ``VAL_TO_TEST`` counts the val samples that ``--test-fraction``'s carve moves."""
    captions: Counter = field(default_factory=Counter)
    words: Counter = field(default_factory=Counter)
    """Word counts of the train captions (``capray.vocab.word_counts``)."""
    own_val: int = 0
    """Samples whose ``split`` field says val (the carve takes its test share from those)."""
    hashed: int = 0
    """Samples split by a hash of their key (no usable ``split`` field)."""
    objects: bool = False
    unknown: set = field(default_factory=set)
    """``split`` values that are no split (those samples are split by the hash)."""

    def merge(self, other: "ShardText") -> None:
        self.images.update(other.images)
        self.captions.update(other.captions)
        self.words.update(other.words)
        self.own_val += other.own_val
        self.hashed += other.hashed
        self.objects = self.objects or other.objects
        self.unknown |= other.unknown

    def per_split(self, counts: Counter, *, carve: bool) -> dict[str, int]:
        """``counts`` by split once the carve (``carve``) is decided."""
        moved = counts.get(VAL_TO_TEST, 0)
        return {"train": counts.get("train", 0), "val": counts.get("val", 0) + (0 if carve else moved),
                "test": counts.get("test", 0) + (moved if carve else 0)}

    def to_json(self) -> str:
        return json.dumps({"images": self.images, "captions": self.captions, "words": self.words,
                           "own_val": self.own_val, "hashed": self.hashed, "objects": self.objects,
                           "unknown": sorted(self.unknown)})

    @classmethod
    def from_json(cls, text: str) -> "ShardText":
        obj = json.loads(text)
        return cls(images=Counter(obj["images"]), captions=Counter(obj["captions"]), words=Counter(obj["words"]),
                   own_val=obj["own_val"], hashed=obj["hashed"], objects=obj["objects"], unknown=set(obj["unknown"]))


VAL_TO_TEST = "val>test"


def shard_samples(shard: str, *, settings: dict, images: bool) -> Iterator[tuple[shards.Sample, Record, bool]]:
    """A shard's samples with their records (before the carve) and whether their split came from the
    hash. ``settings``: ``shard_settings``; ``images=False`` reads the text only."""
    fields = caption_fields(settings["caption_column"])
    for sample in shards.iter_samples(shard, image_extensions=shards.IMAGE_EXTENSIONS,
                                      image_column=settings["image_column"], key_column=settings["key_column"],
                                      columns=shard_text_columns(settings["caption_column"]), images=images):
        record, from_hash = shard_record(sample, fields=fields, val_fraction=settings["val_fraction"],
                                         test_fraction=settings["test_fraction"])
        yield sample, record, from_hash


def shard_settings(config: PrepareConfig) -> dict:
    """The settings that make a shard sample's record: the same in the text pass and the encode pass."""
    return {"image_column": config.shard_columns.image_column, "key_column": config.shard_columns.key_column,
            "caption_column": config.caption_column, "val_fraction": config.val_fraction,
            "test_fraction": config.test_fraction}


def read_shard_text(shard: str, *, settings: dict) -> ShardText:
    """The text pass over one shard (a tar is streamed, its images skipped; a Parquet file's image
    column is not read)."""
    text = ShardText()
    for sample, record, from_hash in shard_samples(shard, settings=settings, images=False):
        moves = carved_split(record, from_hash=from_hash, carve=True, test_fraction=settings["test_fraction"]) \
            != record.split
        key = VAL_TO_TEST if moves else record.split
        text.images[key] += 1
        text.captions[key] += len(record.captions)
        if record.split == "train":
            text.words.update(word_counts(record.captions))
        text.own_val += not from_hash and record.split == "val"
        text.hashed += from_hash
        text.objects = text.objects or record.objects is not None
        if from_hash and sample.fields.get("split") is not None:
            text.unknown.add(str(sample.fields["split"]))
    return text


def count_shard_text(batch: pa.Table, *, settings: dict) -> pa.Table:
    """CPU task of the text pass: a block of shard URIs → one ``ShardText`` (as JSON) per shard."""
    texts = [read_shard_text(shard, settings=settings).to_json() for shard in batch[SHARD].to_pylist()]
    return pa.table({SHARD: batch[SHARD], "text": pa.array(texts, pa.string())})


def _read_shards_text(uris: list[str], *, settings: dict, machine) -> tuple[ShardText, dict[str, Counter]]:
    """The text pass over every shard, a task per shard (at most ``MAX_BLOCKS`` tasks), merged here; and
    each shard's samples per split (``ShardText.images``: a resumed run skips the shards it has done)."""
    import ray

    ds = ray.data.from_arrow([pa.table({SHARD: pa.array(part, pa.string())})
                              for part in _spread(uris, MAX_BLOCKS) if part])
    ds = map_with_retries(ds, count_shard_text, fn_kwargs={"settings": settings}, batch_size=None,
                          batch_format="pyarrow", num_cpus=read_cpus(machine),
                          max_retries=READ_TASK_RETRIES, retry_exceptions=[storage.TransientStorageError])
    merged, images = ShardText(), {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard, text in zip(batch[SHARD].to_pylist(), batch["text"].to_pylist()):
            one = ShardText.from_json(text)
            merged.merge(one)
            images[shard] = one.images
    return merged, images


def _spread(items: list, parts: int) -> list[list]:
    """``items`` in at most ``parts`` runs of consecutive items, as even as can be."""
    n = max(1, min(parts, len(items)))
    bounds = [i * len(items) // n for i in range(n + 1)]
    return [items[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def read_and_decode_stream(shard: str, *, image_size: int, errors_dir: str, rows: int, settings: dict,
                           splits: list[str], carve: bool, vocab: Vocabulary, max_caption_tokens: int,
                           done: str | None = None, progress=None) -> Iterator[pa.Table]:
    """One shard → the samples of ``splits`` decoded and tokenized, ``rows`` at a time, the shard
    streamed once. A broken sample, or a failure of the whole shard, is recorded (with its split) as
    ``read_and_decode`` records its failures. ``done``: the digests (``DONE_FILE``) of samples a resumed
    run has already, which are skipped."""
    finished = load_digests(done) if done else None

    def wanted() -> Iterator[tuple[shards.Sample, Record, str]]:
        for sample, record, from_hash in shard_samples(shard, settings=settings, images=True):
            split = carved_split(record, from_hash=from_hash, carve=carve, test_fraction=settings["test_fraction"])
            if split in splits and (finished is None or not contains(finished, digests_of([record.image]))[0]):
                yield sample, record, split

    failures = []
    for chunk, decoded in reader.decode_chunks(wanted(), content=lambda item: reader.sample_content(item[0]),
                                               rows=rows, image_size=image_size):
        failures += [{"image_id": record.image_id, "image": record.image, "error": error, "split": split}
                     for (_, record, split), error in zip(chunk, decoded.errors) if error]
        kept = [(record, split) for (_, record, split), ok in zip(chunk, decoded.ok) if ok]
        if kept:
            yield _with_pixels(pa.table({
                IMAGE_ID: pa.array([r.image_id for r, _ in kept], pa.string()),
                IMAGE: pa.array([r.image for r, _ in kept], pa.string()),
                CAPTIONS: pa.array([list(r.captions) for r, _ in kept], pa.list_(pa.string())),
                TOKENS: pa.array([[vocab.encode(c, max_length=max_caption_tokens) for c in r.captions]
                                  for r, _ in kept], pa.list_(pa.list_(pa.int32()))),
                SPLIT: pa.array([split for _, split in kept], pa.string())}), decoded)
    _record_failures(failures, errors_dir, progress)


def decode_block(block: pa.Table, *, image_size: int, errors_dir: str, batch_size: int, image_column: str,
                 key_column: str, stream: dict | None = None, progress=None) -> Iterator[pa.Table]:
    """CPU task: an input block (see ``_blocks``) → its images decoded, a few batches at a time.

    A block of whole shards (``STREAM``) streams each (``read_and_decode_stream``; ``stream`` holds
    what its samples need to become rows: the settings, the splits wanted, the carve, the vocabulary, the
    digests of samples done before). ``progress``: the run's progress counter (error rows are added to it).
    """
    if not block.num_rows:
        return
    rows = BATCHES_PER_BLOCK * batch_size
    if block[STREAM][0].as_py():
        vocab = Vocabulary(stream["vocab"])
        for shard in block[IMAGE].to_pylist():
            yield from read_and_decode_stream(
                shard, image_size=image_size, errors_dir=errors_dir, rows=rows, settings=stream["settings"],
                splits=stream["splits"], carve=stream["carve"], vocab=vocab,
                max_caption_tokens=stream["max_caption_tokens"], done=stream.get("done"), progress=progress)
        return
    block = block.drop_columns([STREAM])
    first = block[IMAGE][0].as_py()
    if shards.shard_of(first) == first:  # loose images
        for start in range(0, block.num_rows, batch_size):
            yield read_and_decode(block.slice(start, batch_size), image_size=image_size, errors_dir=errors_dir,
                                  progress=progress)
        return
    shard_of_row = [shards.shard_of(uri) for uri in block[IMAGE].to_pylist()]
    for shard in dict.fromkeys(shard_of_row):
        rows_of_shard = block.take([i for i, s in enumerate(shard_of_row) if s == shard])
        yield from read_and_decode_shard(rows_of_shard, image_size=image_size, errors_dir=errors_dir, rows=rows,
                                         image_column=image_column, key_column=key_column, progress=progress)


def read_and_decode_shard(block: pa.Table, *, image_size: int, errors_dir: str, rows: int,
                          image_column: str, key_column: str, progress=None) -> Iterator[pa.Table]:
    """The records of one shard → its samples decoded, ``rows`` at a time.

    The shard is streamed once; a sample that is broken or missing, and a shard-level failure (a
    record named by the shard itself), is recorded as ``read_and_decode`` records its failures.
    """
    wanted = {uri: i for i, uri in enumerate(block[IMAGE].to_pylist())}
    if not wanted:
        return
    shard = shards.shard_of(next(iter(wanted)))

    def named() -> Iterator[tuple[int, shards.Sample]]:
        for sample in shards.iter_samples(shard, image_extensions=shards.IMAGE_EXTENSIONS,
                                          image_column=image_column, key_column=key_column):
            index = wanted.pop(sample.path, None)  # popped: a key the shard repeats is read once
            if index is not None:
                yield index, sample

    failures = []
    for chunk, decoded in reader.decode_chunks(named(), content=lambda item: reader.sample_content(item[1]),
                                               rows=rows, image_size=image_size):
        failures += [{"image_id": s.path, "image": s.path, "error": error}
                     for (_, s), error in zip(chunk, decoded.errors) if error]
        kept = [i for (i, _), ok in zip(chunk, decoded.ok) if ok]
        if kept:
            yield _with_pixels(block.take(kept), decoded)
    failures += [{"image_id": uri, "image": uri, "error": "not in its shard any more"} for uri in wanted]
    _record_failures(failures, errors_dir, progress)


def prepare(config: PrepareConfig) -> dict:
    """Write ``OUT/{split}/part-*.parquet``, ``vocab.json``, ``encoder.pt`` and ``prepare.json``.

    Everything that can be checked is checked before the previous dataset is touched: the
    annotations, the vocabulary, the encoder and its weights, the actors' resources. ``prepare.json``
    (the "done" marker) is removed first and written last. ``--splits`` rewrites only the named splits: the
    others, and their record in ``prepare.json``, stay as they are (see ``_kept_splits``). A run with the
    settings of the one that wrote the named splits (``RUN_FILE``) resumes it unless ``--overwrite``: their
    rows and listed errors stay, and only the other images are read and encoded. The run holds
    ``out``'s lease throughout: a second prepare into it while this one lives is refused
    (``lease.OutputBusy``, exit 2).
    """
    started = time.perf_counter()
    for uri in (*config.annotations, config.out):
        storage.check_bucket(uri)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    with lease.acquire(config.out, run_id=run_id, timeout_s=config.lease_timeout_s, what="prepare run"):
        return _prepare_holding(config, started=started)


def _prepare_holding(config: PrepareConfig, *, started: float) -> dict:
    """``prepare`` while this run holds the output's lease (``capray.lease``)."""
    files, shard_uris = _sources(config)
    # Annotation files are read here, whole (they are JSON documents); their carve waits for the shards'.
    file_records = read_sources(files, test_fraction=0.0) if files else []
    encoder = build_encoder(config.encoder)  # fails fast (weights, names) before any Ray work
    spec, num_regions, num_features = encoder.spec, encoder.num_regions, encoder.num_features
    encoder_state = state_bytes({k: v.detach().cpu() for k, v in encoder.state_dict().items()})
    del encoder
    text, images_of_shard = ShardText(), {}
    if shard_uris:  # annotation files alone are checked through before Ray starts
        ensure_ray()
        text, images_of_shard = _read_shards_text(shard_uris, settings=shard_settings(config), machine=local_machine())
        log.info("prepare: %d samples in %d shard(s)", sum(text.images.values()), len(shard_uris))
        if text.unknown:
            log.warning("split values %s are none of %s: those samples are split by a hash of their key",
                        ", ".join(sorted(text.unknown)[:5]), ", ".join(SPLITS))
    carve = carves_val(config.test_fraction, any_val=text.own_val > 0 or any(r.split == "val" for r in file_records),
                       any_hashed=text.hashed > 0, sources=config.annotations)
    every_record = [replace(r, split=carved_split(r, from_hash=False, carve=carve, test_fraction=config.test_fraction))
                    for r in file_records]
    records = [r for r in every_record if r.split in config.splits]
    shard_images, shard_captions = text.per_split(text.images, carve=carve), text.per_split(text.captions, carve=carve)
    counts = {s: sum(r.split == s for r in records) + shard_images[s] for s in config.splits}
    train_counts = word_counts(c for r in every_record if r.split == "train" for c in r.captions)
    train_counts.update(text.words)
    if not shard_captions["train"] and not any(r.captions for r in every_record if r.split == "train"):
        raise ConfigError(f"{', '.join(config.annotations)}: the train split has no captions to build a "
                          "vocabulary from")
    vocab = Vocabulary.from_counts(train_counts, size=config.vocab_size, min_count=config.min_word_count)
    previous, kept = _kept_splits(config, spec=spec, vocab=vocab)
    if kept:  # the kept splits' tokens are ids of the dataset's vocabulary: it stays
        vocab = Vocabulary.load(storage.join(config.out, VOCAB_FILE))

    ensure_ray()
    machine = local_machine()
    shares = plan_pipeline(config.pool, machine=machine)
    plan = shares.actors
    if machine is None:  # a cluster: the first encoder actor may need a node that is not up yet
        wait_for_resources([plan.bundle()] * plan.min_actors, timeout_s=config.wait_timeout, what="prepare")

    # Every check passed: only now are the named splits replaced, the "done" marker first. With splits
    # kept, the marker first shrinks to them (a dataset of the kept splits stays usable throughout).
    split_of = {r.image: r.split for r in every_record}
    kept_errors = [e for e in (previous or {}).get("errors", []) if _error_split(e, split_of) in kept]
    marker, run_file = storage.join(config.out, PREPARE_FILE), storage.join(config.out, RUN_FILE)
    errors_dir = storage.join(config.out, ERRORS_DIR)
    record = _run_record(config, spec=spec, carve=carve, encoder_state=encoder_state)
    resumed = not config.overwrite and _resumable(config.out, record, vocab=vocab)
    if resumed:  # the errors of the named splits that the marker recorded go where this run's go
        _record_failures([e for e in (previous or {}).get("errors", []) if _error_split(e, split_of) not in kept],
                         errors_dir)
    else:
        storage.delete_file(run_file)  # first: a dataset half replaced is never resumed
    if kept:
        storage.write_json(marker, _summary_of_splits(previous, kept, kept_errors))
    else:
        storage.delete_file(marker)
    if not resumed:
        for split in config.splits:
            storage.delete_dir(storage.join(config.out, split))
        storage.delete_dir(errors_dir)
        if not kept:
            storage.write_bytes(storage.join(config.out, ENCODER_STATE_FILE), encoder_state)
            vocab.save(storage.join(config.out, VOCAB_FILE))
        storage.write_json(run_file, record)
    done, done_per_shard = _done_images(config.out, config.splits, errors_dir) if resumed else (np.empty(0, "S16"), {})
    todo_shards = [s for s in shard_uris if done_per_shard.get(s, 0) < sum(
        text.per_split(images_of_shard[s], carve=carve)[split] for split in config.splits)]
    todo_records = records
    if len(done):
        todo_records = [r for r, skip in zip(records, contains(done, digests_of(r.image for r in records))) if not skip]
    total = sum(counts.values())
    log.info("prepare: %d images (%s), encoder %s @ %d px → %s; %s; decode tasks × %g CPU%s",
             total, ", ".join(f"{s} {n}" for s, n in counts.items()), spec.name,
             spec.image_size, config.out, plan.describe(), shares.read_cpus,
             f"; kept as they are: {', '.join(kept)}" if kept else "")
    if resumed:
        log.info("prepare: resuming: %d images encoded or listed as errors already (%d of %d shard(s) done), "
                 "%d to do", len(done), len(shard_uris) - len(todo_shards), len(shard_uris), total - len(done))
    stream = {"settings": shard_settings(config), "splits": list(config.splits), "carve": carve,
              "vocab": vocab.words, "max_caption_tokens": config.max_caption_tokens, "done": None}
    if len(done) and todo_shards:
        stream["done"] = storage.join(config.out, DONE_FILE)
        storage.write_bytes(stream["done"], digests_bytes(done))
    encode_started = time.perf_counter()
    with Progress("prepare", total=total, every_s=config.progress_s, done_before=len(done)) as progress:
        _encode(todo_records, todo_shards, vocab, spec=spec, config=config, shares=shares, errors_dir=errors_dir,
                stream=stream, progress=progress.counter)
    encode_seconds = time.perf_counter() - encode_started
    splits = {}
    for split in config.splits:
        if counts[split]:
            splits[split] = {"images": count_rows(storage.join(config.out, split)),
                             "captions": sum(len(r.captions) for r in records if r.split == split)
                             + shard_captions[split]}
    log.info("prepare: %s in %.1f s", ", ".join(f"{s} {v['images']}" for s, v in splits.items()), encode_seconds)
    errors = [{**e, "split": e.get("split") or split_of.get(e["image"])} for e in _collect_errors(errors_dir)]
    total_written = sum(s["images"] for s in splits.values())
    if total_written + len(errors) != total:  # every image is a row or a listed error, nothing else
        raise RuntimeError(f"prepare: {total} images in, {total_written} written + {len(errors)} "
                           "failed out; prepare.json not written")
    if stream["done"]:
        storage.delete_file(stream["done"])
    every_split = {**kept, **splits}
    splits = {s: every_split[s] for s in SPLITS if s in every_split}
    errors = sorted([*kept_errors, *errors], key=lambda f: f["image"])
    summary = {
        "encoder": spec.to_dict(),
        "num_regions": num_regions,
        "num_features": num_features,
        "vocab_size": len(vocab),
        "splits": splits,
        "num_images": sum(s["images"] for s in splits.values()),
        "num_errors": len(errors),
        # ground truth for evaluate's object accuracy, in the new splits or the kept ones
        "objects": any(r.objects is not None for r in records) or (text.objects and any(shard_images.values()))
        or bool(kept and previous.get("objects")),
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 2),
        "encode_seconds": round(encode_seconds, 2),
        "images_per_s": round((total - len(done)) / max(encode_seconds, 1e-9), 2),
        "resumed": len(done),
        "actors": {"min": plan.min_actors, "max": plan.max_actors},
        "batch_size": config.batch_size,
        "out": config.out,
        "config": {**{k: v for k, v in option_values(config).items() if k != "encoder"}, "splits": list(splits)},
    }
    storage.write_json(marker, summary)  # written last: the "done" marker
    return summary


ENCODING_SETTINGS = ("vocab_size", "min_word_count", "max_caption_tokens")
"""prepare options besides the encoder that change what a split's rows hold: a split is only kept
beside others made with the same ones."""


def _kept_splits(config: PrepareConfig, *, spec: EncoderSpec, vocab: Vocabulary) -> tuple[dict | None, dict]:
    """The dataset's ``prepare.json`` (None if there is none) and the splits it records that ``--splits``
    leaves as they are: {split: its record}.

    Splits kept beside rewritten ones must be alike: the same encoder (spec, resolved) and encoding
    settings, and the vocabulary their tokens are ids of. The vocabulary is built from the train split:
    with train kept it stays the dataset's; with train rewritten the new one must equal it. Anything
    else would make a dataset whose splits disagree, so it is refused (``ConfigError``) before the
    dataset is touched, naming what differs.
    """
    marker = storage.join(config.out, PREPARE_FILE)
    previous = storage.read_json(marker) if storage.exists(marker) else None
    if previous is None:
        return None, {}
    kept = {s: record for s, record in previous.get("splits", {}).items() if s not in config.splits}
    if not kept:
        return previous, {}
    recorded = previous.get("config", {})
    before, now = previous.get("encoder") or {}, spec.to_dict()
    differ = [f"--encoder.{name.replace('_', '-')} ({before.get(name)} → {now[name]})"
              for name in now if before.get(name) != now[name]]
    differ += [f"--{name.replace('_', '-')} ({recorded.get(name)} → {getattr(config, name)})"
               for name in ENCODING_SETTINGS if recorded.get(name) != getattr(config, name)]
    vocab_uri = storage.join(config.out, VOCAB_FILE)
    if not differ and "train" in config.splits and Vocabulary.load(vocab_uri) != vocab:
        differ.append("the vocabulary (the train captions changed)")
    if differ:
        raise ConfigError(f"--splits {','.join(config.splits)} keeps {', '.join(kept)} in {config.out}, but "
                          f"{'; '.join(differ)} would differ from what they were made with; prepare every split "
                          f"(--splits {','.join(SPLITS)}) or keep the settings")
    return previous, kept


def _error_split(error: dict, split_of: dict[str, str]) -> str | None:
    """The split of a ``prepare.json`` error (older files do not record it: then by the annotations)."""
    return error.get("split") or split_of.get(error["image"])


def _summary_of_splits(previous: dict, kept: dict, errors: list[dict]) -> dict:
    """``prepare.json`` cut down to the kept splits (and their errors)."""
    return {**previous, "splits": kept, "num_images": sum(s["images"] for s in kept.values()),
            "num_errors": len(errors), "errors": errors,
            "config": {**previous.get("config", {}), "splits": list(kept)}}


RUN_SETTINGS = ("annotations", "images", "test_fraction", "val_fraction", "image_column", "key_column",
                "caption_column", *ENCODING_SETTINGS)
"""prepare options that decide which images become rows and what the rows hold (``_run_record``)."""


def _run_record(config: PrepareConfig, *, spec: EncoderSpec, carve: bool, encoder_state: bytes) -> dict:
    """What the rows of a run are made with (``RUN_FILE``): the settings, the encoder's spec and weights (a
    digest), and whether val gave test its images. With the vocabulary, all a resumed run must share."""
    options = option_values(config)
    record = {name: options[name] for name in RUN_SETTINGS}
    record.update(encoder=spec.to_dict(), encoder_sha256=hashlib.sha256(encoder_state).hexdigest(), carve=carve)
    return json.loads(json.dumps(record))  # as it reads back


def _resumable(out: str, record: dict, *, vocab: Vocabulary) -> bool:
    """Whether the rows in ``out``'s split folders were made as this run would make them: the same
    ``RUN_FILE`` and vocabulary. A dataset from before ``RUN_FILE`` existed is made again."""
    run_file, vocab_file = storage.join(out, RUN_FILE), storage.join(out, VOCAB_FILE)
    return (storage.exists(run_file) and storage.read_json(run_file) == record and storage.exists(vocab_file)
            and Vocabulary.load(vocab_file) == vocab)


def _done_images(out: str, splits: tuple[str, ...], errors_dir: str) -> tuple[np.ndarray, Counter]:
    """What a resumed run has already: the sorted digests of the images that are rows in the ``splits``
    folders or listed in ``errors_dir``, and how many of them each shard holds.

    Only the image column of each feature file is read. A file that is not Parquet (a local write cut
    short by a kill: Ray's writer writes in place) is deleted, and its images are encoded again."""
    import pyarrow.parquet as pq

    def images_of(uri: str) -> list[str]:
        fs, path = storage.resolve(uri)
        try:
            return pq.read_table(path, filesystem=fs, columns=[IMAGE]).column(IMAGE).to_pylist()
        except pa.ArrowInvalid as exc:
            log.warning("prepare: %s is not a whole Parquet file (%s): deleted, its images are encoded again",
                        uri, str(exc).splitlines()[0][:120])
            storage.delete_file(uri)
            return []

    digests, per_shard = [], Counter()
    files = [uri for split in splits for uri in storage.list_files(storage.join(out, split), extensions=("parquet",))]
    failed = [json.loads(line)["image"] for uri in storage.list_files(errors_dir, extensions=("jsonl",))
              for line in storage.read_text(uri).splitlines() if line.strip()]
    def add(images: list[str]) -> None:
        digests.append(digests_of(images))
        per_shard.update(shard for image in images if (shard := shards.shard_of(image)) != image)  # shard samples

    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(files), 64):  # a few files' image names in memory at a time
            for images in pool.map(images_of, files[start:start + 64]):
                add(images)
    add(list(dict.fromkeys(failed)))
    done = np.concatenate(digests) if digests else np.empty(0, "S16")
    return np.sort(done), per_shard


def _sources(config: PrepareConfig) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The annotation files (with their images roots) and the shard URIs (listed, each once) of a config."""
    files, shard_uris, source_of = [], [], {}
    for uri, images in pair_sources(config.annotations, config.images):
        kind = source_kind(uri, images)
        if kind is None:
            files.append((uri, images))
            continue
        listed = shards.list_shards(uri, kind)
        if not listed:
            raise AnnotationError(f"{uri}: no {kind} shards")
        for shard in listed:
            other = source_of.setdefault(shard, uri)
            if other != uri:
                raise AnnotationError(f"{shard} is in {other} and in {uri}: each image may come from one "
                                      "annotation source only")
            shard_uris.append(shard)
    return files, shard_uris


def _encode(records: list[Record], shard_uris: list[str], vocab: Vocabulary, *, spec: EncoderSpec,
            config: PrepareConfig, shares: PipelinePlan, errors_dir: str, stream: dict, progress=None) -> None:
    """Every split in one pipeline, so the encoder actors start once: rows carry their split, and the
    Parquet writer files each row under ``OUT/<split>/`` (the split is the folder, not a column).

    The input blocks are the annotation files' records (``_blocks``) and the shards, a shard per block
    (at most ``MAX_BLOCKS``), which their tasks stream (``STREAM``)."""
    import ray

    table = pa.table({
        IMAGE_ID: pa.array([r.image_id for r in records], pa.string()),
        IMAGE: pa.array([r.image for r in records], pa.string()),
        CAPTIONS: pa.array([list(r.captions) for r in records], pa.list_(pa.string())),
        TOKENS: pa.array([[vocab.encode(c, max_length=config.max_caption_tokens) for c in r.captions]
                          for r in records], pa.list_(pa.list_(pa.int32()))),
        SPLIT: pa.array([r.split for r in records], pa.string()),
    })
    blocks = [b.append_column(STREAM, pa.array([False] * b.num_rows, pa.bool_()))
              for b in _blocks(table, [shards.shard_of(r.image) for r in records],
                               rows=BATCHES_PER_BLOCK * config.batch_size) if b.num_rows]
    for part in _spread(shard_uris, MAX_BLOCKS):
        if part:
            blocks.append(pa.table({
                IMAGE_ID: pa.array(part, pa.string()), IMAGE: pa.array(part, pa.string()),
                CAPTIONS: pa.array([[]] * len(part), pa.list_(pa.string())),
                TOKENS: pa.array([[]] * len(part), pa.list_(pa.list_(pa.int32()))),
                SPLIT: pa.array([""] * len(part), pa.string()), STREAM: pa.array([True] * len(part), pa.bool_())}))
    if not blocks:
        return
    num_blocks = len(blocks)
    ds = ray.data.from_arrow(blocks)
    ds = map_with_retries(ds, decode_block, fn_kwargs={
                              "image_size": spec.image_size, "errors_dir": errors_dir, "batch_size": config.batch_size,
                              "image_column": config.shard_columns.image_column,
                              "key_column": config.shard_columns.key_column, "stream": stream,
                              "progress": progress},
                          batch_size=None, batch_format="pyarrow", num_cpus=shares.read_cpus,
                          max_retries=READ_TASK_RETRIES, retry_exceptions=[storage.TransientStorageError])
    plan = shares.actors
    if plan.min_actors == plan.max_actors and plan.min_actors > num_blocks:  # a fixed pool: no idle actors
        plan = replace(plan, min_actors=num_blocks, max_actors=num_blocks)
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={"spec": spec.to_dict(), "use_gpu": plan.num_gpus > 0,
                                                       "threads": plan.threads, "progress": progress},
                        compute=plan.strategy(), batch_size=config.batch_size, batch_format="pyarrow",
                        **plan.remote_args())
    with warnings.catch_warnings():
        # Ray 2.60 deprecates min_rows_per_file with partition_cols (support ends in a later Ray) in favour
        # of a repartition by split: a shuffle of every feature row. Pinned Ray keeps the streaming write.
        warnings.filterwarnings("ignore", message=".*min_rows_per_file.*partition_cols", category=DeprecationWarning)
        ds.write_parquet(config.out, partition_cols=[SPLIT], partitioning_flavor=None,
                         min_rows_per_file=config.rows_per_file, filename_provider=_PartNames(),
                         ray_remote_args={"num_cpus": shares.write_cpus})


def count_rows(uri: str) -> int:
    """Rows in the Parquet files under ``uri``, from their footers."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    if not storage.exists(uri):
        return 0
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows()


def check_split(features: str, split: str, info: dict) -> None:
    """Raise ``ConfigError`` (one line) if a split's Parquet files cannot be read or hold another number
    of rows than ``prepare.json`` (``info``) records. Reads only the files' footers."""
    uri = storage.join(features, split)
    try:
        rows = count_rows(uri)
    except pa.ArrowInvalid as exc:
        raise ConfigError(f"{uri}: a feature file is damaged ({' '.join(str(exc).split())[:200]}); "
                          f"run capray prepare --splits {split} again") from exc
    except OSError as exc:
        raise storage.classified(f"cannot read {uri}", exc) from exc
    recorded = info["splits"].get(split, {}).get("images", 0)
    if rows != recorded:
        raise ConfigError(f"{uri}: {rows} feature rows, but {PREPARE_FILE} records {recorded}: the dataset changed "
                          f"after prepare; run capray prepare --splits {split} again")


def load_prepare_info(features: str) -> dict:
    """``prepare.json`` of a feature dataset; a clear error when the folder is not one."""
    storage.check_bucket(features)
    uri = storage.join(features, PREPARE_FILE)
    if not storage.exists(uri):
        raise ConfigError(f"{features}: not a feature dataset (no {PREPARE_FILE}; run capray prepare first)")
    return storage.read_json(uri)


def print_summary(summary: dict) -> None:
    print(f"\nfeatures: {summary['out']}  ({summary['num_regions']} regions × {summary['num_features']} "
          f"channels, {summary['encoder']['name']} @ {summary['encoder']['image_size']} px)")
    print(f"{'split':<8}{'images':>9}{'captions':>10}")
    for split, s in summary["splits"].items():
        print(f"{split:<8}{s['images']:>9}{s['captions']:>10}")
    print(f"skipped (undecodable): {summary['num_errors']}; {summary['images_per_s']:.1f} images/s; "
          f"{summary['seconds']:.1f} s in all")
    for error in summary["errors"][:5]:
        print(f"  {error['image']}: {error['error']}")


class _PartNames(FilenameProvider):
    """Parquet files named ``part-<write>-<task>.parquet`` (unique per write and task, deterministic)."""

    def __init__(self):
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.parquet"


def _collect_errors(errors_dir: str) -> list[dict]:
    """Merge the decode tasks' failure files (a retried task may have written one twice)."""
    seen: dict[str, dict] = {}
    for uri in storage.list_files(errors_dir, extensions=("jsonl",)):
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                failure = json.loads(line)
                seen[failure["image"]] = failure
    storage.delete_dir(errors_dir)
    return sorted(seen.values(), key=lambda f: f["image"])
