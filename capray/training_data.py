"""The train job's data: its feature splits read for the workers, and the feature statistics.

Where the splits are read (by the driver itself, or by Ray Data tasks into the object store, or
streamed every epoch) and whether a worker holds its share in memory are decided here from the
sizes that ``prepare.json`` records.
"""
from __future__ import annotations

import logging

import numpy as np

from capray import storage
from capray.config import TrainConfig
from capray.errors import ConfigError
from capray.formats import FEATURES
from capray.tasks import run_in_task

log = logging.getLogger(__name__)

READ_ATTEMPTS = 3
"""Tries at reading the feature dataset in the driver: a node lost mid-read (a spot node taken back, an
autoscaler scaling an idle node down as a reader lands on it) kills Ray Data's readers with it."""
DRIVER_BLOCK_ROWS = 512
"""Rows per block of a split read by the driver (``TrainConfig.driver_read_mb``)."""


def read_features(config: TrainConfig, info: dict):
    """The train and val datasets, read into Ray's object store now when they fit there.

    Read before the workers start, the data is in the object store whether or not the workers leave
    a CPU free for Ray Data's read tasks (with every CPU held by a worker, a lazy read would wait
    forever); streamed epochs then skip re-reading the Parquet files. Small feature sets
    (``--driver-read-mb``) are read by this process itself, without a Ray Data job.
    """
    import ray.data
    from ray.exceptions import RayError

    splits = [storage.join(config.features, split) for split in ("train", "val")]
    if 0 < _stored_bytes(info, "train", "val") <= config.driver_read_mb * 2**20:
        return tuple(_read_in_driver(uri) for uri in splits)
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            train_ds, val_ds = (ray.data.read_parquet(uri) for uri in splits)
            if _fits_in_object_store(info):
                train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
            return train_ds, val_ds
        except RayError as exc:  # a Ray failure (a lost node, a dead reader), not a bad dataset
            if attempt == READ_ATTEMPTS:
                raise
            log.warning("train: reading %s failed (%s); trying again (%d/%d)", config.features,
                        " ".join(str(exc).split())[:200], attempt + 1, READ_ATTEMPTS)


def _read_in_driver(uri: str):
    """A small split read here with pyarrow, into Ray's object store as blocks of ``DRIVER_BLOCK_ROWS``
    (several blocks, so the workers' shares split evenly); no Ray task runs."""
    import pyarrow.dataset as pads
    import ray.data

    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    return ray.data.from_arrow([table.slice(start, DRIVER_BLOCK_ROWS)
                                for start in range(0, max(table.num_rows, 1), DRIVER_BLOCK_ROWS)])


def fits_in_worker_memory(config: TrainConfig, info: dict) -> bool:
    """Whether a worker's share of the train and val splits fits in ``--in-memory-gb``: then each worker
    holds its share as tensors, read once, instead of streaming it every epoch."""
    return _stored_bytes(info, "train", "val") / config.workers <= config.in_memory_gb * 2**30


def _stored_bytes(info: dict, *splits: str) -> int:
    return sum(info["splits"][split]["images"] for split in splits) * _row_bytes(info)


def _row_bytes(info: dict) -> int:
    return 2 * info["num_regions"] * info["num_features"] + 512  # fp16 features + captions


def _fits_in_object_store(info: dict, *, fraction: float = 0.25) -> bool:
    import ray

    return _stored_bytes(info, "train", "val") < fraction * ray.available_resources().get("object_store_memory", 0)


def feature_statistics(uri: str, *, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the region features over the first ``max_images`` images of a split.

    Computed in a Ray task (``capray.tasks.run_in_task``), not in the driver: on a cluster the driver
    runs on the head, and ``max_images`` rows of features are hundreds of MB for a large encoder.
    Read with pyarrow: a sample of a few thousand rows needs no Ray Data execution.
    """
    return run_in_task(_feature_statistics, uri, max_images=max_images, what="feature statistics")


def _feature_statistics(uri: str, *, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    total, total_sq, count, images = None, None, 0, 0
    for record_batch in pads.dataset(path, filesystem=fs, format="parquet").to_batches(columns=[FEATURES],
                                                                                        batch_size=256):
        if images >= max_images:
            break
        record_batch = record_batch.slice(0, max_images - images)
        images += record_batch.num_rows
        if not record_batch.num_rows:
            continue
        x = record_batch.column(FEATURES).to_numpy_ndarray().astype(np.float64)  # (B, P, E)
        x = x.reshape(-1, x.shape[-1])  # (B·P, E)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += x.shape[0]
    if not count:
        raise ConfigError("the train split has no feature rows")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)
