"""The one image reader of prepare's and caption's decode tasks: any input → decoded batches.

Every input comes down to two streams: loose objects (an S3 listing, a local folder, the images an
annotation file or a manifest names), read by URI with the reads overlapping (``read_objects``);
and the samples of WebDataset and Parquet shards (``capray.shards.iter_samples``), each shard
streamed once and decoded ``rows`` at a time (``decode_chunks``). Both give ``Decoded``: one entry
per input, in order, with the pixels at the encoder's size and, where an image cannot be used, why.

The jobs differ only in what they make of a failure: caption writes it as an error row (a
transient one flagged, so a re-run reads it again), prepare lists it in ``prepare.json`` and has Ray
run the task again for a transient one. Their decode tasks ask for the same CPU share
(``capray.sizing.read_cpus``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from capray import storage
from capray.images import ImageDecodeError, decode_image
from capray.shards import Sample

T = TypeVar("T")


@dataclass
class Decoded:
    """A batch of images decoded: entry ``i`` is input ``i``'s."""

    pixels: np.ndarray
    """(N, S, S, 3) uint8; zeros where the image could not be used."""
    widths: np.ndarray
    """int32 (N,): the oriented source width (0 on error); ``heights`` likewise."""
    heights: np.ndarray
    errors: list[str]
    """Why each image cannot be used ("" when it can)."""
    transient: np.ndarray
    """bool (N,): the error is a transient read failure (throttling, a reset connection) that a later
    read may not meet, not a fault of the image."""

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> np.ndarray:
        """bool (N,): the images that decoded."""
        return np.array([not e for e in self.errors], dtype=bool)


def decode_all(contents: Iterable[bytes | Exception], *, count: int, image_size: int) -> Decoded:
    """``count`` contents decoded, in order; each is an image's bytes, or the exception its read raised
    (or a sample's own error, as ``ImageDecodeError``), which becomes that entry's error."""
    pixels = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    widths, heights = np.zeros(count, dtype=np.int32), np.zeros(count, dtype=np.int32)
    errors, transient = [""] * count, np.zeros(count, dtype=bool)
    for i, data in enumerate(contents):
        try:
            if isinstance(data, Exception):
                raise data
            pixels[i], widths[i], heights[i] = decode_image(data, image_size)
        except (ImageDecodeError, storage.StorageError, storage.TransientStorageError) as exc:
            errors[i] = str(exc) or type(exc).__name__
            transient[i] = isinstance(exc, storage.TransientStorageError)
    return Decoded(pixels=pixels, widths=widths, heights=heights, errors=errors, transient=transient)


def read_objects(uris: list[str], *, image_size: int) -> Decoded:
    """Loose objects read (``storage.read_many``: reads overlap, decoding stays on this thread) and decoded."""
    return decode_all(storage.read_many(uris), count=len(uris), image_size=image_size)


def sample_content(sample: Sample) -> bytes | ImageDecodeError:
    """A shard sample's image bytes, or its own error (a broken member, a failure of the whole shard)."""
    return sample.image if sample.error is None else ImageDecodeError(sample.error)


def decode_chunks(items: Iterable[T], *, content: Callable[[T], bytes | Exception], rows: int,
                  image_size: int) -> Iterator[tuple[list[T], Decoded]]:
    """``items`` (shard samples, or what a job pairs with each) decoded ``rows`` at a time, as they are
    streamed: at most ``rows`` images' bytes are held at once. ``content``: an item's bytes or error
    (for samples: ``sample_content``)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == rows:
            yield chunk, decode_all(map(content, chunk), count=len(chunk), image_size=image_size)
            chunk = []
    if chunk:
        yield chunk, decode_all(map(content, chunk), count=len(chunk), image_size=image_size)
