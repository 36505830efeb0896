"""capray.evaluation: beam search in a Ray Data actor pool (here locally; on the worker nodes of an
autoscaling cluster in test_cluster_jobs), and attention grounding (capray.metrics.attention_grounding) on the shapes world.

The feature dataset is written here in prepare's format (a random frozen resnet18 over a small shapes
world, 4×4 regions) instead of by prepare, which would cost a Ray job: what is tested is evaluate.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capray import storage
from capray.annotations import read_annotations
from capray.checkpoint import load_checkpoint, model_state, write_checkpoint
from capray.encoders import EncoderSpec, build_encoder
from capray.evaluation import EvaluateConfig, evaluate, image_size, print_metrics, relative_boxes
from capray.formats import CAPTIONS, FEATURES, IMAGE, IMAGE_ID, METRICS_FILE, PREPARE_FILE, RESULTS_FILE, TOKENS
from capray.formats import feature_schema
from capray.images import decode_image
from capray.metrics import attention_grounding, cell_overlaps
from capray.model import Decoder, DecoderConfig
from capray.synth import SynthConfig, generate
from capray.vocab import SPECIALS, Vocabulary

SIZE = 128  # resnet18's last stage: 4×4 regions
MAX_LENGTH = 8


# --- attention grounding on constructed cases (no Ray) -------------------------------------------------

RED_CIRCLE = {"shape": "circle", "color": "red", "size": "large", "box": [0.0, 0.0, 0.5, 0.5]}  # top-left 2×2 cells
BLUE_SQUARE = {"shape": "square", "color": "blue", "size": "small", "box": [0.75, 0.75, 1.0, 1.0]}  # bottom-right cell


def _one_hot(*cells: int, regions: int = 16) -> np.ndarray:
    alpha = np.zeros(regions)
    alpha[list(cells)] = 1.0 / len(cells)
    return alpha


def test_cell_overlaps_are_the_covered_fraction_of_each_cell():
    assert np.array_equal(cell_overlaps((0.0, 0.0, 0.5, 0.5), 2), [[1.0, 0.0], [0.0, 0.0]])
    half = cell_overlaps((0.25, 0.5, 0.5, 1.0), 2)  # the right half of the bottom-left cell, no other
    np.testing.assert_allclose(half, [[0.0, 0.0], [0.5, 0.0]])
    np.testing.assert_allclose(cell_overlaps((0.1, 0.2, 0.7, 0.9), 4).mean(), 0.6 * 0.7)  # mean = area fraction


def test_attention_inside_the_box_grounds_fully_and_uniform_attention_scores_the_area():
    objects = [RED_CIRCLE, BLUE_SQUARE]
    assert attention_grounding(["red"], _one_hot(0, 1, 4, 5)[None], objects)[::2] == (1.0, 1)  # all inside
    # "a" names nothing; "red" looks inside the red circle's box, "circle" at the square, "square" at the square.
    looks = np.stack([_one_hot(0), _one_hot(0, 1, 4, 5), _one_hot(15), _one_hot(15)])
    mass, chance, count = attention_grounding(["a", "red", "circle", "square"], looks, objects)
    assert count == 3
    np.testing.assert_allclose(mass / count, (1.0 + 0.0 + 1.0) / 3)
    np.testing.assert_allclose(chance / count, (0.25 + 0.25 + 0.0625) / 3)

    uniform = np.full((2, 16), 1 / 16)
    mass, chance, count = attention_grounding(["blue", "square"], uniform, objects)
    assert count == 2
    np.testing.assert_allclose(mass / count, 0.0625)  # uniform attention: exactly the box's share of the image
    np.testing.assert_allclose(chance, mass)


def test_a_word_naming_two_objects_or_none_is_not_counted():
    two_red = [RED_CIRCLE, {**BLUE_SQUARE, "color": "red"}]
    mass, chance, count = attention_grounding(["red", "green", "circle"], np.full((3, 16), 1 / 16), two_red)
    assert count == 1  # "circle" only: "red" names both objects, "green" neither
    np.testing.assert_allclose(mass, 0.25)


def test_boxes_become_fractions_of_the_oriented_source_image(tmp_path):
    png = tmp_path / "wide.png"
    Image.new("RGB", (200, 100)).save(png)
    assert image_size(str(png)) == (200, 100)
    (box,) = relative_boxes(({"shape": "circle", "color": "red", "box": [50, 25, 100, 100]},), str(png))
    assert box["box"] == [0.25, 0.25, 0.5, 1.0] and box["shape"] == "circle"
    rotated = Image.new("RGB", (200, 100))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait: decode_image turns it
    jpeg = tmp_path / "turned.jpg"
    rotated.save(jpeg, exif=exif)
    assert image_size(str(jpeg)) == (100, 200)
    assert decode_image(jpeg.read_bytes(), 8)[1:] == (100, 200)  # the same size decode_image reports


def test_printed_metrics_carry_the_grounding_line_with_its_chance_level(capsys):
    metrics = {"split": "test", "num_images": 2, "beam_size": 3, "bleu4": 0.5, "attention_grounding": 0.61,
               "attention_grounding_chance": 0.12, "attention_grounding_words": 9}
    print_metrics(metrics)
    assert "attention grounding 0.610 (chance 0.120, 9 colour/shape words)" in capsys.readouterr().out
    print_metrics({k: v for k, v in metrics.items() if not k.startswith("attention")})
    assert "grounding" not in capsys.readouterr().out  # no ground truth: no line


# --- a small shapes-world feature dataset and checkpoint -------------------------------------------------

def write_shapes_dataset(root: Path) -> dict:
    """A shapes world, its test split encoded in prepare's format (2 Parquet files), and a tiny checkpoint
    whose vocabulary holds the colour and shape words and never emits a special token."""
    manifest = generate(str(root / "shapes"), SynthConfig(num_images=60, seed=7, image_size=SIZE))
    records = [r for r in read_annotations(manifest) if r.split == "test"]
    encoder = build_encoder(EncoderSpec("resnet18", "none", SIZE))
    pixels = np.stack([decode_image(storage.read_bytes(r.image), SIZE)[0] for r in records])
    with torch.no_grad():
        features = encoder(torch.from_numpy(pixels)).numpy().astype(np.float16)  # (N, P, E)
    num_regions, num_features = features.shape[1:]
    out = root / "features"
    (out / "test").mkdir(parents=True)
    half = len(records) // 2
    for part, rows in enumerate((slice(0, half), slice(half, None))):
        table = pa.table({
            IMAGE_ID: [r.image_id for r in records[rows]], IMAGE: [r.image for r in records[rows]],
            FEATURES: pa.FixedShapeTensorArray.from_numpy_ndarray(features[rows]),
            CAPTIONS: [list(r.captions) for r in records[rows]], TOKENS: [[] for _ in records[rows]],
        }, schema=feature_schema(num_regions, num_features))
        pq.write_table(table, out / "test" / f"part-{part}.parquet")
    info = {"encoder": encoder.spec.to_dict(), "num_regions": num_regions, "num_features": num_features,
            "splits": {"test": {"images": len(records)}}, "objects": True,
            "config": {"annotations": [manifest], "images": [], "test_fraction": 0.0}}
    (out / PREPARE_FILE).write_text(json.dumps(info))

    words = sorted({w for r in read_annotations(manifest) for c in r.captions for w in c.split()})
    vocab = Vocabulary(list(SPECIALS) + words)
    config = DecoderConfig(vocab_size=len(vocab), feature_dim=num_features, embed_dim=16, hidden_dim=32,
                           projection_dim=16, attention_dim=16)
    torch.manual_seed(0)
    decoder = Decoder(config)
    with torch.no_grad():
        decoder.out.bias[: len(SPECIALS)] = -1e4
    checkpoint = root / "checkpoint"
    write_checkpoint(str(checkpoint), state=model_state(encoder_state=encoder.state_dict(),
                                                        decoder_state=decoder.state_dict()),
                     config={"encoder": encoder.spec.to_dict(), "decoder": config.to_dict()}, vocab=vocab,
                     train_state={"epoch": 1})
    return {"features": str(out), "checkpoint": str(checkpoint), "records": records}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return write_shapes_dataset(tmp_path_factory.mktemp("eval"))


def _direct_search(shapes: dict) -> dict[str, tuple[str, list[str], np.ndarray]]:
    """Beam search in this process over the stored features: image id → (caption, words, attention)."""
    model = load_checkpoint(shapes["checkpoint"])
    table = pq.ParquetDataset(shapes["features"] + "/test").read()
    features = torch.from_numpy(table.column(FEATURES).combine_chunks().to_numpy_ndarray()).float()
    with torch.no_grad():
        decoded = model.decoder.beam_search(features, beam_size=3, max_length=MAX_LENGTH)
    out = {}
    for row, image_id in enumerate(table.column(IMAGE_ID).to_pylist()):
        length = int(decoded.lengths[row])
        tokens = decoded.tokens[row].tolist()
        out[image_id] = (model.vocab.decode(tokens), [model.vocab.words[t] for t in tokens[:length]],
                         decoded.attention[row, :length].numpy())
    return out


@pytest.mark.slow
def test_actor_pool_gives_the_captions_of_a_direct_search_and_measures_grounding(ray_local, shapes, tmp_path,
                                                                                  caplog):
    caplog.set_level(logging.INFO, logger="capray.progress")
    metrics = evaluate(EvaluateConfig(checkpoint=shapes["checkpoint"], features=shapes["features"],
                                      out=str(tmp_path), beam_size=3, max_length=MAX_LENGTH, batch_size=2))
    progress = [r.getMessage() for r in caplog.records if r.name == "capray.progress"]
    n = metrics["num_images"]
    assert progress and progress[-1].startswith(f"evaluate: {n}/{n} images (100.0%)"), progress
    direct = _direct_search(shapes)
    results = {r["image_id"]: r["caption"] for r in json.loads((tmp_path / RESULTS_FILE).read_text())}
    assert results == {i: caption for i, (caption, _, _) in direct.items()} and len(results) >= 4
    assert len(set(results.values())) > 1  # a model that says one thing for every image would prove little

    written = json.loads((tmp_path / METRICS_FILE).read_text())
    objects = {r.image_id: r.objects for r in shapes["records"]}
    sums = np.zeros(3)
    for image_id, (_, words, attention) in direct.items():
        sums += attention_grounding(words, attention, relative_boxes(objects[image_id], image_id_uri(shapes, image_id)))
    assert sums[2] > 0, "the captions name no object: nothing to ground"
    assert written["attention_grounding_words"] == sums[2]
    assert written["attention_grounding"] == pytest.approx(sums[0] / sums[2], abs=1e-5)
    assert written["attention_grounding_chance"] == pytest.approx(sums[1] / sums[2], abs=1e-9)
    assert 0 <= written["attention_grounding"] <= 1 and "object_accuracy" in written
    assert sum(written["beam_search_nodes"].values()) == written["num_images"] == len(direct)
    assert metrics["attention_grounding"] == written["attention_grounding"]


def image_id_uri(shapes: dict, image_id: str) -> str:
    return next(r.image for r in shapes["records"] if r.image_id == image_id)
