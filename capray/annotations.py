"""Annotation readers: COCO captions JSON, Karpathy split JSON and the JSONL manifest, to one record type."""
from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from capray import storage

SPLITS = ("train", "val", "test")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and what is wrong."""


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
    root = images or storage.parent(uri)
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


def _read_manifest(uri: str, text: str, root: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{uri} line {number}"
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
        records.append(Record(image_id=str(row.get("image_id", row["image"])),
                              image=_resolve(root, row["image"]), captions=tuple(captions),
                              split=split, objects=tuple(objects) if objects is not None else None))
    if not records:
        raise AnnotationError(f"{uri}: the manifest has no records")
    return records


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
