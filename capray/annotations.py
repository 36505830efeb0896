"""Annotation readers: COCO captions JSON, Karpathy split JSON and the JSONL manifest, to one record type.

``read_annotations`` reads one file; ``read_sources`` reads several, each with its own images root, as the
official COCO release comes (``captions_train2014.json`` + ``train2014/``, ``captions_val2014.json`` +
``val2014/``), and can carve a deterministic test split out of val. A source may also be shards
(``capray.shards``: WebDataset tars or Parquet files of image bytes), whose samples carry their captions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from capray import shards, storage
from capray.errors import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
ANNOTATION_SUFFIXES = (".json", ".jsonl")


class AnnotationError(ConfigError):
    """Annotations that cannot be used as given; the message names the file(s) and what is wrong."""


@dataclass(frozen=True)
class Record:
    """One image with its reference captions."""

    image_id: str
    """Stable identifier (the COCO id, Karpathy's cocoid, or the manifest's image path)."""
    image: str
    """URI of the image file."""
    captions: tuple[str, ...]
    """Reference captions (may be empty for images that are only captioned, never trained on)."""
    split: str
    """``train``, ``val`` or ``test``."""
    objects: tuple[dict, ...] | None = field(default=None, compare=False)
    """Ground-truth objects (the shapes world), or None."""


def read_annotations(uri: str, *, images: str | None = None, split: str | None = None) -> list[Record]:
    """Read any supported annotation file; the format is detected from its content.

    ``images`` is the root that relative image paths are resolved against (default: the annotation
    file's folder). ``split`` sets the split of a COCO file, which carries none (default ``train``,
    or ``val`` when the file name says so).
    """
    text = storage.read_text(uri)
    # Resolved here, where the user typed it: Ray workers run in another working directory.
    root = storage.normalize(images) if images else storage.parent(uri)
    if uri.endswith(".jsonl"):
        return _read_manifest(uri, text, root)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):  # several JSON objects: a manifest (it names the bad line)
            return _read_manifest(uri, text, root)
        raise AnnotationError(f"{uri}: not valid JSON or JSONL ({exc})") from exc
    if isinstance(obj, dict) and "annotations" in obj and "images" in obj:
        return _read_coco(uri, obj, root, split)
    if isinstance(obj, dict) and "images" in obj and obj["images"] and "sentences" in _first(obj["images"]):
        return _read_karpathy(uri, obj, root)
    if isinstance(obj, dict) and "image" in obj:  # a one-line manifest
        return _read_manifest(uri, text, root)
    raise AnnotationError(f"{uri}: not a COCO captions file, a Karpathy split file or a JSONL manifest")


def pair_sources(annotations: Sequence[str], images: Sequence[str]) -> list[tuple[str, str | None]]:
    """Pair the command line's ``--annotations`` and ``--images`` lists into ``read_sources``'s sources.

    Either no ``--images`` at all (every file resolves images against its own folder) or one per
    annotation file, paired in the order typed. Any other count is refused rather than guessed: with
    two files and one root there is no telling which file the root belongs to.
    """
    if not annotations:
        raise ConfigError("give at least one --annotations file")
    if not images:
        return [(uri, None) for uri in annotations]
    if len(images) != len(annotations):
        raise ConfigError(f"{len(images)} --images for {len(annotations)} --annotations: give one --images per "
                          f"--annotations, in the same order, or none (each file's own folder)")
    return list(zip(annotations, images))


def read_sources(sources: Sequence[tuple[str, str | None]], *, test_fraction: float = 0.0, val_fraction: float = 0.0,
                 image_column: str = "", key_column: str = "", caption_column: str = "") -> list[Record]:
    """Read several annotation files, each ``(URI, images root or None)``, into one list of records.

    Each file keeps its own splits: a COCO file is ``val`` when its name says so, else ``train``;
    Karpathy files and manifests carry theirs. ``test_fraction`` moves that share of the *val* images to
    ``test`` (COCO has no public test captions), chosen by a hash of the image id alone, so an image
    lands in the same split whatever the file order, the other images or the process: features,
    checkpoints and metrics of different runs stay comparable. Images already in ``test`` (Karpathy's
    split, a manifest's) stay there and train is never touched, so the carve only adds to test.

    Shard samples without a split of their own (img2dataset's have none) go to test when a hash of their
    key falls below ``test_fraction``, to val below ``test_fraction + val_fraction``, else to train; the
    carve out of val then leaves them alone. ``*_column``: see ``read_shard_records``.

    An image id in two files is refused (in two splits it would leak evaluation images into training;
    in one it would be encoded and weighted twice), as is a ``test_fraction`` outside [0, 1) or one with
    no val images to carve from.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 <= test_fraction < 1.0:  # NaN fails the comparison too
        raise AnnotationError(f"--test-fraction must be at least 0 and below 1, got {test_fraction!r}")
    if not sources:
        raise AnnotationError("no annotation files given")
    records: list[Record] = []
    hashed: set[str] = set()  # shard samples whose split came from the hash, not from the data
    first_seen: dict[str, tuple[int, str, str]] = {}  # image_id → (source index, URI, split)
    for index, (uri, images) in enumerate(sources):
        kind = source_kind(uri, images)
        if kind is None:
            source_records = read_annotations(uri, images=images)
        else:
            source_records, source_hashed = read_shard_records(
                uri, kind, val_fraction=val_fraction, test_fraction=test_fraction, image_column=image_column,
                key_column=key_column, caption_column=caption_column)
            hashed |= source_hashed
        for r in source_records:
            other = first_seen.setdefault(r.image_id, (index, uri, r.split))
            if other[0] != index:
                raise AnnotationError(f"image id {r.image_id} is in {other[1]} ({other[2]}) and in {uri} "
                                      f"({r.split}): each image may come from one annotation file only")
        records.extend(source_records)
    if not carves_val(test_fraction, any_val=any(r.split == "val" and r.image_id not in hashed for r in records),
                      any_hashed=bool(hashed), sources=[uri for uri, _ in sources]):
        return records
    carved = [replace(r, split="test") if r.split == "val" and r.image_id not in hashed
              and stable_share(r.image_id) < test_fraction else r for r in records]
    num_val = sum(r.split == "val" for r in records)
    num_moved = num_val - sum(r.split == "val" for r in carved)
    log.info("--test-fraction %g: %d of %d val images moved to test (%d test images already in the files kept)",
             test_fraction, num_moved, num_val, sum(r.split == "test" for r in records))
    return carved


def source_kind(uri: str, images: str | None = None) -> str | None:
    """``webdataset`` or ``parquet`` when an annotation source is shards (which carry their captions),
    None for an annotation file. Shards hold their own images: an ``--images`` root for them is refused."""
    kind = shards.detect(uri, shards.IMAGE_EXTENSIONS) if not uri.lower().endswith(ANNOTATION_SUFFIXES) else None
    if kind is not None and images:
        raise AnnotationError(f"{uri}: shards hold their own images; give no --images for them")
    return kind


def carves_val(test_fraction: float, *, any_val: bool, any_hashed: bool, sources: Sequence[str]) -> bool:
    """Whether ``--test-fraction`` moves val images to test (see ``read_sources``): when there are val
    images of the data's own (``any_val``); not when every val image came from the hash (``any_hashed``),
    which made the test split already. With neither, the fraction has nothing to carve from: refused."""
    if test_fraction == 0 or any_val:
        return test_fraction != 0
    if any_hashed:
        return False
    raise AnnotationError(f"--test-fraction {test_fraction} carves test out of val, but there are no val "
                          f"images in {', '.join(sources)} "
                          f"(a COCO file is val when its name says so, e.g. captions_val2014.json)")


def caption_fields(caption_column: str = "") -> tuple[str, ...]:
    """The sample fields a shard's captions are read from, in order (see ``read_shard_records``)."""
    return (caption_column,) if caption_column else shards.CAPTION_FIELDS


def shard_record(sample: shards.Sample, *, fields: Sequence[str], val_fraction: float,
                 test_fraction: float) -> tuple[Record, bool]:
    """The record of one shard sample, and whether its split came from the hash of its key (see
    ``read_shard_records``). Before the carve out of val: ``carved_split`` applies it."""
    captions = next((sample.fields[f] for f in fields if sample.fields.get(f)), ())
    captions = tuple(map(str, captions)) if isinstance(captions, (list, tuple)) else (str(captions),)
    split = sample.fields.get("split")
    split = "train" if split == "restval" else split
    from_hash = split not in SPLITS
    if from_hash:
        # The key, unless it is only a row number: that would split every file the same way.
        share = stable_share(sample.path if sample.numbered or sample.key is None else sample.key)
        split = "test" if share < test_fraction else "val" if share < test_fraction + val_fraction else "train"
    record = Record(image_id=sample.path, image=sample.path, captions=tuple(c.strip() for c in captions),
                    split=split, objects=_objects(sample.fields.get("objects")))
    return record, from_hash


def carved_split(record: Record, *, from_hash: bool, carve: bool, test_fraction: float) -> str:
    """A record's split after ``read_sources``'s carve of test out of val (``carve``: ``carves_val``)."""
    if carve and not from_hash and record.split == "val" and stable_share(record.image_id) < test_fraction:
        return "test"
    return record.split


def read_shard_records(uri: str, kind: str, *, val_fraction: float, test_fraction: float, image_column: str = "",
                       key_column: str = "", caption_column: str = "") -> tuple[list[Record], set[str]]:
    """The records of WebDataset or Parquet shards, and the ids of those whose split came from the hash.

    A record's ``image_id`` and ``image`` are the sample's path (``shard#key``). Its captions are the
    ``caption_column`` field, else the first of ``captions`` (a list), ``caption``, ``txt`` (a tar's
    .txt), ``text`` the sample has; its split the sample's ``split`` field, else by a hash of the key;
    ``objects`` (the shapes world's ground truth) is kept when there. Broken samples, and whole shards that
    cannot be read, are records too: prepare's decode step lists them as errors, never drops them silently.
    The shards' text is read here, several at a time (a tar is streamed, its images skipped; a Parquet
    file's image column is not read). prepare does not call this: it reads shards in tasks
    (``capray.features``); evaluate does, for the shapes world's ground truth.
    """
    uris = shards.list_shards(uri, kind)
    if not uris:
        raise AnnotationError(f"{uri}: no {kind} shards")
    fields = caption_fields(caption_column)
    columns = shard_text_columns(caption_column)

    unknown: set[str] = set()

    def read(shard: str) -> list[tuple[Record, bool]]:
        out = []
        for sample in shards.iter_samples(shard, image_extensions=shards.IMAGE_EXTENSIONS, image_column=image_column,
                                          key_column=key_column, columns=columns, images=False):
            record, from_hash = shard_record(sample, fields=fields, val_fraction=val_fraction,
                                             test_fraction=test_fraction)
            if from_hash and sample.fields.get("split") is not None:
                unknown.add(str(sample.fields["split"]))
            out.append((record, from_hash))
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:  # S3 reads wait on the network: overlap them
        parts = list(pool.map(read, uris))
    records = [r for part in parts for r, _ in part]
    log.info("%s: %d samples in %d %s shard(s)", uri, len(records), len(uris), kind)
    if unknown:
        log.warning("%s: split values %s are none of %s: those samples are split by a hash of their key",
                    uri, ", ".join(sorted(unknown)[:5]), ", ".join(SPLITS))
    return records, {r.image_id for part in parts for r, from_hash in part if from_hash}


def shard_text_columns(caption_column: str = "") -> tuple[str, ...]:
    """The Parquet columns a shard's records are made of (besides the key)."""
    return (*caption_fields(caption_column), "split", "objects")


def _objects(value: Any) -> tuple[dict, ...] | None:
    """Ground-truth objects of a shard sample: a list, or JSON text of one (Parquet); else none."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return tuple(value) if isinstance(value, list) and all(isinstance(o, dict) for o in value) else None


def stable_share(image_id: str) -> float:
    """Where ``image_id`` falls in [0, 1); an image is carved into test when this is below the fraction.

    SHA-256 rather than ``hash()``: Python salts string hashes per process (PYTHONHASHSEED), which
    would move images between splits from one run to the next.
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def iter_manifest(uri: str, *, images: str | None = None) -> Iterator[Record]:
    """The records of a JSONL manifest, one line at a time (streamed: it may have millions of lines)."""
    root = storage.normalize(images) if images else storage.parent(uri)
    empty = True
    for number, line in enumerate(storage.iter_lines(uri), start=1):
        if line.strip():
            empty = False
            yield _manifest_record(line, f"{uri} line {number}", root)
    if empty:
        raise AnnotationError(f"{uri}: the manifest has no records")


def _read_manifest(uri: str, text: str, root: str) -> list[Record]:
    records = [_manifest_record(line, f"{uri} line {number}", root)
               for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not records:
        raise AnnotationError(f"{uri}: the manifest has no records")
    return records


def _manifest_record(line: str, where: str, root: str) -> Record:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(row, dict) or not isinstance(row.get("image"), str):
        raise AnnotationError(f'{where}: each line needs an "image" string')
    captions = row.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise AnnotationError(f'{where}: "captions" must be a list of strings')
    split = _check_split(row.get("split", "train"), where)
    objects = row.get("objects")
    return Record(image_id=str(row.get("image_id", row["image"])), image=_resolve(root, row["image"]),
                  captions=tuple(captions), split=split, objects=tuple(objects) if objects is not None else None)


def _read_coco(uri: str, obj: dict, root: str, split: str | None) -> list[Record]:
    if split is None:
        split = "val" if "val" in posixpath.basename(uri) else "train"
    _check_split(split, uri)
    captions: dict[Any, list[str]] = defaultdict(list)
    for i, ann in enumerate(_as_list(obj, "annotations", uri)):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise AnnotationError(f'{uri}: annotations[{i}] needs "image_id" and a "caption" string')
        captions[ann["image_id"]].append(ann["caption"].strip())
    records = []
    for i, img in enumerate(_as_list(obj, "images", uri)):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise AnnotationError(f'{uri}: images[{i}] needs "id" and a "file_name" string')
        records.append(Record(image_id=str(img["id"]), image=_resolve(root, img["file_name"]),
                              captions=tuple(captions.get(img["id"], ())), split=split))
    return records


def _read_karpathy(uri: str, obj: dict, root: str) -> list[Record]:
    records = []
    for i, img in enumerate(_as_list(obj, "images", uri)):
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
            raise AnnotationError(f'{uri}: images[{i}] needs a "filename" string')
        sentences = img.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise AnnotationError(f'{uri}: images[{i}] needs "sentences" with a "raw" caption each')
        split = "train" if img.get("split") == "restval" else img.get("split")  # restval is train data
        split = _check_split(split, f"{uri} images[{i}]")
        relative = posixpath.join(img["filepath"], img["filename"]) if img.get("filepath") else img["filename"]
        image_id = img.get("cocoid", img.get("imgid", img["filename"]))
        records.append(Record(image_id=str(image_id), image=_resolve(root, relative),
                              captions=tuple(s["raw"].strip() for s in sentences), split=split))
    return records


def _resolve(root: str, path: str) -> str:
    if storage.is_remote(path) or path.startswith("/"):
        return path
    return storage.join(root, path)


def _check_split(split: Any, where: str) -> str:
    if split not in SPLITS:
        raise AnnotationError(f"{where}: split must be one of {', '.join(SPLITS)} (or restval), got {split!r}")
    return split


def _as_list(obj: dict, key: str, uri: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise AnnotationError(f'{uri}: "{key}" must be a list')
    return value


def _first(items: Any) -> dict:
    return items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
