"""capray.gallery: one self-contained HTML page of a caption output, worst first, from a streamed pass.

Caption outputs are written here in the caption shard format (``capray.sink.write_parquet``, shard names
as the sink gives them) over real images: the shapes world (``capray.synth``) as loose files, as
WebDataset shards on a local S3 server (moto), and a few broken files. The page is parsed with the
standard library's HTML parser and, where a Chromium is on PATH, loaded in headless Chromium.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capray.errors import ConfigError
from capray import storage
from capray.config import GalleryConfig
from capray.formats import CAPTION_SCHEMA, PREPARE_FILE
from capray.gallery import COLUMNS, NUM_BINS, make_gallery, path_hash, read_batches, read_references, scan
from capray.sink import write_parquet
from capray.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


# --- caption outputs -----------------------------------------------------------------------------

def shard_name(index: int) -> str:
    return f"part-20260101T000000-abcdef-{index:06d}.parquet"  # as the sink names shards


def write_output(folder: str, rows: list[dict], *, num_shards: int = 1, row_group_size: int | None = None) -> str:
    """``rows`` (path, caption, score, error) as a caption output of ``num_shards`` shards."""
    full = [{"width": None, "height": None, **row} for row in rows]
    for i in range(num_shards):
        part = full[i::num_shards]
        write_parquet(storage.join(folder, shard_name(i)), pa.Table.from_pylist(part, schema=CAPTION_SCHEMA),
                      row_group_size=row_group_size)
    return folder


def synthetic_rows(count: int, *, seed: int = 0, error_every: int = 17) -> list[dict]:
    """Rows with scores spread over (-3, 0] and an error row every ``error_every``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        if i % error_every == 0:
            rows.append({"path": f"s3://b/img/{i:06d}.jpg", "caption": None, "score": None, "error": "cannot decode"})
        else:
            rows.append({"path": f"s3://b/img/{i:06d}.jpg", "caption": f"caption {i}",
                         "score": float(np.float32(-3 * rng.random())), "error": None})
    return rows


def batches_of(rows: list[dict], size: int):
    """A one-shot generator of record batches of ``COLUMNS``: what ``scan`` reads from an output."""
    schema = pa.schema([CAPTION_SCHEMA.field(c) for c in COLUMNS])
    for start in range(0, len(rows), size):
        yield pa.RecordBatch.from_pylist(rows[start:start + size], schema=schema)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """12 shapes-world images as files with their manifest (reference captions), 96 px."""
    root = str(tmp_path_factory.mktemp("shapes"))
    manifest = generate(root, SynthConfig(num_images=12, seed=3, image_size=96))
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    for record in records:
        record["image"] = os.path.join(root, record["image"])
    return {"root": root, "manifest": manifest, "records": records}


@pytest.fixture
def captioned(shapes, tmp_path) -> dict:
    """A caption output over the shapes images (scores by index), a broken file, a missing one, error rows."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    rows = [{"path": r["image"], "caption": r["captions"][0], "score": -0.05 - 0.1 * i, "error": None}
            for i, r in enumerate(shapes["records"])]
    rows += [
        {"path": str(broken), "caption": "a broken image that was captioned", "score": -0.5, "error": None},
        {"path": str(tmp_path / "gone.png"), "caption": "an image deleted since", "score": -0.6, "error": None},
        {"path": str(tmp_path / "bad1.jpg"), "caption": None, "score": None, "error": "cannot decode image: truncated"},
        {"path": str(tmp_path / "bad2.jpg"), "caption": None, "score": None, "error": "empty file"},
    ]
    output = write_output(str(tmp_path / "captions"), rows, num_shards=2)
    return {"output": output, "rows": rows, "broken": str(broken)}


# --- the page, parsed ----------------------------------------------------------------------------

class Page(HTMLParser):
    """The parts of a gallery page the tests look at: sections of cards, links, scripts, the summary."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, list[dict]] = {}
        self.order: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.summary: dict = {}
        self.rects = 0
        self._section = self._card = None
        self._text_into: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        if tag == "section":
            self._section = attrs["id"]
            self.order.append(self._section)
            self.sections[self._section] = []
        elif tag == "figure" and "card" in classes:
            self._card = {"path": attrs["data-path"], "score": attrs.get("data-score"), "error_class": "error" in classes,
                          "img": None, "placeholder": "", "caption": "", "error": "", "refs": []}
            self.sections[self._section].append(self._card)
        elif tag == "img" and self._card is not None:
            self._card["img"] = attrs["src"]
        elif tag == "dl" and attrs.get("id") == "summary":
            self.summary = {"rows": int(attrs["data-rows"]), "errors": int(attrs["data-errors"])}
        elif tag == "rect":
            self.rects += 1
        if self._card is not None and (tag in ("p", "div", "li")):
            kind = {"caption": "caption", "err": "error", "placeholder": "placeholder"}.get(classes[0] if classes else "")
            self._text_into = kind or ("refs" if tag == "li" else None)
            if self._text_into == "refs":
                self._card["refs"].append("")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._card = None
        elif tag == "section":
            self._section = None
        if tag in ("p", "div", "li"):
            self._text_into = None

    def handle_data(self, data):
        if self._card is None or self._text_into is None:
            return
        if self._text_into == "refs":
            self._card["refs"][-1] += data
        else:
            self._card[self._text_into] += data


def external_references(page: Page) -> list:
    """Anything that would make the browser fetch from outside the page."""
    found = []
    for tag, attrs in page.tags:
        if tag in ("link", "iframe", "object", "embed") or (tag == "script" and "src" in attrs):
            found.append((tag, attrs))
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            value = (attrs.get(name) or "").strip().lower()
            if value and not value.startswith(("#", "data:")):
                found.append((tag, name, value[:60]))
    return found


def gallery(output: str, page: Path, **options) -> tuple[Page, str]:
    make_gallery(GalleryConfig(captions=output, out=str(page), **options))
    text = page.read_text()
    return Page(text), text


# --- unit: the streaming pass --------------------------------------------------------------------

def test_scan_counts_and_picks_exactly_what_a_whole_table_would_give_from_one_pass_over_batches():
    rows = synthetic_rows(5000)
    found = scan(batches_of(rows, 97), sample=40, worst=15, seed=7)  # a one-shot generator: one pass

    ok = [r for r in rows if r["error"] is None]
    errors = [r for r in rows if r["error"] is not None]
    assert (found.rows, found.errors) == (5000, len(errors))
    expected_bins, _ = np.histogram([math.exp(r["score"]) for r in ok], bins=np.linspace(0, 1, NUM_BINS + 1))
    assert found.histogram == expected_bins.tolist()
    assert found.mean_score == pytest.approx(np.mean([r["score"] for r in ok]))
    assert [r.path for r in found.lowest] == [r["path"] for r in sorted(ok, key=lambda r: r["score"])[:15]]
    by_hash = sorted(rows, key=lambda r: path_hash(r["path"], 7))[:40]
    assert {r.path for r in found.sample} == {r["path"] for r in by_hash}
    assert {r.path for r in found.failed} <= {r["path"] for r in errors} and len(found.failed) == 15
    assert all(r.caption is None and r.error == "cannot decode" for r in found.failed)


def test_the_sample_shows_errors_first_then_lowest_confidence_first():
    found = scan(batches_of(synthetic_rows(3000, error_every=5), 500), sample=60, worst=0, seed=1)
    kinds = [row.error is None for row in found.sample]
    assert kinds == sorted(kinds) and not kinds[0] and kinds[-1]  # errors, then captions
    scores = [row.score for row in found.sample if row.error is None]
    assert scores == sorted(scores)
    assert found.lowest == [] and found.failed == []  # --worst 0: neither extra set


def test_the_same_seed_picks_the_same_rows_in_any_shard_order_and_another_seed_others():
    rows = synthetic_rows(4000)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)

    def picked(source, seed):
        return [r.path for r in scan(batches_of(source, 256), sample=30, worst=5, seed=seed).sample]

    assert picked(rows, 11) == picked(shuffled, 11)  # same rows, same page order
    assert set(picked(rows, 11)) != set(picked(rows, 12))


def test_read_batches_streams_bounded_batches_of_the_needed_columns_over_many_row_groups(tmp_path):
    rows = synthetic_rows(3000)
    output = write_output(str(tmp_path / "out"), rows, num_shards=3, row_group_size=100)  # 30 row groups
    (tmp_path / "out" / "summary.json").write_text("{}")  # not a shard: never read
    batches = read_batches(output, batch_rows=64)
    assert iter(batches) is batches  # a generator: nothing read before it is consumed
    sizes = []
    for batch in batches:
        assert batch.schema.names == list(COLUMNS)  # width and height are never read
        sizes.append(batch.num_rows)
    assert sum(sizes) == 3000 and max(sizes) <= 64


def test_a_folder_without_caption_shards_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match="no caption shards"):
        list(read_batches(str(tmp_path)))


# --- the page ------------------------------------------------------------------------------------

def test_the_page_shows_errors_then_the_worst_then_the_sample_and_refers_to_nothing_outside(captioned, tmp_path):
    rows = captioned["rows"]
    page, text = gallery(captioned["output"], tmp_path / "page.html", sample=8, worst=3, seed=5)

    assert page.order == ["errors", "lowest", "sample"]
    assert external_references(page) == [] and "<script" not in text and "http://" not in text
    assert page.summary == {"rows": len(rows), "errors": 2}
    assert page.rects == NUM_BINS + 1  # one bar per confidence bin, and the errors'
    by_path = {r["path"]: r for r in rows}

    errors = page.sections["errors"]
    assert sorted(c["path"] for c in errors) == sorted(r["path"] for r in rows if r["error"])
    assert all(c["error_class"] and by_path[c["path"]]["error"] in c["error"] for c in errors)

    ok = sorted((r for r in rows if not r["error"]), key=lambda r: r["score"])
    assert [c["path"] for c in page.sections["lowest"]] == [r["path"] for r in ok[:3]]

    sample = page.sections["sample"]
    assert len(sample) == 8
    expected = sorted(rows, key=lambda r: path_hash(r["path"], 5))[:8]
    assert {c["path"] for c in sample} == {r["path"] for r in expected}
    for card in sample:
        row = by_path[card["path"]]
        if row["error"]:
            assert row["error"] in card["error"]
        else:
            assert card["caption"] == row["caption"]
            assert float(card["score"]) == pytest.approx(row["score"], rel=1e-5)
    scores = [float(c["score"]) for c in sample if c["score"] is not None]
    assert scores == sorted(scores)
    assert [c["error_class"] for c in sample] == sorted((c["error_class"] for c in sample), reverse=True)


def test_each_readable_image_is_a_jpeg_thumbnail_and_an_unreadable_one_a_placeholder(captioned, tmp_path):
    import base64
    import io

    page, _ = gallery(captioned["output"], tmp_path / "page.html", sample=len(captioned["rows"]), worst=0,
                      thumbnail_size=48)
    cards = {c["path"]: c for c in page.sections["sample"]}
    assert len(cards) == len(captioned["rows"])
    images = [c for c in cards.values() if c["img"]]
    assert len(images) == 12  # every shapes image
    for card in images:
        assert card["img"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(card["img"].split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) == 48
    assert "cannot decode image" in cards[captioned["broken"]]["placeholder"]
    gone = next(p for p in cards if p.endswith("gone.png"))
    assert "no such file" in cards[gone]["placeholder"]
    assert all(cards[p]["placeholder"] for p in cards if p.endswith(("bad1.jpg", "bad2.jpg")))


def test_references_from_a_manifest_or_a_feature_dataset_are_shown_beside_the_caption(shapes, captioned, tmp_path):
    refs = {r["image"]: r["captions"] for r in shapes["records"]}
    page, _ = gallery(captioned["output"], tmp_path / "page.html", sample=20, worst=0, references=shapes["manifest"])
    cards = page.sections["sample"]
    with_refs = [c for c in cards if c["path"] in refs]
    assert len(with_refs) == 12
    for card in with_refs:
        assert card["refs"][:3] == refs[card["path"]][:3]
    assert all(c["refs"] == ["(no references for this image)"] for c in cards if c["path"] not in refs)

    # A feature dataset keys its captions by the same image URIs (prepare's ``image`` column).
    features = tmp_path / "features"
    records = shapes["records"]
    write_parquet(str(features / "test" / "part-0.parquet"), pa.table({
        "image_id": [r["image_id"] for r in records[:5]], "image": [r["image"] for r in records[:5]],
        "captions": [[f"feature reference {i}"] for i in range(5)]}))
    (features / PREPARE_FILE).write_text("{}")
    found = read_references(str(features), [r["image"] for r in records])
    assert found == {r["image"]: (f"feature reference {i}",) for i, r in enumerate(records[:5])}


def test_webdataset_samples_on_s3_are_read_from_their_shards(s3_bucket, tmp_path):
    folder = generate(f"{s3_bucket}/shapes", SynthConfig(num_images=10, seed=1, image_size=64), format="webdataset",
                      samples_per_shard=4)
    tars = sorted(storage.list_files(folder, extensions=("tar",)))
    keys = [f"{i:09d}" for i in range(10)]  # synth's keys, 4 per shard
    rows = [{"path": f"{tars[i // 4]}#{key}", "caption": f"sample {key}", "score": -0.1, "error": None}
            for i, key in enumerate(keys)]
    rows.append({"path": f"{tars[0]}#no-such-key", "caption": "a sample that is not there", "score": -0.2,
                 "error": None})
    output = write_output(f"{s3_bucket}/captions", rows)
    page_uri = f"{s3_bucket}/pages/gallery.html"
    make_gallery(GalleryConfig(captions=output, out=page_uri, sample=11, worst=0))
    page = Page(storage.read_text(page_uri))
    cards = {c["path"]: c for c in page.sections["sample"]}
    assert all(cards[r["path"]]["img"].startswith("data:image/jpeg;base64,") for r in rows[:10])
    assert "not found in" in cards[rows[10]["path"]]["placeholder"]


def test_parquet_shard_samples_are_read_by_their_key(tmp_path):
    folder = generate(str(tmp_path / "shapes"), SynthConfig(num_images=6, seed=2, image_size=64), format="parquet",
                      samples_per_shard=6)
    shard = next(storage.list_files(folder, extensions=("parquet",)))
    rows = [{"path": f"{shard}#{i:09d}", "caption": f"sample {i}", "score": -0.1 * i, "error": None} for i in range(6)]
    output = write_output(str(tmp_path / "captions"), rows)
    page, _ = gallery(output, tmp_path / "page.html", sample=6, worst=0)
    assert sorted(c["path"] for c in page.sections["sample"] if c["img"].startswith("data:image/jpeg")) == sorted(
        r["path"] for r in rows)


def test_the_command_writes_the_page_and_refuses_bad_input_in_one_line(captioned, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "capray.cli", "gallery", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})

    page = tmp_path / "site" / "g.html"
    done = run("--captions", captioned["output"], "--out", str(page), "--sample", "4")
    assert done.returncode == 0, done.stderr
    assert f"page: {page}" in done.stdout and len(Page(page.read_text()).sections["sample"]) == 4
    for args, needle in ((["--captions", str(tmp_path), "--out", str(page)], "no caption shards"),
                         (["--captions", captioned["output"], "--out", str(page), "--sample", "0"], "--sample"),
                         (["--captions", captioned["output"], "--out", str(page), "--sample", "100000"], "at most"),
                         (["--captions", captioned["output"], "--out", str(page), "--references",
                           str(tmp_path / "nothing.jsonl")], "--references")):
        result = run(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr


# --- in a real browser ---------------------------------------------------------------------------

PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.tagName))), true);
const __consoleError = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __consoleError(...a); };
</script>"""
PROBE_END = """<script>window.addEventListener('load', () => {
  const images = [...document.querySelectorAll('#sample img')];
  const b = document.body.dataset;
  b.probeImages = images.length;
  b.probeLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  b.probeCaptions = document.querySelectorAll('#sample .caption').length;
  b.probeErrors = JSON.stringify(window.__errors);
});</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")
def test_the_page_loads_in_headless_chromium_with_every_image_and_no_errors(shapes, tmp_path):
    rows = [{"path": r["image"], "caption": r["captions"][0], "score": -0.1 * i, "error": None}
            for i, r in enumerate(shapes["records"])]
    output = write_output(str(tmp_path / "captions"), rows)
    page_path = tmp_path / "page.html"
    _, text = gallery(output, page_path, sample=10, worst=2)

    def probe(html_text: str) -> dict:
        """Load a copy of the page with the probe in it (the page itself carries no script)."""
        probed = tmp_path / "probed.html"
        probed.write_text(html_text.replace("<head>", "<head>" + PROBE_HEAD, 1)
                          .replace("</body>", PROBE_END + "</body>", 1))
        dom = chromium("--dump-dom", probed.as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        return next(attrs for tag, attrs in Page(dom.stdout).tags if tag == "body")

    body = probe(text)
    assert json.loads(body["data-probe-errors"]) == []
    assert (body["data-probe-images"], body["data-probe-loaded"], body["data-probe-captions"]) == ("10", "10", "10")
    # The probe's control: a broken image and a failing script are seen.
    head, sample = text.split('<section id="sample">')
    broken = (head + '<section id="sample">' + sample.replace("base64,", "base64,AAAA", 1)).replace(
        "</body>", "<script>undefinedFunction()</script></body>", 1)
    control = probe(broken)
    assert control["data-probe-loaded"] == "9" and len(json.loads(control["data-probe-errors"])) >= 1

    shot = tmp_path / "shot.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1200,900", page_path.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, bars and pictures
