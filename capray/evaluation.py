"""``capray evaluate`` (COCO metrics on a split of the feature dataset) and ``capray attend`` (plots)."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from capray import shards, storage
from capray.config import EvaluateConfig
from capray.checkpoint import load_checkpoint
from capray.errors import ConfigError
from capray.features import load_prepare_info, read_config_records
from capray.formats import CAPTIONS, FEATURES, IMAGE, IMAGE_ID, METRICS_FILE, RESULTS_FILE
from capray.images import decode_image
from capray.metrics import score_captions
from capray.plots import plot_attention

log = logging.getLogger(__name__)


def evaluate(config: EvaluateConfig) -> dict:
    """Caption a split with beam search, score it, write metrics.json and COCO-format results."""
    started = time.perf_counter()
    info = load_prepare_info(config.features)
    if not info["splits"].get(config.split, {}).get("images"):
        raise ConfigError(f"{config.features}: the {config.split} split has no images")
    model = load_checkpoint(config.checkpoint)
    if info["num_features"] != model.decoder.config.feature_dim:
        raise ConfigError(f"--features {config.features} has {info['num_features']} channels per region, "
                          f"the checkpoint expects {model.decoder.config.feature_dim}")
    ids, hypotheses, references, scores = [], [], [], []
    for batch in iter_feature_batches(storage.join(config.features, config.split), config.batch_size):
        features = torch.from_numpy(np.array(batch[FEATURES])).float()
        decoded = model.decoder.beam_search(features, beam_size=config.beam_size, max_length=config.max_length,
                                            attention=False)
        ids += batch[IMAGE_ID]
        hypotheses += [model.vocab.decode(t) for t in decoded.tokens.tolist()]
        references += batch[CAPTIONS]
        scores += decoded.scores.tolist()
    metrics = score_captions(dict(zip(ids, references)), dict(zip(ids, hypotheses)))
    accuracy = _object_accuracy(info, ids, hypotheses)
    if accuracy is not None:
        metrics["object_accuracy"] = accuracy
    metrics.update({"num_images": len(ids), "beam_size": config.beam_size, "split": config.split,
                    "checkpoint": model.uri, "seconds": round(time.perf_counter() - started, 2)})
    results = [{"image_id": i, "caption": h} for i, h in zip(ids, hypotheses)]
    storage.write_json(storage.join(config.out, RESULTS_FILE), results)
    storage.write_json(storage.join(config.out, METRICS_FILE), metrics)
    metrics["examples"] = [{"image_id": i, "caption": h, "references": r[:2]}
                           for i, h, r in list(zip(ids, hypotheses, references))[:5]]
    return metrics


def iter_feature_batches(uri: str, batch_size: int):
    """Batches of a split's feature shards as numpy / Python lists, streamed from the Parquet files."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    for record_batch in dataset.to_batches(columns=[IMAGE_ID, IMAGE, FEATURES, CAPTIONS], batch_size=batch_size):
        if record_batch.num_rows == 0:
            continue
        yield {IMAGE_ID: record_batch.column(IMAGE_ID).to_pylist(),
               IMAGE: record_batch.column(IMAGE).to_pylist(),
               FEATURES: record_batch.column(FEATURES).to_numpy_ndarray(),
               CAPTIONS: record_batch.column(CAPTIONS).to_pylist()}


def first_images(uri: str, count: int) -> list[str]:
    """The URIs of the first ``count`` images of a split by image id: the same ones in every run."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[IMAGE_ID, IMAGE])
    return [row[IMAGE] for row in sorted(table.to_pylist(), key=lambda row: row[IMAGE_ID])[:count]]


def _object_accuracy(info: dict, ids: list[str], hypotheses: list[str]) -> float | None:
    """Share of captions naming exactly the right color+shape pairs, when the manifest has ground truth."""
    if info.get("objects") is False:  # prepare saw none (older datasets do not say: their sources are read)
        return None
    config = info.get("config", {})
    annotations = config.get("annotations") or []
    annotations = [annotations] if isinstance(annotations, str) else annotations
    if not annotations or not all(storage.exists(a) or shards.is_pattern(a) for a in annotations):
        return None
    records = read_config_records(config)
    objects = {r.image_id: r.objects for r in records}
    if any(objects.get(i) is None for i in ids):
        return None
    from capray.synth import object_accuracy  # only a dataset with ground-truth objects needs the shapes world

    return object_accuracy(hypotheses, [objects[i] for i in ids])


def print_metrics(metrics: dict) -> None:
    names = [k for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "object_accuracy") if k in metrics]
    print(f"\n{metrics['split']} split, {metrics['num_images']} images, beam {metrics['beam_size']}:")
    print("  ".join(f"{n} {metrics[n]:.3f}" for n in names))
    for example in metrics.get("examples", []):
        print(f"  {example['caption']!r:45}  reference: {example['references'][0]!r}")


def attend(checkpoint: str, image: str, out: str, *, beam_size: int = 3, max_length: int = 20) -> list[str]:
    """Caption one image and plot the attention map of every word over it; returns the words."""
    model = load_checkpoint(checkpoint)
    size = model.encoder.spec.image_size
    pixels, _, _ = decode_image(shards.read_any(image), size)
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(pixels).unsqueeze(0))  # (1, P, E)
        decoded = model.decoder.beam_search(features, beam_size=beam_size, max_length=max_length)
    length = int(decoded.lengths[0])
    words = [model.vocab.words[t] for t in decoded.tokens[0, :length].tolist()]
    side = int(math.isqrt(model.encoder.num_regions))
    if side * side != model.encoder.num_regions:
        raise ConfigError(f"regions of {model.encoder.spec.name} do not form a square grid")
    attention = decoded.attention[0, :length].reshape(length, side, side).numpy()  # (T, h, w)
    plot_attention(pixels, words, attention, out, title=" ".join(w for w in words if w != "<end>"))
    return words
