"""Caption shards: written whole by a Ray Data datasink, named so that a retried write task overwrites its own.

A shard is ``OUT/part-<run id>-<write task>.parquet`` (``part-<run id>-r<pass>-<write task>.parquet``
for the passes that retry transient read failures). It only ever appears whole: a local file is
written under a hidden temporary name, fsynced and renamed, an S3 object appears when its upload
completes. Its key-value metadata records the checkpoint and decoding settings (``capray.*``).
A write task checks, before it writes, that its run still holds the output's lease (``capray.lease``).
"""
from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from capray import storage
from capray.formats import CAPTION_SCHEMA, ERROR, PATH

SHARD_PREFIX = "part-"
"""Caption shards are ``OUT/part-<run id>-<write task>.parquet``."""
SHARD_NAME = re.compile(r"part-(\d{8}T\d{6}-[0-9a-f]{6})-(?:r\d+-)?\d{6,}\.parquet")
"""A caption shard's name; group 1 is the run id. Any index of 6 or more digits is one (outputs written
before 0.2 have 6), so resume and ``--overwrite`` find the shards of a run of any size."""
TASK_DIGITS = 10
"""The write task's index is zero-padded to 10 digits: names sort by task up to 10^10 tasks."""
TEMPORARY_NAME = re.compile(r"\.part-.*\.parquet\.tmp-[0-9a-f]{8}")
META_PREFIX = "capray."
"""Parquet key-value metadata of a shard: ``capray.checkpoint``, ``capray.beam_size``, ..."""
COMPATIBLE_KEYS = ("checkpoint", "beam_size", "max_length", "encoder", "columns", "key_column")
"""Metadata that must agree for a run to add shards to an output that already holds some."""
COMPATIBLE_DEFAULTS = {"columns": "[]", "key_column": ""}
"""What a key missing from an older shard's metadata meant (no kept columns before they existed)."""
RETRY = "retry"
"""Between the decode tasks and the sink: the image's read failed for a transient reason (throttling,
a reset connection) even after the S3 client's retries. Such a row is never written as a caption, so
the image is not done: its path goes to a retry listing (``ShardSink.retry_listing``) that the run
reads again after a pause (``capray.captioning``), and, if the run gives up, the next run lists it."""


def caption_schema(columns: tuple[str, ...] = ()) -> pa.Schema:
    """The caption rows' schema, with the source's kept columns (text) after the fixed ones."""
    return pa.schema([*CAPTION_SCHEMA, *(pa.field(c, pa.string()) for c in columns)])


def shard_uris(output: str) -> list[str]:
    """The caption shards directly in ``output`` (named as this module names them)."""
    return sorted(uri for uri in storage.list_files(output, extensions=("parquet",))
                  if SHARD_NAME.fullmatch(storage.basename(uri)) and storage.parent(uri) == output)


def shard_metadata(settings: dict) -> dict[bytes, bytes]:
    """Parquet key-value metadata of every shard: the checkpoint and the decoding settings."""
    values = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in settings.items()}
    return {f"{META_PREFIX}{k}".encode(): v.encode() for k, v in values.items()}


def delete_temporaries(output: str) -> None:
    """Shards a killed run was still writing under a temporary name (local disks only)."""
    if storage.is_remote(output):
        return
    for uri in storage.list_files(output):
        if TEMPORARY_NAME.fullmatch(storage.basename(uri)) and storage.parent(uri) == output:
            storage.delete_file(uri)


def write_parquet(uri: str, table: pa.Table, *, row_group_size: int | None = None) -> None:
    """Write a whole Parquet file so that it appears complete or not at all."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


class ShardSink(Datasink):
    """One whole Parquet shard per write task, named by (run, task): a retried task overwrites its own."""

    def __init__(self, output: str, *, run_id: str, metadata: dict[bytes, bytes], rows_per_shard: int,
                 columns: tuple[str, ...] = (), retry_pass: int = 0, retry_listing: str = "",
                 retry_group_rows: int = 256, lease: tuple[str, str] | None = None):
        """``retry_pass``: 0 for a run's first pass over its listing, n for its n-th retry pass;
        ``retry_listing``: the folder for the paths whose read failed transiently (listing shards of
        ``retry_group_rows`` rows per group); ``lease``: (lease URI, token) the run must still hold."""
        self.output, self.run_id, self.rows_per_shard = output, run_id, rows_per_shard
        self.retry_pass, self.retry_listing, self.retry_group_rows = retry_pass, retry_listing, retry_group_rows
        self.lease = lease
        self.schema = caption_schema(columns).with_metadata(
            {**metadata, f"{META_PREFIX}run_id".encode(): run_id.encode()})
        self.ok = self.errors = self.retryable = self.shards = 0
        self.retry_units: list[tuple[str, int]] = []
        """(retry listing shard, row group): the work of the next retry pass."""

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        retry = [t.filter(t.column(RETRY)).column(PATH) for t in tables]
        retry_paths = pa.chunked_array([c for chunk in retry for c in chunk.chunks], pa.string())
        tables = [t.filter(pc.invert(t.column(RETRY))) for t in tables]  # not done: never written as rows
        tables = [t.select(self.schema.names).cast(self.schema) for t in tables if t.num_rows]
        if self.lease is not None:
            from capray.lease import check_owner

            check_owner(*self.lease)
        units = []
        if len(retry_paths):
            uri = storage.join(self.retry_listing, f"paths-{ctx.task_idx:0{TASK_DIGITS}d}.parquet")  # a retried task: the same
            write_parquet(uri, pa.table({PATH: retry_paths}), row_group_size=self.retry_group_rows)
            units = [(uri, g) for g in range((len(retry_paths) + self.retry_group_rows - 1) // self.retry_group_rows)]
        if not tables:
            return {"rows": 0, "errors": 0, "retryable": len(retry_paths), "shards": 0, "retry_units": units}
        table = pa.concat_tables(tables)
        run_pass = f"r{self.retry_pass}-" if self.retry_pass else ""
        name = f"{SHARD_PREFIX}{self.run_id}-{run_pass}{ctx.task_idx:0{TASK_DIGITS}d}.parquet"
        write_parquet(storage.join(self.output, name), table)
        return {"rows": table.num_rows, "errors": table.num_rows - table.column(ERROR).null_count,
                "retryable": len(retry_paths), "shards": 1, "retry_units": units}

    def on_write_complete(self, write_result) -> None:  # on the driver, once every write task is done
        returns = [r for r in write_result.write_returns if r]
        rows = sum(r["rows"] for r in returns)
        self.errors = sum(r["errors"] for r in returns)
        self.ok = rows - self.errors
        self.retryable = sum(r["retryable"] for r in returns)
        self.shards = sum(r["shards"] for r in returns)
        self.retry_units = [u for r in returns for u in r["retry_units"]]

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def get_name(self) -> str:
        return "WriteCaptionShards"
