"""``capray prepare``: run the frozen encoder once over captioned images into a sharded feature dataset.

Pipeline per split (Ray Data, streaming, so memory does not grow with the number of images):
records → read + decode + resize (CPU tasks) → Encoder actors (GPU or CPU) → Parquet shards.
An image that cannot be decoded is left out and listed with its error in ``prepare.json``.
"""
from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch
from ray.data.datasource import FilenameProvider

from capray import storage
from capray.annotations import SPLITS, Record, read_annotations
from capray.encoders import EncoderSpec, build_encoder
from capray.formats import (CAPTIONS, ENCODER_STATE_FILE, FEATURES, IMAGE, IMAGE_ID, PREPARE_FILE, TOKENS,
                            VOCAB_FILE)
from capray.images import ImageDecodeError, decode_image
from capray.runtime import ModelThread, cluster_cpus, cluster_gpus, ensure_ray, plan_actors
from capray.vocab import Vocabulary

log = logging.getLogger(__name__)
ERRORS_DIR = "_errors"
"""Decode tasks leave one small JSONL per batch with failures here; merged into prepare.json."""
PIXELS = "pixels"
DECODE_CPUS = 0.25
"""CPU share of a decode task: decoding a small image is light, and a share unlike the actors' keeps
Ray Data from fusing decoding into the (GPU) actors, so decoding scales on CPU nodes."""


@dataclass(frozen=True)
class PrepareConfig:
    annotations: str
    """COCO captions JSON, Karpathy split JSON or JSONL manifest (URI)."""
    out: str
    """Feature dataset location (URI)."""
    images: str | None = None
    """Root of relative image paths (default: the annotation file's folder)."""
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    """Frozen encoder that makes the region features."""
    vocab_size: int = 5000
    """Words kept, specials included (from the train split only)."""
    min_word_count: int = 1
    """Words seen fewer times in the train split become ``<unk>``."""
    max_caption_tokens: int = 40
    """Captions are truncated to this many tokens, ``<start>`` and ``<end>`` included."""
    actors: int = 0
    """Encoder actors; 0 = one per GPU (with ``gpus_per_actor``), else one."""
    gpus_per_actor: float = 0.0
    """GPUs per encoder actor; 0 runs the encoder on CPU."""
    batch_size: int = 32
    """Images per encoder forward pass."""
    splits: tuple[str, ...] = SPLITS
    """Splits to write."""
    rows_per_file: int = 2000
    """Minimum rows per Parquet file (few larger files read back much faster than many tiny ones)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not set(self.splits) <= set(SPLITS) or not self.splits:
            raise ValueError(f"--splits must be among {', '.join(SPLITS)}, got {','.join(self.splits)}")
        if self.max_caption_tokens < 3:
            raise ValueError("max_caption_tokens must be at least 3")

    @classmethod
    def from_flags(cls, *, encoder: str, weights: str, image_size: int, encoder_layer: str, splits: str,
                   **flags) -> "PrepareConfig":
        spec = EncoderSpec(name=encoder, weights=weights, image_size=image_size, layer=encoder_layer)
        return cls(encoder=spec, splits=tuple(s for s in splits.split(",") if s), **flags)


class Encoder:
    """Ray Data actor: loads the encoder once, turns batches of decoded images into fp16 features."""

    def __init__(self, spec: dict, *, use_gpu: bool, threads: int):
        self._model_thread = ModelThread()
        self._model_thread.run(self._load, spec, use_gpu=use_gpu, threads=threads)

    def _load(self, spec: dict, *, use_gpu: bool, threads: int) -> None:
        if not use_gpu:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.encoder = build_encoder(EncoderSpec(**spec)).to(self.device)
        if use_gpu:
            self.encoder.to(memory_format=torch.channels_last)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._model_thread.run(self._encode, batch)

    @torch.inference_mode()
    def _encode(self, batch: pa.Table) -> pa.Table:
        pixels = batch[PIXELS].combine_chunks().to_numpy_ndarray()  # (B, H, W, 3) uint8, zero-copy
        images = torch.from_numpy(np.array(pixels)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            features = self.encoder(images)  # (B, P, E)
        features = features.to(torch.float16).cpu().numpy()
        return batch.drop_columns([PIXELS]).append_column(
            FEATURES, pa.FixedShapeTensorArray.from_numpy_ndarray(features)).select(
            [IMAGE_ID, IMAGE, FEATURES, CAPTIONS, TOKENS])


def read_and_decode(batch: pa.Table, *, image_size: int, errors_dir: str) -> pa.Table:
    """CPU task: read each image's bytes and decode it; failures are recorded, not raised."""
    keep, pixels, failures = [], [], []
    for i, (image_id, uri) in enumerate(zip(batch[IMAGE_ID].to_pylist(), batch[IMAGE].to_pylist())):
        try:
            array, _, _ = decode_image(storage.read_bytes(uri), image_size)
        except (ImageDecodeError, storage.StorageError) as exc:
            failures.append({"image_id": image_id, "image": uri, "error": str(exc)})
            continue
        keep.append(i)
        pixels.append(array)
    if failures:
        text = "".join(json.dumps(f) + "\n" for f in failures)
        storage.write_text(storage.join(errors_dir, f"{uuid.uuid4().hex}.jsonl"), text)
    stacked = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    return batch.take(keep).append_column(PIXELS, pa.FixedShapeTensorArray.from_numpy_ndarray(stacked))


def prepare(config: PrepareConfig) -> dict:
    """Write ``OUT/{split}/part-*.parquet``, ``vocab.json``, ``encoder.pt`` and ``prepare.json``."""
    started = time.perf_counter()
    storage.check_bucket(config.annotations)
    storage.check_bucket(config.out)
    records = read_annotations(config.annotations, images=config.images)
    by_split = {s: [r for r in records if r.split == s] for s in config.splits}
    train_captions = [c for r in records if r.split == "train" for c in r.captions]
    if not train_captions:
        raise ValueError(f"{config.annotations}: the train split has no captions to build a vocabulary from")
    vocab = Vocabulary.build(train_captions, size=config.vocab_size, min_count=config.min_word_count)
    encoder = build_encoder(config.encoder)  # fails fast (weights, names) before any Ray work
    spec, num_regions, num_features = encoder.spec, encoder.num_regions, encoder.num_features
    for split in config.splits:  # a re-run replaces the dataset rather than adding to it
        storage.delete_dir(storage.join(config.out, split))
    errors_dir = storage.join(config.out, ERRORS_DIR)
    storage.delete_dir(errors_dir)
    storage.write_bytes(storage.join(config.out, ENCODER_STATE_FILE), _state_bytes(encoder.state_dict()))
    vocab.save(storage.join(config.out, VOCAB_FILE))
    del encoder

    ensure_ray()
    plan = plan_actors(actors=config.actors, gpus_per_actor=config.gpus_per_actor,
                       total_cpus=cluster_cpus(), total_gpus=cluster_gpus())
    log.info("prepare: %d images (%s), encoder %s @ %d px → %s; %d actor(s) × %.2f CPU, %.2f GPU",
             len(records), ", ".join(f"{s} {len(v)}" for s, v in by_split.items()), spec.name,
             spec.image_size, config.out, plan.actors, plan.num_cpus, plan.num_gpus)
    splits, encode_seconds = {}, 0.0
    for split, split_records in by_split.items():
        if not split_records:
            continue
        split_started = time.perf_counter()
        _encode_split(split_records, vocab, spec=spec, config=config, plan=plan,
                      out=storage.join(config.out, split), errors_dir=errors_dir)
        seconds = time.perf_counter() - split_started
        encode_seconds += seconds
        written = count_rows(storage.join(config.out, split))
        splits[split] = {"images": written, "captions": sum(len(r.captions) for r in split_records),
                         "seconds": round(seconds, 2)}
        log.info("prepare: %s: %d images in %.1f s", split, written, seconds)
    errors = _collect_errors(errors_dir)
    total_written = sum(s["images"] for s in splits.values())
    summary = {
        "encoder": spec.to_dict(),
        "num_regions": num_regions,
        "num_features": num_features,
        "vocab_size": len(vocab),
        "splits": splits,
        "num_images": total_written,
        "num_errors": len(errors),
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 2),
        "encode_seconds": round(encode_seconds, 2),
        "images_per_s": round(total_written / max(encode_seconds, 1e-9), 2),
        "actors": plan.actors,
        "batch_size": config.batch_size,
        "out": config.out,
        "config": {k: v for k, v in asdict(config).items() if k != "encoder"},
    }
    storage.write_json(storage.join(config.out, PREPARE_FILE), summary)  # written last: the "done" marker
    return summary


def _encode_split(records: list[Record], vocab: Vocabulary, *, spec: EncoderSpec, config: PrepareConfig,
                  plan, out: str, errors_dir: str) -> None:
    import ray

    table = pa.table({
        IMAGE_ID: pa.array([r.image_id for r in records], pa.string()),
        IMAGE: pa.array([r.image for r in records], pa.string()),
        CAPTIONS: pa.array([list(r.captions) for r in records], pa.list_(pa.string())),
        TOKENS: pa.array([[vocab.encode(c, max_length=config.max_caption_tokens) for c in r.captions]
                          for r in records], pa.list_(pa.list_(pa.int32()))),
    })
    # Enough blocks that decoding spreads over the cluster, few enough that per-block overhead stays small.
    num_blocks = max(1, min(len(records) // config.batch_size, 4 * int(cluster_cpus()) + 4))
    ds = ray.data.from_arrow([table.slice(i * len(table) // num_blocks, (i + 1) * len(table) // num_blocks
                                          - i * len(table) // num_blocks) for i in range(num_blocks)])
    ds = ds.map_batches(read_and_decode, fn_kwargs={"image_size": spec.image_size, "errors_dir": errors_dir},
                        batch_size=config.batch_size, batch_format="pyarrow", num_cpus=DECODE_CPUS)
    ds = ds.map_batches(Encoder, fn_constructor_kwargs={"spec": spec.to_dict(), "use_gpu": plan.num_gpus > 0,
                                                       "threads": plan.threads},
                        compute=ray.data.ActorPoolStrategy(size=min(plan.actors, num_blocks)),
                        batch_size=config.batch_size,
                        batch_format="pyarrow", num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)
    ds.write_parquet(out, min_rows_per_file=config.rows_per_file, filename_provider=_PartNames())


def count_rows(uri: str) -> int:
    """Rows in the Parquet files under ``uri``, from their footers."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    if not storage.exists(uri):
        return 0
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows()


def load_prepare_info(features: str) -> dict:
    """``prepare.json`` of a feature dataset; a clear error when the folder is not one."""
    storage.check_bucket(features)
    uri = storage.join(features, PREPARE_FILE)
    if not storage.exists(uri):
        raise ValueError(f"{features}: not a feature dataset (no {PREPARE_FILE}; run capray prepare first)")
    return storage.read_json(uri)


def print_summary(summary: dict) -> None:
    print(f"\nfeatures: {summary['out']}  ({summary['num_regions']} regions × {summary['num_features']} "
          f"channels, {summary['encoder']['name']} @ {summary['encoder']['image_size']} px)")
    print(f"{'split':<8}{'images':>9}{'captions':>10}{'seconds':>9}")
    for split, s in summary["splits"].items():
        print(f"{split:<8}{s['images']:>9}{s['captions']:>10}{s['seconds']:>9.1f}")
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


def _state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return buffer.getvalue()
