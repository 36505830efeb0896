"""``capray evaluate`` (COCO metrics on a split of the feature dataset) and ``capray attend`` (plots)."""
from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from capray import shards, storage
from capray.annotations import Record
from capray.checkpoint import load_checkpoint
from capray.config import EvaluateConfig
from capray.errors import ConfigError
from capray.features import load_prepare_info, read_config_records
from capray.formats import CAPTION, CAPTIONS, FEATURES, IMAGE, IMAGE_ID, METRICS_FILE, RESULTS_FILE, SCORE
from capray.images import decode_image
from capray.metrics import attention_grounding, score_captions
from capray.plots import plot_attention
from capray.precision import as_stored
from capray.progress import Progress, report
from capray.tasks import MAX_BLOCKS, READ_TASK_RETRIES, ModelThread

log = logging.getLogger(__name__)
NODE_ID = "node_id"
"""Evaluate's actor rows: the Ray node the beam search ran on (metrics.json counts images per node)."""
GROUNDING_MASS, GROUNDING_CHANCE, GROUNDED_WORDS = "grounding_mass", "grounding_chance", "grounded_words"
"""Evaluate's actor rows: an image's attention-grounding sums (``capray.metrics.attention_grounding``)."""
SHARD = "shard"  # a read task's unit of work: one feature file of the split
READ_COLUMNS = [IMAGE_ID, IMAGE, FEATURES, CAPTIONS]


def evaluate(config: EvaluateConfig) -> dict:
    """Caption a split with beam search, score it, write metrics.json and COCO-format results.

    The driver plans and scores; the split is read by Ray Data tasks and captioned by an actor pool
    (``BeamSearcher``) sized like caption's (``capray.sizing.plan_actors``), so on a cluster the beam
    search runs on worker nodes. What comes back per image is small: its id, caption, score, reference
    captions and, where the manifest has ground-truth boxes, its attention-grounding sums.
    """
    started = time.perf_counter()
    info = load_prepare_info(config.features)
    if not info["splits"].get(config.split, {}).get("images"):
        raise ConfigError(f"{config.features}: the {config.split} split has no images")
    model = load_checkpoint(config.checkpoint)  # here, so a bad checkpoint fails before any actor starts
    if info["num_features"] != model.decoder.config.feature_dim:
        raise ConfigError(f"--features {config.features} has {info['num_features']} channels per region, "
                         f"the checkpoint expects {model.decoder.config.feature_dim}")
    records = _ground_truth(info)
    truth = {r.image_id: r.objects for r in records if r.objects is not None} if records else None
    split_truth = {r.image_id: r.objects for r in records or () if r.split == config.split and r.objects}
    rows = sorted(_search(config, checkpoint=model.uri, objects=split_truth,
                          total=info["splits"][config.split]["images"]), key=lambda row: row[IMAGE_ID])
    ids = [row[IMAGE_ID] for row in rows]
    hypotheses = [row[CAPTION] for row in rows]
    references = [[str(c) for c in row[CAPTIONS]] for row in rows]
    metrics = score_captions(dict(zip(ids, references)), dict(zip(ids, hypotheses)))
    if truth is not None and all(i in truth for i in ids):
        from capray.synth import object_accuracy  # only a dataset with ground-truth objects needs the shapes world

        metrics["object_accuracy"] = object_accuracy(hypotheses, [truth[i] for i in ids])
    words = sum(int(row[GROUNDED_WORDS]) for row in rows)
    if words:
        metrics["attention_grounding"] = sum(float(row[GROUNDING_MASS]) for row in rows) / words
        metrics["attention_grounding_chance"] = sum(float(row[GROUNDING_CHANCE]) for row in rows) / words
        metrics["attention_grounding_words"] = words
    nodes: dict[str, int] = {}
    for row in rows:
        nodes[row[NODE_ID]] = nodes.get(row[NODE_ID], 0) + 1
    metrics.update({"num_images": len(ids), "beam_size": config.beam_size, "split": config.split,
                    "checkpoint": model.uri, "beam_search_nodes": nodes,
                    "seconds": round(time.perf_counter() - started, 2)})
    results = [{"image_id": i, "caption": h} for i, h in zip(ids, hypotheses)]
    storage.write_json(storage.join(config.out, RESULTS_FILE), results)
    storage.write_json(storage.join(config.out, METRICS_FILE), metrics)
    metrics["examples"] = [{"image_id": i, "caption": h, "references": r[:2]}
                           for i, h, r in list(zip(ids, hypotheses, references))[:5]]
    return metrics


def _search(config: EvaluateConfig, *, checkpoint: str, objects: dict[str, tuple[dict, ...]],
            total: int) -> list[dict]:
    """The split's rows captioned by a ``BeamSearcher`` pool; returns ``BeamSearcher``'s rows.

    ``objects``: the split's ground-truth objects by image id (empty: no attention grounding);
    ``total``: the split's images, for the progress lines.
    """
    import ray

    from capray.autoscaler import wait_for_resources
    from capray.connect import ensure_ray
    from capray.sizing import local_machine, plan_pipeline
    from capray.tasks import map_with_retries

    ensure_ray()
    machine = local_machine()
    shares = plan_pipeline(config.pool, machine=machine, writes=False)  # the driver writes what it scores
    plan = shares.actors
    log.info("evaluate: %s split of %s; %s", config.split, config.features, plan.describe())
    if machine is None:  # a cluster: the first actor may need a node that is not up yet
        wait_for_resources([plan.bundle()] * plan.min_actors, timeout_s=config.wait_timeout, what="evaluate")
    files = list(storage.list_files(storage.join(config.features, config.split), extensions=("parquet",)))
    # One block per file, read by a task of its own: Ray's read_parquet is not used, as its file-listing
    # task asks for a whole CPU, which the actor holds on a small machine (a hang; see caption).
    ds = ray.data.from_items([{SHARD: uri} for uri in files], override_num_blocks=min(len(files), MAX_BLOCKS))
    ds = map_with_retries(ds, read_features, fn_kwargs={"rows": config.batch_size}, batch_size=1,
                          batch_format="pyarrow", num_cpus=shares.read_cpus, max_retries=READ_TASK_RETRIES,
                          retry_exceptions=[storage.TransientStorageError])
    with Progress("evaluate", total=total, every_s=config.progress_s) as progress:
        ds = ds.map_batches(BeamSearcher, fn_constructor_kwargs={
                                "checkpoint": checkpoint, "beam_size": config.beam_size,
                                "max_length": config.max_length, "threads": plan.threads,
                                "use_gpu": plan.num_gpus > 0, "objects": objects, "progress": progress.counter},
                            compute=plan.strategy(), batch_size=config.batch_size, batch_format="pyarrow",
                            **plan.remote_args())
        return ds.take_all()


def first_images(uri: str, count: int) -> list[str]:
    """The URIs of the first ``count`` images of a split by image id: the same ones in every run."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[IMAGE_ID, IMAGE])
    return [row[IMAGE] for row in sorted(table.to_pylist(), key=lambda row: row[IMAGE_ID])[:count]]


def read_features(batch: pa.Table, *, rows: int) -> Iterator[pa.Table]:
    """CPU task: the feature shards named in ``batch`` → their rows, ``rows`` at a time (streamed)."""
    for uri in batch.column(SHARD).to_pylist():
        fs, path = storage.resolve(uri)
        try:
            with fs.open_input_file(path) as f:
                for record_batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=READ_COLUMNS):
                    if record_batch.num_rows:
                        yield pa.Table.from_batches([record_batch])
        except OSError as exc:  # throttled or unreachable: Ray retries the task; anything else fails the job
            raise storage.classified(f"reading {uri}", exc) from exc


def _ground_truth(info: dict) -> list[Record] | None:
    """The dataset's records when its manifest carries ground-truth objects (the shapes world), else None."""
    if info.get("objects") is False:  # prepare saw none (older datasets do not say: their sources are read)
        return None
    config = info.get("config", {})
    annotations = config.get("annotations") or []
    annotations = [annotations] if isinstance(annotations, str) else annotations
    if not annotations or not all(storage.exists(a) or shards.is_pattern(a) for a in annotations):
        return None
    records = read_config_records(config)
    return records if any(r.objects is not None for r in records) else None


class BeamSearcher:
    """Ray Data actor: the checkpoint's decoder loaded once; a batch of feature rows → caption rows.

    Returns ``image_id``, ``caption``, ``score`` (mean log-probability per token), ``captions`` (the
    references, passed through for scoring), ``node_id`` (where the search ran) and the image's
    attention-grounding sums (``capray.metrics.attention_grounding``; 0 where it has no ground truth).
    The search is the one evaluate always ran: fp32 on the stored fp16 features. Attention maps are
    kept only when there is ground truth to measure them against; they do not change the captions.
    """

    def __init__(self, checkpoint: str, *, beam_size: int, max_length: int, threads: int, use_gpu: bool,
                 objects: dict[str, tuple[dict, ...]] | None = None, progress=None):
        """``progress``: a ``capray.progress`` counter that each batch's images are added to."""
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.beam_size, self.max_length, self.objects = beam_size, max_length, objects or {}
        self.progress = progress
        self._model_thread = ModelThread()
        self._model_thread.run(self._load, checkpoint, threads=threads, use_gpu=use_gpu)

    def _load(self, checkpoint: str, *, threads: int, use_gpu: bool) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = load_checkpoint(checkpoint, device=self.device)
        self.decoder, self.vocab = model.decoder, model.vocab

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._model_thread.run(self._search, batch)

    def _search(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(IMAGE_ID).to_pylist()
        images = batch.column(IMAGE).to_pylist()
        features = torch.from_numpy(_tensor_column(batch, FEATURES)).to(self.device).float()  # (B, P, E)
        grounded = any(i in self.objects for i in ids)
        with torch.inference_mode():
            decoded = self.decoder.beam_search(features, beam_size=self.beam_size, max_length=self.max_length,
                                               attention=grounded)
        tokens = decoded.tokens.cpu()
        report(self.progress, len(ids))
        sums = np.zeros((len(ids), 3))  # grounding mass, chance, words counted
        for row, (image_id, image) in enumerate(zip(ids, images)):
            objects = self.objects.get(image_id)
            if not objects:
                continue
            try:
                boxes = relative_boxes(objects, image)
            except (OSError, ValueError) as exc:  # the image is gone or unreadable: its caption still counts
                log.warning("evaluate: no attention grounding for %s (%s)", image_id, " ".join(str(exc).split())[:200])
                continue
            length = int(decoded.lengths[row])
            words = [self.vocab.words[t] for t in tokens[row, :length].tolist()]
            sums[row] = attention_grounding(words, decoded.attention[row, :length].float().cpu().numpy(), boxes)
        return pa.table({
            IMAGE_ID: pa.array(ids, pa.string()),
            CAPTION: pa.array([self.vocab.decode(t) for t in tokens.tolist()], pa.string()),
            SCORE: pa.array(decoded.scores.float().cpu().numpy(), pa.float32()),
            CAPTIONS: batch.column(CAPTIONS),
            NODE_ID: pa.array([self.node_id] * len(ids), pa.string()),
            GROUNDING_MASS: pa.array(sums[:, 0], pa.float64()),
            GROUNDING_CHANCE: pa.array(sums[:, 1], pa.float64()),
            GROUNDED_WORDS: pa.array(sums[:, 2].astype(np.int64), pa.int64()),
        })


def _tensor_column(batch: pa.Table, name: str) -> np.ndarray:
    """A fixed-shape tensor column as one (N, ...) array, in Arrow's canonical type or Ray Data's own."""
    column = batch.column(name).combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):  # pyarrow's FixedShapeTensorArray
        return column.to_numpy_ndarray()
    return column.to_numpy()  # Ray's ArrowTensorArray


def relative_boxes(objects: tuple[dict, ...], image: str) -> list[dict]:
    """``objects`` with each ``box`` as fractions of the image's width and height.

    Boxes are in the source image's pixels; prepare resizes the whole image to the encoder's square
    input (no crop, aspect not kept: ``capray.images.decode_image``), so a box's fractions of the
    source are its fractions of the encoder's grid. The size is read from the image file's header.
    """
    width, height = image_size(image)
    return [{**o, "box": [o["box"][0] / width, o["box"][1] / height, o["box"][2] / width, o["box"][3] / height]}
            for o in objects]


def image_size(uri: str) -> tuple[int, int]:
    """The (width, height) a viewer shows (EXIF orientation applied), from the header only.

    A sample inside a shard is read with its shard (``capray.shards.read_any``); an image file is
    opened lazily, which reads its first kilobytes, not its pixels.
    """
    from PIL import ExifTags, Image

    if shards.shard_of(uri) != uri:
        source = io.BytesIO(shards.read_any(uri))
    else:
        fs, path = storage.resolve(uri)
        source = fs.open_input_file(path)
    with source, Image.open(source) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned by 90°, as decode_image does
            width, height = height, width
    return width, height


def print_metrics(metrics: dict) -> None:
    names = [k for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "object_accuracy") if k in metrics]
    print(f"\n{metrics['split']} split, {metrics['num_images']} images, beam {metrics['beam_size']}:")
    print("  ".join(f"{n} {metrics[n]:.3f}" for n in names))
    if "attention_grounding" in metrics:
        print(grounding_line(metrics))
    for example in metrics.get("examples", []):
        print(f"  {example['caption']!r:45}  reference: {example['references'][0]!r}")


def grounding_line(metrics: dict) -> str:
    """One line on attention grounding: the measured share, its chance level, and over how many words."""
    return (f"attention grounding {metrics['attention_grounding']:.3f} "
            f"(chance {metrics['attention_grounding_chance']:.3f}, {metrics['attention_grounding_words']} colour/shape "
            "words): attention mass inside the named object's box")


def attend(checkpoint: str, image: str, out: str, *, beam_size: int = 3, max_length: int = 20) -> list[str]:
    """Caption one image and plot the attention map of every word over it; returns the words."""
    model = load_checkpoint(checkpoint)
    size = model.encoder.spec.image_size
    pixels, _, _ = decode_image(shards.read_any(image), size)
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(pixels).unsqueeze(0))  # (1, P, E)
        decoded = model.decoder.beam_search(as_stored(features), beam_size=beam_size, max_length=max_length)
    length = int(decoded.lengths[0])
    words = [model.vocab.words[t] for t in decoded.tokens[0, :length].tolist()]
    side = int(math.isqrt(model.encoder.num_regions))
    if side * side != model.encoder.num_regions:
        raise ConfigError(f"regions of {model.encoder.spec.name} do not form a square grid")
    attention = decoded.attention[0, :length].reshape(length, side, side).numpy()  # (T, h, w)
    plot_attention(pixels, words, attention, out, title=" ".join(w for w in words if w != "<end>"))
    return words
