"""``capray gallery``: one self-contained HTML page to judge a caption output by eye, worst first.

The output is read once, as a stream: only the ``path``, ``caption``, ``score`` and ``error`` columns,
``BATCH_ROWS`` rows at a time (``scan`` consumes an iterator of record batches and holds nothing per
row). That pass counts rows and errors, bins the confidences for the header's histogram, and keeps
three bounded sets: the sample (the ``--sample`` rows whose path has the smallest seeded hash, so the
same seed picks the same rows whatever order the shards are listed in), the ``--worst`` rows of lowest
confidence and up to ``--worst`` error rows. Only their images are read, through the storage layer
(a WebDataset or Parquet sample, ``SHARD#KEY``, by one pass over its shard), shrunk, and embedded as
JPEG data URIs; an image that cannot be read or decoded gets a placeholder that says why.

Confidence: a row's ``score`` is the mean log-probability per token of its caption; the page shows
``exp(score)``, the geometric mean of the per-token probabilities, in [0, 1].

The page carries no script and refers to nothing outside itself (no links, fonts or remote images),
so it can be mailed, attached to a ticket or opened from a bucket as it is.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capray import shards, storage
from capray.config import DEFAULT_EXTENSIONS, GalleryConfig
from capray.errors import ConfigError, first_line
from capray.formats import CAPTION, CAPTIONS, ERROR, IMAGE, PATH, PREPARE_FILE, SCORE
from capray.images import ImageDecodeError, thumbnail

log = logging.getLogger(__name__)

COLUMNS = (PATH, CAPTION, SCORE, ERROR)
"""The caption output's columns the gallery reads (``width`` and ``height`` are never needed)."""
BATCH_ROWS = 8192
"""Rows read at a time: a million-row output is never whole in memory."""
NUM_BINS = 10
"""Bins of the confidence histogram over [0, 1]."""
JPEG_QUALITY = 80
"""Of the embedded thumbnails: a 192 px photo takes 5–10 KB, so a page of 100 stays under a megabyte."""
REFERENCES_SHOWN = 3
"""Reference captions shown under a caption (the rest are counted)."""


@dataclass(frozen=True)
class Row:
    """One caption row, as the page shows it."""

    path: str
    caption: str | None
    score: float | None
    """Mean log-probability per token; None on an error row."""
    error: str | None

    @property
    def confidence(self) -> float | None:
        """``exp(score)``: the geometric mean of the caption's per-token probabilities."""
        return None if self.score is None else math.exp(self.score)


class _Smallest:
    """The ``k`` items of smallest key offered so far (ties broken by arrival), in a bounded max-heap."""

    def __init__(self, k: int):
        self.k, self._heap, self._count = k, [], itertools.count()

    def wants(self, key: tuple) -> bool:
        """Whether an item with ``key`` would be kept (lets the caller skip building the item)."""
        return self.k > 0 and (len(self._heap) < self.k or _negated(key) > self._heap[0][0])

    def offer(self, key: tuple, item) -> None:
        if not self.wants(key):
            return
        entry = (_negated(key), -next(self._count), item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list:
        """The kept items, smallest key first."""
        return [item for *_, item in sorted(self._heap, reverse=True)]


def _negated(key: tuple) -> tuple:
    return tuple(-k for k in key)


@dataclass
class Scan:
    """What one pass over a caption output found: counts, the histogram and the rows to show."""

    rows: int = 0
    errors: int = 0
    score_sum: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * NUM_BINS)
    """Ok rows per confidence bin: [0, 0.1), [0.1, 0.2), ... [0.9, 1]."""
    sample: list[Row] = field(default_factory=list)
    """The deterministic sample, errors first, then by confidence, lowest first."""
    lowest: list[Row] = field(default_factory=list)
    """The rows of lowest confidence in the whole output, lowest first."""
    failed: list[Row] = field(default_factory=list)
    """Error rows (a seeded choice when there are more), by path."""

    @property
    def ok(self) -> int:
        return self.rows - self.errors

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.ok if self.ok else None

    def shown(self) -> list[Row]:
        """Every row on the page, each once."""
        return list({row.path: row for row in (*self.failed, *self.lowest, *self.sample)}.values())


def path_hash(path: str, seed: int) -> int:
    """A 64-bit hash of ``path`` under ``seed``: the sample is the rows with the smallest."""
    digest = hashlib.blake2b(f"{seed}\0{path}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def scan(batches: Iterable[pa.RecordBatch], *, sample: int, worst: int, seed: int) -> Scan:
    """Count, bin and pick the rows to show in one pass over ``batches`` (of the caption schema's
    ``path``, ``caption``, ``score`` and ``error`` columns), holding only the rows kept."""
    result = Scan()
    picked, lowest, failed = _Smallest(sample), _Smallest(worst), _Smallest(worst)
    edges = np.linspace(0.0, 1.0, NUM_BINS + 1)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        paths = batch.column(PATH).to_pylist()
        is_error = batch.column(ERROR).is_valid().to_numpy(zero_copy_only=False)
        scores = batch.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where null
        ok_scores = scores[~is_error & ~np.isnan(scores)]
        result.rows += batch.num_rows
        result.errors += int(is_error.sum())
        result.score_sum += float(ok_scores.sum())
        counts, _ = np.histogram(np.clip(np.exp(ok_scores), 0.0, 1.0), bins=edges)
        result.histogram = [a + int(b) for a, b in zip(result.histogram, counts)]
        captions = errors = None  # converted only when a row of this batch is kept
        for i, path in enumerate(paths):
            hashed = path_hash(path, seed)
            score = None if math.isnan(scores[i]) else float(scores[i])
            wanted = [(picked, (hashed,))]
            if is_error[i]:
                wanted.append((failed, (hashed,)))
            elif score is not None:
                wanted.append((lowest, (score, hashed)))
            wanted = [(keeper, key) for keeper, key in wanted if keeper.wants(key)]
            if not wanted:
                continue
            if captions is None:
                captions, errors = batch.column(CAPTION).to_pylist(), batch.column(ERROR).to_pylist()
            row = Row(path, captions[i], score, errors[i])
            for keeper, key in wanted:
                keeper.offer(key, row)
    result.sample = sorted(picked.items(), key=_worst_first)
    result.lowest = lowest.items()
    result.failed = sorted(failed.items(), key=lambda row: row.path)
    return result


def _worst_first(row: Row) -> tuple:
    return (row.error is None, row.score if row.score is not None else -math.inf, row.path)


# --- reading ---------------------------------------------------------------------------------------

def read_batches(output: str, *, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The caption shards of ``output``, ``batch_rows`` rows and ``COLUMNS`` at a time."""
    from capray.sink import shard_uris

    uris = shard_uris(output)
    if not uris:
        raise ConfigError(f"--captions {output}: no caption shards (part-*.parquet) there; is it a "
                         "capray caption output?")
    for uri in uris:
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=list(COLUMNS))
        except FileNotFoundError as exc:
            raise storage.StorageError(f"{uri}: no such file (was the output replaced while reading?)") from exc
        except OSError as exc:
            raise storage.classified(f"cannot read {uri}", exc) from exc
        except pa.ArrowException as exc:
            raise storage.StorageError(f"{uri}: not a caption shard ({first_line(exc)})") from exc


def key_column_of(output: str) -> str:
    """The ``--key-column`` the output's samples were named with (recorded in every shard's metadata)."""
    from capray.sink import META_PREFIX, shard_uris

    uris = shard_uris(output)
    if not uris:
        return ""
    fs, path = storage.resolve(uris[0])
    with fs.open_input_file(path) as f:
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    return metadata.get(f"{META_PREFIX}key_column".encode(), b"").decode()


def read_thumbnails(paths: Iterable[str], *, size: int, image_column: str = "", key_column: str = "",
                    ) -> dict[str, str]:
    """``path`` → a ``data:image/jpeg`` URI, or the reason (no ``data:`` prefix) it cannot be shown.

    Plain objects are read with ``storage.read_many`` (reads overlap); the samples of one shard by a
    single pass over it, up to the last one wanted.
    """
    shown: dict[str, str] = {}
    plain: list[str] = []
    in_shards: dict[str, set[str]] = defaultdict(set)
    for path in dict.fromkeys(paths):
        shard = shards.shard_of(path)
        if shard == path:
            plain.append(path)
        else:
            in_shards[shard].add(path)
    for path, data in zip(plain, storage.read_many(plain)):
        shown[path] = _thumbnail_uri(data, size) if isinstance(data, bytes) else _reason(data)
    for shard, wanted in in_shards.items():
        try:
            for sample in shards.iter_samples(shard, image_extensions=DEFAULT_EXTENSIONS, image_column=image_column,
                                              key_column=key_column):
                if sample.path in wanted:
                    wanted.discard(sample.path)
                    shown[sample.path] = (_thumbnail_uri(sample.image, size) if sample.image is not None
                                          else sample.error or "no image")
                    if not wanted:
                        break
        except (storage.StorageError, storage.TransientStorageError) as exc:
            shown.update((path, _reason(exc)) for path in wanted)
            wanted.clear()
        shown.update((path, f"not found in {storage.basename(shard)}") for path in wanted)
    return shown


def _thumbnail_uri(data: bytes, size: int) -> str:
    try:
        image = thumbnail(data, size)
    except ImageDecodeError as exc:
        return str(exc)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_references(uri: str, paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The reference captions of ``paths``, matched by image location, from a feature dataset (its
    ``captions`` column, every split) or an annotation file (a JSONL manifest is streamed; COCO and
    Karpathy files are read whole, as prepare reads them). Only the wanted paths' captions are kept."""
    from capray.annotations import iter_manifest, read_annotations

    wanted = {_location(p): p for p in paths}
    found: dict[str, tuple[str, ...]] = {}
    if is_feature_dataset(uri):
        for shard in sorted(storage.list_files(uri, extensions=("parquet",))):
            fs, path = storage.resolve(shard)
            try:
                with fs.open_input_file(path) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=[IMAGE, CAPTIONS]):
                        for image, captions in zip(batch.column(IMAGE).to_pylist(), batch.column(CAPTIONS).to_pylist()):
                            if (p := wanted.get(_location(image))) is not None:
                                found[p] = tuple(captions or ())
            except OSError as exc:
                raise storage.classified(f"--references: cannot read {shard}", exc) from exc
            except (pa.ArrowException, KeyError) as exc:
                raise ConfigError(f"--references {shard}: not a feature shard ({_reason(exc)})") from exc
        return found
    records = iter_manifest(uri) if uri.endswith(".jsonl") else read_annotations(uri)
    for record in records:
        if (p := wanted.get(_location(record.image))) is not None:
            found[p] = record.captions
    return found


def is_feature_dataset(uri: str) -> bool:
    """Whether ``uri`` is a feature dataset (else it must be an annotation file: ``ValueError`` if neither)."""
    if storage.exists(storage.join(uri, PREPARE_FILE)):
        return True
    if not storage.is_file(uri):
        raise ConfigError(f"--references {uri}: neither a feature dataset (no {PREPARE_FILE}) nor an annotation file")
    return False


def _location(path: str) -> str:
    """A path in one canonical form, so a manifest's ``images/../x.png`` meets the output's ``x.png``."""
    return storage.normalize(path)


# --- the page --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gallery:
    """What ``make_gallery`` wrote."""

    out: str
    rows: int
    errors: int
    images: int
    """Images on the page (each read once)."""
    unreadable: int
    """Of them, shown as a placeholder."""
    seconds: float


def make_gallery(config: GalleryConfig) -> Gallery:
    """Scan ``config.captions``, read the shown rows' images (and references), write the page."""
    started = time.perf_counter()
    if config.references:
        is_feature_dataset(config.references)  # a wrong location fails before the scan
    found = scan(read_batches(config.captions), sample=config.sample, worst=config.worst, seed=config.seed)
    rows = found.shown()
    log.info("gallery: %d rows, %d errors; reading %d images", found.rows, found.errors, len(rows))
    images = read_thumbnails([r.path for r in rows], size=config.thumbnail_size, image_column=config.image_column,
                             key_column=key_column_of(config.captions))
    references = read_references(config.references, [r.path for r in rows]) if config.references else None
    page = render(found, images, references=references, config=config)
    storage.write_text(config.out, page)
    return Gallery(out=config.out, rows=found.rows, errors=found.errors, images=len(rows),
                   unreadable=sum(not v.startswith("data:") for v in images.values()),
                   seconds=time.perf_counter() - started)


def print_summary(gallery: Gallery) -> None:
    print(f"gallery: {gallery.rows} rows, {gallery.errors} errors; {gallery.images} images shown "
          f"({gallery.unreadable} unreadable) in {gallery.seconds:.1f} s\npage: {gallery.out}")


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 1.5rem 2rem;color:#222;background:#fafafa}
h1{font-size:1.3rem;margin:1rem 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #ddd}
header{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-end}
dl.counts{display:grid;grid-template-columns:auto auto;gap:.1rem .8rem;margin:0}dl.counts dt{color:#666}
dl.counts dd{margin:0;font-weight:600;text-align:right}
nav a{margin-right:1rem}code{font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(CELLpx,1fr));gap:.8rem}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}
.card.error{border-color:#c33;background:#fff5f5}
.card img,.card .placeholder{display:block;width:THUMBpx;height:THUMBpx;object-fit:contain;margin:0 auto 6px;
background:#eee}
.placeholder{display:flex!important;align-items:center;justify-content:center;text-align:center;color:#933;
font-size:.8rem;padding:.5rem;box-sizing:border-box;border:1px dashed #c99}
.caption{font-weight:600;margin:.2rem 0}.err{color:#b00;margin:.2rem 0;word-break:break-word}
.conf{display:inline-block;min-width:2.6rem;text-align:center;border-radius:3px;padding:0 .3rem;color:#fff;
font-weight:600}.logp{color:#666;font-size:.85em}
.refs{margin:.3rem 0 0;padding-left:1.1rem;color:#555;font-size:.85em}
.path{color:#777;font-size:.75rem;word-break:break-all;margin:.3rem 0 0}
svg text{font:11px system-ui,sans-serif;fill:#444}
"""


def render(found: Scan, images: dict[str, str], *, references: dict[str, tuple[str, ...]] | None,
           config: GalleryConfig) -> str:
    """The page: a header (counts, confidence histogram), then errors, lowest confidence, the sample."""
    e = html.escape
    mean = found.mean_score
    counts = [("rows", f"{found.rows:,}"), ("captioned", f"{found.ok:,}"),
              ("errors", f"{found.errors:,} ({found.errors / found.rows:.1%})" if found.rows else "0"),
              ("mean confidence", "–" if mean is None else f"{math.exp(mean):.3f} (log-prob {mean:.3f}/token)")]
    sections = [
        ("errors", f"Errors: {len(found.failed)} of {found.errors:,}", found.failed),
        ("lowest", f"Lowest confidence: the {len(found.lowest)} worst of {found.ok:,} captions", found.lowest),
        ("sample", f"Sample: {len(found.sample)} of {found.rows:,} rows (seed {config.seed}), errors and "
                   "lowest confidence first", found.sample),
    ]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>capray gallery: {e(storage.basename(config.captions))}</title>",
        "<style>" + STYLE.replace("THUMB", str(config.thumbnail_size)).replace("CELL", str(config.thumbnail_size + 18))
        + "</style></head><body>",
        f'<h1>Captions of <code>{e(config.captions)}</code></h1>',
        f'<header><dl class="counts" id="summary" data-rows="{found.rows}" data-errors="{found.errors}">',
        *(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in counts),
        "</dl>", _histogram_svg(found), "</header>",
        "<p>Confidence is exp(score): the geometric mean of the caption's per-token probabilities "
        "(score: its mean log-probability per token).</p>",
        "<nav>" + "".join(f'<a href="#{key}">{e(title.split(":")[0])}</a>' for key, title, rows in sections if rows)
        + "</nav>",
    ]
    for key, title, rows in sections:
        if not rows:
            continue
        parts.append(f'<section id="{key}"><h2>{e(title)}</h2><div class="grid">')
        parts += [_card(row, images.get(row.path, "not read"), references) for row in rows]
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _card(row: Row, image: str, references: dict[str, tuple[str, ...]] | None) -> str:
    e = html.escape
    classes = "card error" if row.error is not None else "card"
    attributes = f'class="{classes}" data-path="{e(row.path)}"'
    if row.score is not None:
        attributes += f' data-score="{row.score:.6g}"'
    if image.startswith("data:"):
        picture = f'<img src="{image}" alt="{e(row.caption or row.error or "")}">'
    else:
        picture = f'<div class="placeholder">image not shown: {e(image)}</div>'
    lines = [f"<figure {attributes}>", picture, "<figcaption>"]
    if row.error is not None:
        lines.append(f'<p class="err">error: {e(row.error)}</p>')
    else:
        lines.append(f'<p class="caption">{e(row.caption or "")}</p>')
    if row.confidence is not None:
        hue = round(120 * row.confidence)  # red (0) → green (1)
        lines.append(f'<p><span class="conf" style="background:hsl({hue},60%,38%)">{row.confidence:.2f}</span> '
                     f'<span class="logp">log-prob {row.score:.3f}/token</span></p>')
    if references is not None:
        refs = references.get(row.path)
        if refs:
            more = f"<li>… {len(refs) - REFERENCES_SHOWN} more</li>" if len(refs) > REFERENCES_SHOWN else ""
            lines.append('<ul class="refs" title="reference captions">'
                         + "".join(f"<li>{e(r)}</li>" for r in refs[:REFERENCES_SHOWN]) + more + "</ul>")
        else:
            lines.append('<ul class="refs"><li>(no references for this image)</li></ul>')
    lines += [f'<p class="path" title="{e(row.path)}">{e(row.path)}</p>', "</figcaption></figure>"]
    return "\n".join(lines)


def _histogram_svg(found: Scan) -> str:
    """Inline SVG bars: ok rows per confidence bin, and the error rows apart (no external references)."""
    width, height, bar, gap, top = 40 * (NUM_BINS + 1) + 20, 150, 32, 8, 18
    bars = [(f"{i / NUM_BINS:.1f}", count, "#3a7") for i, count in enumerate(found.histogram)]
    bars.append(("err", found.errors, "#c33"))
    peak = max([count for _, count, _ in bars] + [1])
    usable = height - top - 22
    shapes = []
    for i, (label, count, colour) in enumerate(bars):
        x = 10 + i * (bar + gap)
        h = round(usable * count / peak)
        y = top + usable - h
        shapes.append(f'<rect x="{x}" y="{y}" width="{bar}" height="{max(h, 1)}" fill="{colour}">'
                      f"<title>{html.escape(label)}: {count:,}</title></rect>")
        shapes.append(f'<text x="{x + bar / 2}" y="{y - 3}" text-anchor="middle">{count:,}</text>')
        shapes.append(f'<text x="{x + bar / 2}" y="{height - 6}" text-anchor="middle">{html.escape(label)}</text>')
    return (f'<figure id="histogram" style="margin:0"><svg width="{width}" '
            f'height="{height}" role="img" aria-label="confidence histogram">{"".join(shapes)}</svg>'
            "<figcaption>captions per confidence bin (bin start), and errors</figcaption></figure>")
