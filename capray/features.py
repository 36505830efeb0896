"""``capray prepare``: run the frozen encoder once over captioned images into a sharded feature dataset.

One pipeline for all splits (Ray Data, streaming, so memory does not grow with the number of images):
records → read + decode + resize (CPU tasks) → Encoder actors (GPU or CPU) → Parquet shards per split.
An image that cannot be decoded is left out and listed with its error in ``prepare.json``.
Records from shards (``capray.shards``) are read a shard per task: the task streams its shard once and
decodes the samples the records name.
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import torch
from ray.data.datasource import FilenameProvider

from capray import shards, storage
from capray.annotations import SPLITS, Record, pair_sources, read_sources
from capray.autoscaler import wait_for_resources
from capray.checkpoint import state_bytes
from capray.config import PrepareConfig
from capray.connect import ensure_ray
from capray.encoders import EncoderSpec, build_encoder
from capray.errors import ConfigError
from capray.formats import (CAPTIONS, ENCODER_STATE_FILE, FEATURES, IMAGE, IMAGE_ID, PREPARE_FILE, TOKENS,
                            VOCAB_FILE)
from capray.images import ImageDecodeError, decode_image
from capray.precision import EncoderStage
from capray.sizing import ActorPlan, local_machine, plan_actors
from capray.tasks import ModelThread, map_with_retries
from capray.vocab import Vocabulary

log = logging.getLogger(__name__)
ERRORS_DIR = "_errors"
"""Decode tasks leave one small JSONL per batch with failures here; merged into prepare.json."""
PIXELS = "pixels"
SPLIT = "split"
"""The column that routes a row to ``OUT/<split>/``; the writer makes it the folder, the files never hold it."""
DECODE_CPUS = 0.25
"""CPU share of a decode task: decoding a small image is light, and a share unlike the actors' keeps
Ray Data from fusing decoding into the (GPU) actors, so decoding scales on CPU nodes."""
DECODE_TASK_RETRIES = 10
"""Ray retries of a decode task whose image read failed for a transient reason (after the S3 client's
own retries). Past that the job fails (exit 1) without ``prepare.json``: it never shrinks the
training set silently."""
BATCHES_PER_BLOCK = 2
"""Encoder batches per input block: the block count follows the data, not the nodes up at submit
time, so decode tasks spread over nodes that join later."""
MAX_BLOCKS = 10_000


class Encoder:
    """Ray Data actor: loads the encoder once, turns batches of decoded images into fp16 features."""

    def __init__(self, spec: dict, *, use_gpu: bool, threads: int):
        self._model_thread = ModelThread()
        self._model_thread.run(self._load, spec, use_gpu=use_gpu, threads=threads)

    def _load(self, spec: dict, *, use_gpu: bool, threads: int) -> None:
        device = torch.device("cuda" if use_gpu else "cpu")
        self.encoder = EncoderStage(build_encoder(EncoderSpec(**spec)), device, threads=threads)  # as caption runs it

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._model_thread.run(self._encode, batch)

    def _encode(self, batch: pa.Table) -> pa.Table:
        pixels = batch[PIXELS].combine_chunks().to_numpy_ndarray()  # (B, H, W, 3) uint8, zero-copy
        features = self.encoder(pixels).cpu().numpy()  # (B, P, E) fp16
        return batch.drop_columns([PIXELS]).append_column(
            FEATURES, pa.FixedShapeTensorArray.from_numpy_ndarray(features)).select(
            [IMAGE_ID, IMAGE, FEATURES, CAPTIONS, TOKENS, SPLIT])


def read_config_records(config: dict) -> list[Record]:
    """The records a prepare config names, given as a dict: ``asdict(PrepareConfig)``, or the ``config``
    of a ``prepare.json`` (whose older versions lack the newer keys)."""
    annotations, images = config.get("annotations") or [], config.get("images") or []
    if isinstance(annotations, str):  # prepare.json of a dataset written before several files were allowed
        annotations, images = [annotations], [images] if images else []
    return read_sources(pair_sources(annotations, images), test_fraction=config.get("test_fraction", 0.0),
                        val_fraction=config.get("val_fraction", 0.0), image_column=config.get("image_column", ""),
                        key_column=config.get("key_column", ""), caption_column=config.get("caption_column", ""))


def _record_failures(failures: list[dict], errors_dir: str) -> None:
    """One small JSONL of a task's decode failures in ``errors_dir`` (merged into prepare.json at the end)."""
    if failures:
        text = "".join(json.dumps(f) + "\n" for f in failures)
        storage.write_text(storage.join(errors_dir, f"{uuid.uuid4().hex}.jsonl"), text)


def read_and_decode(batch: pa.Table, *, image_size: int, errors_dir: str) -> pa.Table:
    """CPU task: read each image's bytes and decode it.

    A permanent failure (missing object, undecodable bytes) is recorded and the image left out; a
    transient one (throttling, a reset connection) raises, and Ray runs the task again.
    """
    keep, pixels, failures = [], [], []
    uris = batch[IMAGE].to_pylist()
    for i, (image_id, uri, data) in enumerate(zip(batch[IMAGE_ID].to_pylist(), uris, storage.read_many(uris))):
        try:
            if isinstance(data, Exception):  # a transient one is not caught here: Ray runs the task again
                raise data
            array, _, _ = decode_image(data, image_size)
        except (ImageDecodeError, storage.StorageError) as exc:
            failures.append({"image_id": image_id, "image": uri, "error": str(exc)})
            continue
        keep.append(i)
        pixels.append(array)
    _record_failures(failures, errors_dir)
    stacked = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    return batch.take(keep).append_column(PIXELS, pa.FixedShapeTensorArray.from_numpy_ndarray(stacked))


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


def decode_block(block: pa.Table, *, image_size: int, errors_dir: str, batch_size: int, image_column: str,
                 key_column: str) -> Iterator[pa.Table]:
    """CPU task: an input block (see ``_blocks``) → its images decoded, a few batches at a time."""
    if not block.num_rows:
        return
    rows = BATCHES_PER_BLOCK * batch_size
    first = block[IMAGE][0].as_py()
    if shards.shard_of(first) == first:  # loose images
        for start in range(0, block.num_rows, batch_size):
            yield read_and_decode(block.slice(start, batch_size), image_size=image_size, errors_dir=errors_dir)
        return
    shard_of_row = [shards.shard_of(uri) for uri in block[IMAGE].to_pylist()]
    for shard in dict.fromkeys(shard_of_row):
        rows_of_shard = block.take([i for i, s in enumerate(shard_of_row) if s == shard])
        yield from read_and_decode_shard(rows_of_shard, image_size=image_size, errors_dir=errors_dir, rows=rows,
                                         image_column=image_column, key_column=key_column)


def read_and_decode_shard(block: pa.Table, *, image_size: int, errors_dir: str, rows: int,
                          image_column: str, key_column: str) -> Iterator[pa.Table]:
    """The records of one shard → its samples decoded, ``rows`` at a time.

    The shard is streamed once; a sample that is broken or missing, and a shard-level failure (a
    record named by the shard itself), is recorded as ``read_and_decode`` records its failures.
    """
    wanted = {uri: i for i, uri in enumerate(block[IMAGE].to_pylist())}
    if not wanted:
        return
    keep, pixels, failures = [], [], []

    def flush() -> pa.Table:
        stacked = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
        return block.take(keep).append_column(PIXELS, pa.FixedShapeTensorArray.from_numpy_ndarray(stacked))

    shard = shards.shard_of(next(iter(wanted)))
    for sample in shards.iter_samples(shard, image_extensions=shards.IMAGE_EXTENSIONS, image_column=image_column,
                                      key_column=key_column):
        index = wanted.pop(sample.path, None)
        if index is None:
            continue
        try:
            if sample.error is not None:
                raise ImageDecodeError(sample.error)
            array, _, _ = decode_image(sample.image, image_size)
        except ImageDecodeError as exc:
            failures.append({"image_id": sample.path, "image": sample.path, "error": str(exc)})
            continue
        keep.append(index)
        pixels.append(array)
        if len(keep) == rows:
            yield flush()
            keep, pixels = [], []
    failures += [{"image_id": uri, "image": uri, "error": "not in its shard any more"} for uri in wanted]
    _record_failures(failures, errors_dir)
    if keep:
        yield flush()


def prepare(config: PrepareConfig) -> dict:
    """Write ``OUT/{split}/part-*.parquet``, ``vocab.json``, ``encoder.pt`` and ``prepare.json``.

    Everything that can be checked is checked before the previous dataset is touched: the
    annotations, the vocabulary, the encoder and its weights, the actors' resources. ``prepare.json``
    (the "done" marker) is removed first and written last. ``--splits`` rewrites only the named
    splits: the others, and their record in ``prepare.json``, stay as they are (see ``_kept_splits``).
    """
    started = time.perf_counter()
    for uri in (*config.annotations, config.out):
        storage.check_bucket(uri)
    every_record = read_config_records(asdict(config))
    records = [r for r in every_record if r.split in config.splits]
    by_split = {s: [r for r in records if r.split == s] for s in config.splits}
    train_captions = [c for r in every_record if r.split == "train" for c in r.captions]
    if not train_captions:
        raise ConfigError(f"{', '.join(config.annotations)}: the train split has no captions to build a "
                          "vocabulary from")
    vocab = Vocabulary.build(train_captions, size=config.vocab_size, min_count=config.min_word_count)
    encoder = build_encoder(config.encoder)  # fails fast (weights, names) before any Ray work
    spec, num_regions, num_features = encoder.spec, encoder.num_regions, encoder.num_features
    encoder_state = state_bytes({k: v.detach().cpu() for k, v in encoder.state_dict().items()})
    del encoder
    previous, kept = _kept_splits(config, spec=spec, vocab=vocab)
    if kept:  # the kept splits' tokens are ids of the dataset's vocabulary: it stays
        vocab = Vocabulary.load(storage.join(config.out, VOCAB_FILE))

    ensure_ray()
    machine = local_machine()
    plan = plan_actors(actors=config.actors, max_actors=config.max_actors, gpus_per_actor=config.gpus_per_actor,
                       cpus_per_actor=config.cpus_per_actor, machine=machine)
    if machine is None:  # a cluster: the first encoder actor may need a node that is not up yet
        wait_for_resources([plan.bundle()] * plan.min_actors, timeout_s=config.wait_timeout, what="prepare")

    # Every check passed: only now are the named splits replaced, the "done" marker first. With splits
    # kept, the marker first shrinks to them (a dataset of the kept splits stays usable throughout).
    split_of = {r.image: r.split for r in every_record}
    kept_errors = [e for e in (previous or {}).get("errors", []) if _error_split(e, split_of) in kept]
    marker = storage.join(config.out, PREPARE_FILE)
    if kept:
        storage.write_json(marker, _summary_of_splits(previous, kept, kept_errors))
    else:
        storage.delete_file(marker)
    for split in config.splits:
        storage.delete_dir(storage.join(config.out, split))
    errors_dir = storage.join(config.out, ERRORS_DIR)
    storage.delete_dir(errors_dir)
    if not kept:
        storage.write_bytes(storage.join(config.out, ENCODER_STATE_FILE), encoder_state)
        vocab.save(storage.join(config.out, VOCAB_FILE))
    log.info("prepare: %d images (%s), encoder %s @ %d px → %s; %s%s",
             len(records), ", ".join(f"{s} {len(v)}" for s, v in by_split.items()), spec.name,
             spec.image_size, config.out, plan.describe(),
             f"; kept as they are: {', '.join(kept)}" if kept else "")
    encode_started = time.perf_counter()
    _encode(records, vocab, spec=spec, config=config, plan=plan, errors_dir=errors_dir)
    encode_seconds = time.perf_counter() - encode_started
    splits = {}
    for split, split_records in by_split.items():
        if split_records:
            splits[split] = {"images": count_rows(storage.join(config.out, split)),
                             "captions": sum(len(r.captions) for r in split_records)}
    log.info("prepare: %s in %.1f s", ", ".join(f"{s} {v['images']}" for s, v in splits.items()), encode_seconds)
    errors = [{**e, "split": split_of.get(e["image"])} for e in _collect_errors(errors_dir)]
    total_written = sum(s["images"] for s in splits.values())
    if total_written + len(errors) != len(records):  # every image is a row or a listed error, nothing else
        raise RuntimeError(f"prepare: {len(records)} images in, {total_written} written + {len(errors)} "
                           "failed out; prepare.json not written")
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
        "objects": any(r.objects is not None for r in records) or bool(kept and previous.get("objects")),
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 2),
        "encode_seconds": round(encode_seconds, 2),
        "images_per_s": round(total_written / max(encode_seconds, 1e-9), 2),
        "actors": {"min": plan.min_actors, "max": plan.max_actors},
        "batch_size": config.batch_size,
        "out": config.out,
        "config": {**{k: v for k, v in asdict(config).items() if k != "encoder"}, "splits": list(splits)},
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


def _encode(records: list[Record], vocab: Vocabulary, *, spec: EncoderSpec, config: PrepareConfig,
            plan: ActorPlan, errors_dir: str) -> None:
    """Every split in one pipeline, so the encoder actors start once: rows carry their split, and the
    Parquet writer files each row under ``OUT/<split>/`` (the split is the folder, not a column)."""
    import ray

    table = pa.table({
        IMAGE_ID: pa.array([r.image_id for r in records], pa.string()),
        IMAGE: pa.array([r.image for r in records], pa.string()),
        CAPTIONS: pa.array([list(r.captions) for r in records], pa.list_(pa.string())),
        TOKENS: pa.array([[vocab.encode(c, max_length=config.max_caption_tokens) for c in r.captions]
                          for r in records], pa.list_(pa.list_(pa.int32()))),
        SPLIT: pa.array([r.split for r in records], pa.string()),
    })
    blocks = _blocks(table, [shards.shard_of(r.image) for r in records], rows=BATCHES_PER_BLOCK * config.batch_size)
    num_blocks = len(blocks)
    ds = ray.data.from_arrow(blocks)
    ds = map_with_retries(ds, decode_block, fn_kwargs={
                              "image_size": spec.image_size, "errors_dir": errors_dir, "batch_size": config.batch_size,
                              "image_column": config.image_column, "key_column": config.key_column},
                          batch_size=None, batch_format="pyarrow", num_cpus=DECODE_CPUS,
                          max_retries=DECODE_TASK_RETRIES, retry_exceptions=[storage.TransientStorageError])
    if plan.min_actors == plan.max_actors and plan.min_actors > num_blocks:  # a fixed pool: no idle actors
        plan = replace(plan, min_actors=num_blocks, max_actors=num_blocks)
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={"spec": spec.to_dict(), "use_gpu": plan.num_gpus > 0,
                                                       "threads": plan.threads},
                        compute=plan.strategy(), batch_size=config.batch_size, batch_format="pyarrow",
                        **plan.remote_args())
    with warnings.catch_warnings():
        # Ray 2.60 deprecates min_rows_per_file with partition_cols (support ends in a later Ray) in favour
        # of a repartition by split: a shuffle of every feature row. Pinned Ray keeps the streaming write.
        warnings.filterwarnings("ignore", message=".*min_rows_per_file.*partition_cols", category=DeprecationWarning)
        ds.write_parquet(config.out, partition_cols=[SPLIT], partitioning_flavor=None,
                         min_rows_per_file=config.rows_per_file, filename_provider=_PartNames())


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
