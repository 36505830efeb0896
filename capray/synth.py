"""The shapes world: a generated captioned dataset with ground truth (``capray synth``).

Each image shows one or two flat objects (a circle, square or triangle in one of five saturated
colours, small or large) on a light background. Every manifest line carries the reference captions
and the ground-truth objects, so a model's caption can be scored for naming the right objects
(:func:`object_accuracy`), not only by BLEU. Two objects never overlap, never share both colour and
shape, and sit so that their relation ("left of", "above", ...) is never in doubt.

Layouts written by :func:`generate`, one per ``format``::

    files        OUT/images/{train,val,test}/shape-000042.png
                 OUT/synth.json        the resolved SynthConfig
                 OUT/manifest.jsonl    one line per image; written last, so its presence means "done"
    webdataset   OUT/shards/00000.tar  img2dataset's layout: 000000042.jpg, .txt, .json per image
                 OUT/synth.json        the SynthConfig, format and shard size; written last ("done")
    parquet      OUT/parquet/00000.parquet   one row per image (``PARQUET_SCHEMA``), JPEG bytes inline
                 OUT/synth.json        as for webdataset

The shards hold ``samples_per_shard`` images each in index order, the last one the rest; every image
carries the same captions, split and objects as its manifest line in the files layout. Image ``i`` is
drawn from a random generator seeded with ``(seed, i)`` alone, so the same seed gives byte-identical
images, manifest and tar shards on every run and on every machine (with the same Pillow).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tarfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from capray import storage
from capray.config import SYNTH_FORMATS, SynthConfig
from capray.annotations import SPLITS
from capray.errors import ConfigError
from capray.vocab import tokenize

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
WORDS = ("a", "there", "is", "on", "plain", "background", "of", "left", "right", "above", "below",
         *SIZES, *COLORS, *SHAPES)
"""Every word a reference caption may use."""

COLOR_RGB = MappingProxyType({
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 180),
})
"""Nominal colour of each object colour (drawn with a jitter of at most ``COLOR_JITTER`` per channel)."""
COLOR_JITTER = 12

SIZE_FRACTIONS = MappingProxyType({"small": (0.18, 0.24), "large": (0.34, 0.42)})
"""Side of an object's box as a fraction of the image side, drawn uniformly from this range."""

INVERSE = MappingProxyType({"left of": "right of", "right of": "left of", "above": "below", "below": "above"})

MIN_AXIS_RATIO = 2.0
"""Between two objects, the centres' offset on the dominant axis is at least this times the other."""
MIN_OFFSET = 0.15
"""... and at least this fraction of the image side."""
GAP = 0.04
"""Free space between two objects' boxes, as a fraction of the image side."""
BORDER = 0.02
"""Free space between an object and the image edge, as a fraction of the image side."""

BACKGROUNDS = ("plain", "gradient", "noise")

JPEG_QUALITY = 95
"""Quality of the JPEGs in the webdataset and Parquet shards."""
WEBDATASET_MEMBERS = ("jpg", "txt", "json")
"""The tar members of one sample, in this order, each ``KEY.<extension>``."""
PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("split", pa.string()),
    ("objects", pa.string()),  # JSON: the ground-truth objects as in the manifest
    ("jpg", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])
"""The columns of ``OUT/parquet/*.parquet``; the other fields are those of a webdataset sample's JSON."""


@dataclass(frozen=True)
class Example:
    """One generated image with its ground truth."""

    image: Image.Image
    objects: tuple[dict, ...]
    """``{"shape", "color", "size", "box": [x0, y0, x1, y1]}``; pixel bounds, x1 and y1 exclusive."""
    captions: tuple[str, ...]


def generate(out: str, config: SynthConfig, *, format: str = "files", samples_per_shard: int = 1000) -> str:
    """Write the dataset under ``out`` (a local path or ``s3://`` URI) in ``format`` (see the module
    docstring); return the manifest URI (files) or the folder of the shards (webdataset, parquet)."""
    if format not in SYNTH_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(SYNTH_FORMATS)}, got {format!r}")
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    splits = assign_splits(config)
    logger.info("shapes world: drawing %d images of %d px into %s (%s)", config.num_images, config.image_size,
                out, format)
    if format == "files":
        written = _write_files(out, config, splits)
    else:
        written = _write_shards(out, config, splits, format=format, samples_per_shard=samples_per_shard)
    counts = {s: splits.count(s) for s in SPLITS}
    logger.info("shapes world: wrote %s (%s)", written, ", ".join(f"{s} {n}" for s, n in counts.items()))
    return written


def _write_files(out: str, config: SynthConfig, splits: Sequence[str]) -> str:
    """One PNG per image and the manifest (written last); return the manifest URI."""

    def write(index: int) -> str:
        example = make_example(index, config)
        image_id = f"shape-{index:06d}"
        relative = f"images/{splits[index]}/{image_id}.png"
        buffer = io.BytesIO()
        example.image.save(buffer, format="PNG", compress_level=1)  # 2x faster than 6, ~10% larger
        storage.write_bytes(storage.join(out, *relative.split("/")), buffer.getvalue())
        return json.dumps({"image_id": image_id, "image": relative, "captions": list(example.captions),
                           "split": splits[index], "objects": list(example.objects)})

    # Threads overlap PNG compression (zlib drops the GIL) and object-store round trips.
    with ThreadPoolExecutor(max_workers=8) as pool:
        lines = list(pool.map(write, range(config.num_images)))
    storage.write_json(storage.join(out, "synth.json"), dataclasses.asdict(config))
    manifest = storage.join(out, "manifest.jsonl")
    storage.write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def _write_shards(out: str, config: SynthConfig, splits: Sequence[str], *, format: str,
                  samples_per_shard: int) -> str:
    """Numbered tar or Parquet shards of ``samples_per_shard`` images, then ``synth.json``; return their folder."""
    folder, extension, encode = {"webdataset": ("shards", "tar", _tar_shard),
                                 "parquet": ("parquet", "parquet", _parquet_shard)}[format]
    root = storage.join(out, folder)
    num_shards = math.ceil(config.num_images / samples_per_shard)

    def write(shard: int) -> None:
        indices = range(shard * samples_per_shard, min((shard + 1) * samples_per_shard, config.num_images))
        uri = storage.join(root, f"{shard:05d}.{extension}")
        storage.write_bytes(uri, encode([_sample(i, config, splits[i]) for i in indices]))
        logger.info("shapes world: wrote %s (%d images)", uri, len(indices))

    # One shard per task: a shard is built whole in memory, so 8 in flight bound the memory.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(num_shards)))
    storage.write_json(storage.join(out, "synth.json"), {**dataclasses.asdict(config), "format": format,
                                                         "samples_per_shard": samples_per_shard})
    return root


def _sample(index: int, config: SynthConfig, split: str) -> tuple[dict, bytes]:
    """Image ``index`` as a webdataset sample: its JSON fields and its JPEG bytes."""
    example = make_example(index, config)
    buffer = io.BytesIO()
    example.image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    key = f"{index:09d}"
    return {"key": key, "url": f"shapes://{config.seed}/{index}", "caption": example.captions[0],
            "captions": list(example.captions), "split": split, "objects": list(example.objects),
            "width": config.image_size, "height": config.image_size}, buffer.getvalue()


def _tar_shard(samples: Sequence[tuple[dict, bytes]]) -> bytes:
    """A tar of ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample; time, owner and mode are fixed, so the
    same samples give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for fields, jpeg in samples:
            members = {"jpg": jpeg, "txt": fields["caption"].encode("utf-8"),
                       "json": json.dumps(fields).encode("utf-8")}
            for extension in WEBDATASET_MEMBERS:
                info = tarfile.TarInfo(f"{fields['key']}.{extension}")
                info.size, info.mtime, info.mode = len(members[extension]), 0, 0o644
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                tar.addfile(info, io.BytesIO(members[extension]))
    return buffer.getvalue()


def _parquet_shard(samples: Sequence[tuple[dict, bytes]]) -> bytes:
    """One Parquet file of ``PARQUET_SCHEMA`` rows."""
    rows = [{**fields, "objects": json.dumps(fields["objects"]), "jpg": jpeg} for fields, jpeg in samples]
    table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def assign_splits(config: SynthConfig) -> list[str]:
    """The split of each image index: shuffled by the seed, sized by the fractions.

    Each split with a positive fraction gets at least one image once there are enough images.
    """
    fractions = config.split_fractions
    n = config.num_images
    exact = {s: fractions[s] * n for s in SPLITS}
    counts = {s: math.floor(exact[s]) for s in SPLITS}
    # Largest remainder first; ties go to the earlier split.
    for s in sorted(SPLITS, key=lambda s: counts[s] - exact[s])[: n - sum(counts.values())]:
        counts[s] += 1
    wanted = [s for s in SPLITS if fractions[s] > 0]
    if n >= len(wanted):
        for s in wanted:
            if counts[s] == 0:
                counts[max(SPLITS, key=lambda t: counts[t])] -= 1
                counts[s] = 1
    order = np.random.default_rng(config.seed).permutation(n)
    labels = [s for s in SPLITS for _ in range(counts[s])]
    splits = [""] * n
    for label, index in zip(labels, order):
        splits[index] = label
    return splits


def make_example(index: int, config: SynthConfig) -> Example:
    """Image ``index`` of the dataset ``config`` describes; depends on ``(config.seed, index)`` only."""
    rng = np.random.default_rng([config.seed, index])
    size = config.image_size
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    objects = _sample_objects(rng, size)
    image = _draw_background(rng, size, background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        base = np.array(COLOR_RGB[obj["color"]])
        fill = tuple(int(c) for c in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255))
        _draw_shape(draw, obj["shape"], obj["box"], fill)
    captions = _captions(rng, objects, plain=background == "plain", count=config.captions_per_image)
    return Example(image=image, objects=tuple(objects), captions=tuple(captions))


def relation(a: Mapping, b: Mapping) -> str:
    """Where object ``a`` is relative to ``b``, from their box centres' dominant axis."""
    (ax, ay), (bx, by) = _centre(a["box"]), _centre(b["box"])
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"  # image y grows downward


def relation_is_clear(a: Mapping, b: Mapping, image_size: int) -> bool:
    """True if the centres' offset on one axis dominates the other (see ``MIN_AXIS_RATIO``, ``MIN_OFFSET``)."""
    (ax, ay), (bx, by) = _centre(a["box"]), _centre(b["box"])
    major, minor = sorted((abs(bx - ax), abs(by - ay)), reverse=True)
    return major >= MIN_AXIS_RATIO * minor and major >= MIN_OFFSET * image_size


def boxes_apart(a: Sequence[int], b: Sequence[int], gap: float) -> bool:
    """True if boxes ``a`` and ``b`` (x1, y1 exclusive) are at least ``gap`` pixels apart on some axis."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0]
            or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def named_objects(caption: str) -> list[tuple[str, str]]:
    """The ``(color, shape)`` pairs a caption names: a colour word, maybe a size word, then a shape word."""
    tokens = tokenize(caption)
    named = []
    for i, token in enumerate(tokens):
        if token not in COLORS:
            continue
        j = i + 1
        if j < len(tokens) and tokens[j] in SIZES:
            j += 1
        if j < len(tokens) and tokens[j] in SHAPES:
            named.append((token, tokens[j]))
    return named


def names_objects_correctly(caption: str, objects: Sequence[Mapping]) -> bool:
    """True iff the caption names exactly the ground-truth ``(color, shape)`` pairs, each once."""
    named = named_objects(caption)
    truth = {(o["color"], o["shape"]) for o in objects}
    return len(named) == len(truth) and set(named) == truth


def object_accuracy(captions: Sequence[str], objects: Sequence[Sequence[Mapping]]) -> float:
    """Fraction of captions that name their image's objects correctly."""
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} object lists")
    if not captions:
        raise ValueError("no captions to score")
    return sum(names_objects_correctly(c, o) for c, o in zip(captions, objects)) / len(captions)


def _sample_objects(rng: np.random.Generator, size: int) -> list[dict]:
    num_objects = 1 if rng.random() < 0.5 else 2
    kinds = rng.choice(len(COLORS) * len(SHAPES), size=num_objects, replace=False)
    objects = [{"shape": SHAPES[k % len(SHAPES)], "color": COLORS[k // len(SHAPES)],
                "size": SIZES[rng.integers(len(SIZES))]} for k in kinds]
    sides = [round(rng.uniform(*SIZE_FRACTIONS[o["size"]]) * size) for o in objects]
    border = max(1, round(BORDER * size))
    if num_objects == 1:
        x0, y0 = (int(rng.integers(border, size - border - sides[0] + 1)) for _ in range(2))
        objects[0]["box"] = [x0, y0, x0 + sides[0], y0 + sides[0]]
        return objects
    boxes = _place_pair(rng, size, sides, border)
    for obj, box in zip(objects, boxes):
        obj["box"] = box
    return objects


def _place_pair(rng: np.random.Generator, size: int, sides: list[int], border: int) -> list[list[int]]:
    """Boxes for two objects that are apart and whose relation is clear, in either order."""
    gap = max(2, round(GAP * size))
    for _ in range(1000):
        # Along the dominant axis the object with the lower coordinate comes first; which of the
        # two objects that is, and which axis dominates, is drawn at random.
        first = int(rng.integers(2))
        p_side, q_side = sides[first], sides[1 - first]
        p_hi = size - border - q_side - gap - p_side  # the last start that leaves room for q after p
        if p_hi < border:
            raise AssertionError(f"two objects of {sides} px cannot fit side by side in {size} px")
        p0 = int(rng.integers(border, p_hi + 1))
        q0 = int(rng.integers(p0 + p_side + gap, size - border - q_side + 1))
        offset = (q0 + q_side / 2) - (p0 + p_side / 2)
        # Across, keep the centres well inside offset / MIN_AXIS_RATIO; the check below is exact.
        p1 = int(rng.integers(border, size - border - p_side + 1))
        shift = rng.uniform(-1, 1) * 0.9 * offset / MIN_AXIS_RATIO
        q1 = int(np.clip(round(p1 + p_side / 2 + shift - q_side / 2), border, size - border - q_side))
        if rng.random() < 0.5:  # horizontal: p is left of q
            p_box, q_box = [p0, p1, p0 + p_side, p1 + p_side], [q0, q1, q0 + q_side, q1 + q_side]
        else:  # vertical: p is above q
            p_box, q_box = [p1, p0, p1 + p_side, p0 + p_side], [q1, q0, q1 + q_side, q0 + q_side]
        boxes = [p_box, q_box] if first == 0 else [q_box, p_box]
        a, b = ({"box": box} for box in boxes)
        if boxes_apart(boxes[0], boxes[1], gap) and relation_is_clear(a, b, size):
            return boxes
    raise AssertionError(f"no clear layout for objects of {sides} px in {size} px")


def _draw_background(rng: np.random.Generator, size: int, kind: str) -> Image.Image:
    """A light, low-saturation background: flat, a gentle gradient, or mild grey noise."""
    base = rng.integers(215, 246) + rng.integers(-8, 9, 3)  # (3,) a light grey with a faint tint
    if kind == "plain":
        return Image.new("RGB", (size, size), tuple(int(c) for c in base))
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-0.5, 0.5, size)
        t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (S, S), within [-0.71, 0.71]
        shade = t[:, :, None] * rng.uniform(10, 25)  # (S, S, 1)
    else:
        shade = rng.normal(0, rng.uniform(2, 6), (size, size, 1))  # (S, S, 1) the same on every channel
    pixels = np.clip(base[None, None, :] + shade, 190, 255).astype(np.uint8)  # (S, S, 3)
    return Image.fromarray(pixels)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL includes the last pixel
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _captions(rng: np.random.Generator, objects: list[dict], *, plain: bool, count: int) -> list[str]:
    """``count`` references from the templates in a seeded order (distinct while templates last)."""
    templates = _one_object_captions(objects[0], plain) if len(objects) == 1 else _two_object_captions(*objects)
    order = rng.permutation(len(templates))
    return [templates[order[i % len(templates)]] for i in range(count)]


def _one_object_captions(obj: Mapping, plain: bool) -> list[str]:
    full, short = _phrase(obj, sized=True), _phrase(obj, sized=False)
    captions = [f"a {full}", f"a {short}", f"there is a {full}", f"there is a {short}"]
    if plain:  # only said of backgrounds that really are flat
        captions += [f"a {full} on a plain background", f"a {short} on a plain background"]
    return captions


def _two_object_captions(a: Mapping, b: Mapping) -> list[str]:
    rel = relation(a, b)
    inv = INVERSE[rel]
    a_full, a_short = _phrase(a, sized=True), _phrase(a, sized=False)
    b_full, b_short = _phrase(b, sized=True), _phrase(b, sized=False)
    return [
        f"a {a_short} {rel} a {b_short}",
        f"a {a_full} {rel} a {b_full}",
        f"a {a_short} {rel} a {b_full}",
        f"a {a_full} {rel} a {b_short}",
        f"a {b_short} {inv} a {a_short}",
        f"a {b_full} {inv} a {a_full}",
        f"there is a {a_short} {rel} a {b_short}",
        f"there is a {b_short} {inv} a {a_short}",
    ]


def _phrase(obj: Mapping, *, sized: bool) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}" if sized else f"{obj['color']} {obj['shape']}"


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
