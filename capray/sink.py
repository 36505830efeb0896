"""Caption shards: written whole by a Ray Data datasink, named so that a retried write task overwrites its own.

A shard is ``OUT/part-<run id>-<write task>.parquet``. It only ever appears whole: a local file is
written under a hidden temporary name and renamed, an S3 object appears when its upload completes.
Its key-value metadata records the checkpoint and decoding settings (``capray.*``).
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
from capray.formats import CAPTION_SCHEMA, ERROR

SHARD_PREFIX = "part-"
"""Caption shards are ``OUT/part-<run id>-<write task>.parquet``."""
SHARD_NAME = re.compile(r"part-\d{8}T\d{6}-[0-9a-f]{6}-\d{6}\.parquet")
TEMPORARY_NAME = re.compile(r"\.part-.*\.parquet\.tmp-[0-9a-f]{8}")
META_PREFIX = "capray."
"""Parquet key-value metadata of a shard: ``capray.checkpoint``, ``capray.beam_size``, ..."""
COMPATIBLE_KEYS = ("checkpoint", "beam_size", "max_length", "encoder", "columns", "key_column")
"""Metadata that must agree for a run to add shards to an output that already holds some."""
COMPATIBLE_DEFAULTS = {"columns": "[]", "key_column": ""}
"""What a key missing from an older shard's metadata meant (no kept columns before they existed)."""
RETRY = "retry"
"""Between the decode tasks and the sink: the image's read failed for a transient reason (throttling,
a reset connection) even after the S3 client's retries. Such a row is never written, so the image is
not done: the next run lists and captions it again (``capray caption`` exits 1 and says so)."""


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


def delete_shards(output: str) -> None:
    for uri in shard_uris(output):
        storage.delete_file(uri)
    delete_temporaries(output)


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
                 columns: tuple[str, ...] = ()):
        self.output, self.run_id, self.rows_per_shard = output, run_id, rows_per_shard
        self.schema = caption_schema(columns).with_metadata(
            {**metadata, f"{META_PREFIX}run_id".encode(): run_id.encode()})
        self.ok = self.errors = self.retryable = self.shards = 0

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        retryable = sum(int(pc.sum(t.column(RETRY)).as_py() or 0) for t in tables)
        tables = [t.filter(pc.invert(t.column(RETRY))) for t in tables]  # not done: never written
        tables = [t.select(self.schema.names).cast(self.schema) for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "errors": 0, "retryable": retryable, "shards": 0}
        table = pa.concat_tables(tables)
        name = f"{SHARD_PREFIX}{self.run_id}-{ctx.task_idx:06d}.parquet"
        write_parquet(storage.join(self.output, name), table)
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
