"""Every option of every job, in one place: the command line, ``--config`` files and the jobs all read these.

Each ``capray`` subcommand is one frozen dataclass below (``COMMANDS``). A field is an option: its
name gives the flag (``batch_size`` → ``--batch-size``; a nested dataclass's fields get its name as
prefix, ``--encoder.name``, unless the field is ``FLAT``: ``--actors``), its type the parsing, its
default the default and the string under it the help text. ``capray.cli`` derives the parsers from
them, so an option without a flag cannot exist. ``__post_init__`` checks values and resolves paths
where the user typed them (Ray's workers run in another working directory). This module is light (no
torch, no Ray): ``--help`` stays instant.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from types import MappingProxyType
from typing import Literal

from capray import storage
from capray.annotations import SPLITS, pair_sources
from capray.errors import ConfigError
from capray.formats import CAPTION_SCHEMA

FLAT = MappingProxyType({"flat": True})
"""``field(metadata=FLAT)``: a nested dataclass whose options take no prefix on the command line."""

WEIGHTS_IMAGENET, WEIGHTS_NONE = "imagenet", "none"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
LITE0_DEFAULT_LAYER = "blocks.10"
"""Lite0 layers: a block index (0..15) or "head" (the 1280-channel 1×1 conv). Block 10 ends the
stride-16 stage (112 channels): 8×8 regions at 128 px, 14×14 at 224 px; block 7 (80 channels) is the
last of that grid's first half, whose regions keep more colour."""
DEFAULT_IMAGE_SIZE = MappingProxyType({"inception_v3": 299, EFFICIENTNET_LITE0: 224})
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def _words(values: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"a,b"`` or ``("a", "b,c")`` → ``("a", "b", "c")``: list options take commas or repeats."""
    items = (values,) if isinstance(values, str) else tuple(values)
    return tuple(dict.fromkeys(w.strip() for item in items for w in str(item).split(",") if w.strip()))


def _not_negative(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(config, name)}")


def _at_least_one(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")


def _set(config, name: str, value) -> None:
    object.__setattr__(config, name, value)


def option_values(config) -> dict:
    """A job config as ``{option: value}``, keyed as a ``--config`` file is: the options of a ``FLAT``
    field at the top level, another nested dataclass as a mapping of its own (``encoder``)."""
    values = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("flat"):
            values.update(option_values(value))
        else:
            values[f.name] = asdict(value) if is_dataclass(value) else value
    return values


# --- synth ---------------------------------------------------------------------------------------

SYNTH_FORMATS = ("files", "webdataset", "parquet")
"""The layouts ``capray synth`` writes (see :mod:`capray.synth`)."""


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`capray.synth.generate` draws."""

    num_images: int
    """Number of images (about half show one object, half two)."""
    seed: int = 0
    """Seed of everything random: the same seed gives byte-identical output."""
    image_size: int = 128
    """Side of the square images in pixels."""
    captions_per_image: int = 5
    """Reference captions per image, picked from the templates (distinct while templates last)."""
    train_fraction: float = 0.8
    """Share of images in the train split."""
    val_fraction: float = 0.1
    """Share of images in the val split (at least one image when there are enough images)."""
    test_fraction: float = 0.1
    """Share of images in the test split (at least one image when there are enough images)."""

    def __post_init__(self) -> None:
        if self.num_images <= 0:
            raise ConfigError(f"--num-images must be positive, got {self.num_images}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")
        if self.image_size < 32:
            raise ConfigError(f"--image-size must be at least 32 pixels, got {self.image_size}")
        if self.captions_per_image < 1:
            raise ConfigError(f"--captions-per-image must be at least 1, got {self.captions_per_image}")
        fractions = self.split_fractions
        if any(not 0.0 <= f <= 1.0 for f in fractions.values()):
            raise ConfigError(f"split fractions must lie in [0, 1], got {dict(fractions)}")
        if self.train_fraction == 0.0:
            raise ConfigError("--train-fraction must be positive")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"split fractions must sum to 1, got {sum(fractions.values()):.6g}")

    @property
    def split_fractions(self) -> Mapping[str, float]:
        return MappingProxyType({"train": self.train_fraction, "val": self.val_fraction,
                                 "test": self.test_fraction})


@dataclass(frozen=True)
class SynthJob:
    """``capray synth``: generate the shapes world, a captioned dataset with ground truth."""

    out: str
    """Where the dataset goes (URI)."""
    world: SynthConfig = field(metadata=FLAT)
    """What is drawn."""
    format: Literal["files", "webdataset", "parquet"] = "files"
    """``files``: one PNG per image under ``images/`` and ``manifest.jsonl``; ``webdataset``: img2dataset's
    tar shards ``shards/00000.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per image); ``parquet``:
    ``parquet/00000.parquet`` with the JPEG bytes in a column."""
    samples_per_shard: int = 1000
    """Images per tar or Parquet file (the last one holds the rest); unused by ``files``."""

    def __post_init__(self):
        _set(self, "out", storage.normalize(self.out))
        if self.format not in SYNTH_FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(SYNTH_FORMATS)}, got {self.format!r}")
        _at_least_one(self, "samples_per_shard")


# --- parts of several jobs -----------------------------------------------------------------------

@dataclass(frozen=True)
class ActorPool:
    """The actors a job runs its model in (prepare's encoders, caption's captioners, evaluate's beam
    searchers), as :func:`capray.sizing.plan_actors` sizes them for a local machine or a cluster."""

    actors: int = 0
    """A fixed number of model actors; 0 lets the pool scale (on a cluster: from 1 up to ``max_actors``
    as work queues up and nodes join; locally: one per GPU, else one)."""
    max_actors: int = 0
    """Most model actors an autoscaling pool grows to; 0: no limit (the cluster's node caps bound it)."""
    gpus_per_actor: float = 0.0
    """GPUs per model actor; 0 runs the model on CPU."""
    cpus_per_actor: float = 0.0
    """CPUs per actor (also its torch threads on CPU); 0: 1 on a cluster, the machine's spare cores locally."""

    def __post_init__(self):
        _not_negative(self, "actors", "max_actors", "gpus_per_actor", "cpus_per_actor")
        if self.actors and self.max_actors and self.max_actors < self.actors:
            raise ConfigError(f"--max-actors {self.max_actors} is below --actors {self.actors}")


@dataclass(frozen=True)
class ShardColumns:
    """The columns of Parquet shards that hold a sample's image and its name (prepare and caption read
    shards alike)."""

    image_column: str = ""
    """Parquet shards: the column of image bytes (default: the first of jpg, jpeg, png, webp, image, img,
    image_bytes it has; a ``{bytes, path}`` struct works too)."""
    key_column: str = ""
    """Parquet shards: the column that names a sample, ``FILE#KEY`` (default: key, id or image_id, else the
    row number). WebDataset samples are named ``SHARD.tar#KEY`` by their key."""


# --- prepare -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderSpec:
    """The frozen encoder that makes the region features."""

    name: str = "inception_v3"
    """A torchvision classification model name, or ``efficientnet_lite0``."""
    weights: str = WEIGHTS_IMAGENET
    """``imagenet`` (the model's pretrained weights), ``none`` (random, seeded) or a state-dict URI.
    A URI is the offline copy of the pretrained weights (torchvision's file for that model, auxiliary
    heads and all): it gets the same input preprocessing as ``imagenet``, so the features are the same."""
    image_size: int = 0
    """Square input size in pixels; 0 means the model's own (299 for inception_v3, else 224)."""
    layer: str = ""
    """Node whose output gives the regions; empty means the last convolutional stage. Several nodes of
    one grid joined by ``+`` (``blocks.7+blocks.10``) concatenate their channels per region."""
    seed: int = 0
    """Seed of the random initialisation when ``weights`` is ``none``."""

    def __post_init__(self):
        if not self.name:
            raise ConfigError("--encoder.name must not be empty")
        if self.image_size < 0 or 0 < self.image_size < 32:
            raise ConfigError(f"--encoder.image-size must be at least 32 px, got {self.image_size}")
        if not self.weights:
            raise ConfigError("--encoder.weights must be imagenet, none or a state-dict URI")

    def resolved(self) -> "EncoderSpec":
        """The same spec with the defaults filled in (what is saved beside outputs)."""
        size = self.image_size or DEFAULT_IMAGE_SIZE.get(self.name, 224)
        layer = self.layer or (LITE0_DEFAULT_LAYER if self.name == EFFICIENTNET_LITE0 else "")
        return replace(self, image_size=size, layer=layer)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PrepareConfig:
    """``capray prepare``: encode captioned images once into a sharded Parquet feature dataset."""

    annotations: tuple[str, ...]
    """COCO captions JSON, Karpathy split JSON or JSONL manifest (URI); repeat the flag to read several
    together, e.g. COCO's ``captions_train2014.json`` and ``captions_val2014.json``. Or shards that hold
    images and captions together: WebDataset ``.tar`` files (caption: the sample's .txt) or Parquet files
    with an image-bytes column (a prefix of them, one file, or a brace pattern ``.../{00000..00099}.tar``)."""
    out: str
    """Feature dataset location (URI)."""
    images: tuple[str, ...] = ()
    """Root of relative image paths (default: the annotation file's folder); repeat to pair one with
    each ``--annotations``, in order."""
    test_fraction: float = 0.0
    """Share of the val images moved to a test split, chosen by a hash of the image id (deterministic).
    Shard samples with no split of their own: the share of all of them that goes to test, by a hash of the key."""
    val_fraction: float = 0.05
    """Shard samples with no split of their own: the share that goes to val, by a hash of the key."""
    shard_columns: ShardColumns = field(default_factory=ShardColumns, metadata=FLAT)
    """Parquet shards: the image and key columns (``--image-column``, ``--key-column``)."""
    caption_column: str = ""
    """Shards: the field or column holding the caption(s) (default: the first of captions, caption, txt, text)."""
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    """Frozen encoder that makes the region features."""
    vocab_size: int = 5000
    """Words kept, specials included (from the train split only)."""
    min_word_count: int = 1
    """Words seen fewer times in the train split become ``<unk>``."""
    max_caption_tokens: int = 40
    """Captions are truncated to this many tokens, ``<start>`` and ``<end>`` included."""
    pool: ActorPool = field(default_factory=ActorPool, metadata=FLAT)
    """The encoder actors (``--actors``, ``--max-actors``, ``--gpus-per-actor``, ``--cpus-per-actor``)."""
    wait_timeout: float = 600.0
    """Seconds to wait for the cluster to make room for the first actor (GPU nodes take minutes to start)."""
    batch_size: int = 32
    """Images per encoder forward pass."""
    splits: tuple[str, ...] = SPLITS
    """Splits to write (repeat the flag, or separate with commas). Only these are replaced: the other
    splits in ``out`` and their record in ``prepare.json`` stay as they are, which needs the same encoder,
    ``--vocab-size``, ``--min-word-count``, ``--max-caption-tokens`` and vocabulary (else exit 2)."""
    rows_per_file: int = 2000
    """Minimum rows per Parquet file (few larger files read back much faster than many tiny ones)."""
    shared_fs: bool = False
    """Local paths are on a filesystem that every node of the cluster mounts at the same path (NFS, EFS,
    Lustre): accept them when the job runs on a cluster (also ``CAPRAY_SHARED_FS=1``). Without it a job on a
    cluster takes s3:// locations only."""
    lease_timeout_s: float = 600.0
    """Seconds without a heartbeat after which this run's hold on ``out`` counts as dead and another run
    may take it over (a run that died on this host is taken over at once)."""
    progress_s: float = 30.0
    """Seconds between two progress lines (images done / total, images/s, error rows, ETA); at least 1."""
    overwrite: bool = False
    """Encode the named splits again from the start. Without it a run made with the same settings (options,
    encoder weights, vocabulary) is resumed: the rows it wrote stay and only the missing images are encoded."""

    def __post_init__(self):
        _set(self, "annotations", tuple(storage.normalize(a) for a in _words(self.annotations)))
        _set(self, "images", tuple(storage.normalize(i) for i in _words(self.images or ())))
        _set(self, "out", storage.normalize(self.out))
        if self.encoder.weights not in (WEIGHTS_IMAGENET, WEIGHTS_NONE):  # a state-dict URI
            _set(self, "encoder", replace(self.encoder, weights=storage.normalize(self.encoder.weights)))
        pair_sources(self.annotations, self.images)  # raises if they do not pair
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0 - self.test_fraction:
            raise ConfigError(f"--val-fraction must be at least 0 and leave room for train next to --test-fraction, "
                              f"got {self.val_fraction}")
        _not_negative(self, "wait_timeout")
        _at_least_one(self, "batch_size", "vocab_size", "min_word_count", "rows_per_file")
        _set(self, "splits", _words(self.splits))
        if not set(self.splits) <= set(SPLITS) or not self.splits:
            raise ConfigError(f"--splits must be among {', '.join(SPLITS)}, got {','.join(self.splits)}")
        if self.max_caption_tokens < 3:
            raise ConfigError(f"--max-caption-tokens must be at least 3, got {self.max_caption_tokens}")
        if self.progress_s < 1:
            raise ConfigError(f"--progress-s must be at least 1, got {self.progress_s:g}")
        if self.lease_timeout_s < 10:
            raise ConfigError(f"--lease-timeout-s must be at least 10 (heartbeats come every tenth of it), "
                              f"got {self.lease_timeout_s:g}")


# --- train ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """``capray train``: train the attention decoder data-parallel with Ray Train."""

    features: str
    """Feature dataset written by ``capray prepare`` (URI)."""
    out: str
    """Where runs are stored (URI): checkpoints land in ``OUT/NAME/checkpoint_*``."""
    name: str = "capray"
    """Run name; the same ``--out/--name`` again resumes the run."""
    workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    gpus_per_worker: float = 0.0
    """GPUs per Train worker (1: one GPU each, mixed precision); 0 trains on CPU."""
    epochs: int = 20
    """Total epochs; a resumed run continues up to this count. Another count than the run's on resume
    extends (or shortens) its schedule from where it is: the learning rate goes on from the rate reached
    and decays to 1% of the peak by the new last epoch."""
    batch_size: int = 64
    """Images per worker per step (every caption of each image is used)."""
    learning_rate: float = 1e-3
    """Adam's peak learning rate (cosine decay to 1% of it over the run, after a short warm-up)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float = 5.0
    """Gradient norm clipping."""
    attention_weight: float = 1.0
    """λ of the doubly stochastic attention regulariser, λ Σ_i (1 − Σ_t α_ti)²."""
    decoder: Literal["gru", "lstm"] = "gru"
    """``gru`` (the seed's) or ``lstm`` (the paper's)."""
    embed_dim: int = 256
    """Word embedding size."""
    hidden_dim: int = 512
    """Decoder state size."""
    projection_dim: int = 256
    """Size regions are projected to."""
    attention_dim: int = 512
    """Attention hidden size."""
    dropout: float = 0.0
    """Dropout before the output layer."""
    positions: Literal["grid", "learned", "none"] = "grid"
    """Where each region lies, added to the projected regions: ``grid`` learns a map of its (x, y) on the
    region grid, ``learned`` an embedding per region, ``none`` nothing (the seed's)."""
    captions_per_image: int = 0
    """Reference captions used per image per epoch, sampled afresh each epoch; 0 uses all of them."""
    label_smoothing: float = 0.0
    """Label smoothing of the next-word cross-entropy (0: none); the reported losses are always plain."""
    max_length: int = 20
    """Longest caption generated in validation."""
    val_images: int = 500
    """Validation images decoded for BLEU-4 (all of the val split if fewer)."""
    val_every: int = 1
    """Decode the val images for BLEU-4 every this many epochs (and after the last), and checkpoint
    those epochs (checkpoints are ranked by BLEU-4); the val loss is computed every epoch. A resumed
    run continues from the last validated epoch."""
    in_memory_gb: float = 4.0
    """A worker holds its share of the train and val features in memory after reading it once when the
    share is at most this many GiB, so later epochs skip Ray Data; a larger share is streamed every epoch."""
    driver_read_mb: float = 256.0
    """Train and val features of at most this many MiB in all are read by the job's own process with
    pyarrow and handed to Ray as blocks in its object store: a Ray Data read job takes 5–15 s to start,
    longer than such a read. Larger feature sets (and 0) are read by Ray Data tasks across the cluster."""
    attention_images: int = 3
    """Val images whose attention maps are plotted into ``OUT/NAME/attention/`` when training ends."""
    stats_images: int = 2000
    """Train images sampled for the per-channel feature statistics."""
    max_failures: int = 2
    """Worker-group restarts Ray Train may do after failures before giving up."""
    keep_checkpoints: int = 3
    """Best checkpoints kept (by validation BLEU-4); the latest is always kept for resuming."""
    cpus_per_worker: float = 0.0
    """CPUs per Train worker (also its torch threads on CPU); 0: 1 on a cluster, a fraction on a small
    local machine."""
    wait_timeout: float = 600.0
    """Seconds to wait for the cluster to make room for every worker (GPU nodes take minutes to start)."""
    seed: int = 0
    """Seed of the decoder's initialisation and the data order."""
    shared_fs: bool = False
    """Local paths are on a filesystem that every node of the cluster mounts at the same path (NFS, EFS,
    Lustre): accept them when the job runs on a cluster (also ``CAPRAY_SHARED_FS=1``). Without it a job on a
    cluster takes s3:// locations only."""

    def __post_init__(self):
        _set(self, "features", storage.normalize(self.features))
        _set(self, "out", storage.normalize(self.out))
        _not_negative(self, "gpus_per_worker", "cpus_per_worker", "wait_timeout", "captions_per_image",
                      "max_failures", "weight_decay", "dropout", "attention_weight", "label_smoothing",
                      "in_memory_gb", "driver_read_mb", "attention_images")
        _at_least_one(self, "workers", "epochs", "batch_size", "max_length", "val_images", "stats_images", "val_every",
                      "keep_checkpoints", "embed_dim", "hidden_dim", "projection_dim", "attention_dim")
        if self.learning_rate <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"--learning-rate and --grad-clip must be positive, got {self.learning_rate}, "
                              f"{self.grad_clip}")
        if self.dropout >= 1 or self.label_smoothing >= 1:
            raise ConfigError(f"--dropout and --label-smoothing must be below 1, got {self.dropout}, "
                              f"{self.label_smoothing}")
        if self.decoder not in ("gru", "lstm"):
            raise ConfigError(f"--decoder must be gru or lstm, got {self.decoder!r}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"--name must be a plain name, got {self.name!r}")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


# --- caption -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptionConfig:
    """``capray caption``: caption a bucket, folder or manifest of images into Parquet."""

    input: str
    """An ``s3://`` prefix or local folder (recursive) of images, a manifest (.jsonl/.json), a single
    image, or shards: WebDataset ``.tar`` files or Parquet files with an image-bytes column (a prefix of
    them, one file, or a brace pattern such as ``s3://b/shards/{00000..01023}.tar``)."""
    out: str
    """Where the Parquet shards and ``summary.json`` go; re-running into it resumes."""
    checkpoint: str
    """A checkpoint directory, or a training run directory (its best checkpoint is used)."""
    beam_size: int = 3
    """K: beams per image."""
    batch_size: int = 32
    """Images per encoder forward pass and beam search."""
    pool: ActorPool = field(default_factory=ActorPool, metadata=FLAT)
    """The captioner actors (``--actors``, ``--max-actors``, ``--gpus-per-actor``, ``--cpus-per-actor``)."""
    wait_timeout: float = 600.0
    """Seconds to wait for the cluster to make room for the first actor (GPU nodes take minutes to start)."""
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    """File name endings of the objects to caption when listing a prefix (repeat, or separate with commas)."""
    max_length: int = 20
    """Most words per caption (``<end>`` included)."""
    overwrite: bool = False
    """Caption everything again and replace the shards already in ``out`` once the new run has finished
    (until then the old output stays whole; a re-run with --overwrite resumes the replacement)."""
    retry_errors: bool = False
    """Caption again every image that has an error row in ``out`` (after the cause is fixed); its
    error row is replaced, so the output still holds one row per image."""
    rows_per_shard: int = 2_000
    """Rows per Parquet shard (the last of a run may have fewer). A killed run loses what its write tasks
    had not written yet, about a shard's worth; fewer, larger files read back faster on resume."""
    shard_columns: ShardColumns = field(default_factory=ShardColumns, metadata=FLAT)
    """Parquet input: the image and key columns (``--image-column``, ``--key-column``); the key names a
    row's ``path``."""
    retry_window_s: float = 300.0
    """Seconds the run goes on retrying, with growing pauses, the images whose reads failed for a
    transient reason (throttling, timeouts) once the rest is done; then it gives up (exit 1). 0: no retry."""
    lease_timeout_s: float = 600.0
    """Seconds without a heartbeat after which this run's hold on ``out`` counts as dead and another run
    may take it over (a run that died on this host is taken over at once)."""
    progress_s: float = 30.0
    """Seconds between two progress lines (images done / total, images/s, error rows, ETA); at least 1."""
    keep_columns: tuple[str, ...] = ("key", "url")
    """WebDataset and Parquet input: fields carried into the output as text columns, to join captions
    back to the source (``key``: the sample's key; else a field of the sample's .json or a Parquet column;
    null where a sample has none). Repeat, or separate with commas."""
    shared_fs: bool = False
    """Local paths are on a filesystem that every node of the cluster mounts at the same path (NFS, EFS,
    Lustre): accept them when the job runs on a cluster (also ``CAPRAY_SHARED_FS=1``). Without it a job on a
    cluster takes s3:// locations only."""

    def __post_init__(self):
        for name in ("input", "out", "checkpoint"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} must not be empty")
            _set(self, name, storage.normalize(getattr(self, name)))
        _at_least_one(self, "beam_size", "batch_size", "max_length", "rows_per_shard")
        _not_negative(self, "wait_timeout", "retry_window_s")
        if self.progress_s < 1:
            raise ConfigError(f"--progress-s must be at least 1, got {self.progress_s:g}")
        if self.lease_timeout_s < 10:
            raise ConfigError(f"--lease-timeout-s must be at least 10 (heartbeats come every tenth of it), "
                             f"got {self.lease_timeout_s:g}")
        if self.overwrite and self.retry_errors:
            raise ConfigError("--overwrite and --retry-errors exclude each other (--overwrite redoes everything)")
        _set(self, "extensions", tuple(dict.fromkeys(e.lower().lstrip(".") for e in _words(self.extensions))))
        if not self.extensions or not all(self.extensions):
            raise ConfigError("--extensions must name at least one file type (e.g. jpg,png)")
        _set(self, "keep_columns", tuple(dict.fromkeys(_words(self.keep_columns))))
        clashes = set(self.keep_columns) & {*CAPTION_SCHEMA.names, "image", "retry"}
        if clashes:
            raise ConfigError(f"--keep-columns cannot be {', '.join(sorted(clashes))}: the output has such a column")


# --- evaluate, attend, demo ----------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluateConfig:
    """``capray evaluate``: COCO metrics (BLEU, ROUGE-L, CIDEr-D) on a split of the feature dataset."""

    checkpoint: str
    """Checkpoint directory or training run directory (its best checkpoint)."""
    features: str
    """Feature dataset written by ``capray prepare``."""
    out: str
    """Folder for ``metrics.json`` and ``results.json``."""
    split: Literal["train", "val", "test"] = "test"
    """Split to caption and score."""
    beam_size: int = 3
    """Beam width (1 = greedy)."""
    max_length: int = 20
    """Longest caption generated."""
    batch_size: int = 128
    """Images decoded together."""
    pool: ActorPool = field(default_factory=ActorPool, metadata=FLAT)
    """The beam-search actors (``--actors``, ``--max-actors``, ``--gpus-per-actor``, ``--cpus-per-actor``)."""
    wait_timeout: float = 600.0
    """Seconds to wait for the cluster to make room for the first actor (GPU nodes take minutes to start)."""
    progress_s: float = 30.0
    """Seconds between two progress lines (images done / total, images/s, ETA); at least 1."""
    shared_fs: bool = False
    """Local paths are on a filesystem that every node of the cluster mounts at the same path (NFS, EFS,
    Lustre): accept them when the job runs on a cluster (also ``CAPRAY_SHARED_FS=1``). Without it a job on a
    cluster takes s3:// locations only."""

    def __post_init__(self):
        for name in ("checkpoint", "features", "out"):
            _set(self, name, storage.normalize(getattr(self, name)))
        _at_least_one(self, "beam_size", "max_length", "batch_size")
        _not_negative(self, "wait_timeout")
        if self.progress_s < 1:
            raise ConfigError(f"--progress-s must be at least 1, got {self.progress_s:g}")
        if self.split not in SPLITS:
            raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")


@dataclass(frozen=True)
class AttendConfig:
    """``capray attend``: caption one image and plot the attention map of every word."""

    checkpoint: str
    """Checkpoint directory or training run directory (its best checkpoint)."""
    image: str
    """The image (URI)."""
    out: str
    """The PNG to write (URI)."""
    beam_size: int = 3
    """Beam width (1 = greedy)."""
    max_length: int = 20
    """Longest caption generated."""

    def __post_init__(self):
        for name in ("checkpoint", "image", "out"):
            _set(self, name, storage.normalize(getattr(self, name)))
        _at_least_one(self, "beam_size", "max_length")


MAX_GALLERY_IMAGES = 5000
"""Most images one gallery page embeds (about 50 MB of thumbnails: more would not open well in a browser)."""


@dataclass(frozen=True)
class GalleryConfig:
    """``capray gallery``: one self-contained HTML page of captioned images, errors and lowest confidence first."""

    captions: str
    """A ``capray caption`` output (URI); its images are read from the locations in its ``path`` column."""
    out: str
    """The HTML page to write (URI), e.g. ``gallery.html``."""
    sample: int = 48
    """Rows shown as a deterministic sample of the whole output (picked by a seeded hash of the path)."""
    seed: int = 0
    """Seed of the sample: the same seed shows the same rows, another seed others."""
    worst: int = 12
    """Also shown: this many lowest-confidence captions, and up to this many error rows (0: neither)."""
    thumbnail_size: int = 192
    """Longest side of the embedded thumbnails, in pixels."""
    references: str = ""
    """Reference captions to show beside each caption, matched by image location: a feature dataset
    (``capray prepare``'s output) or an annotation file (JSONL manifest, COCO or Karpathy JSON)."""
    image_column: str = ""
    """Parquet-shard input: the column of image bytes, if ``capray caption`` was given one."""

    def __post_init__(self):
        for name in ("captions", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} must not be empty")
            _set(self, name, storage.normalize(getattr(self, name)))
        if self.references:
            _set(self, "references", storage.normalize(self.references))
        _at_least_one(self, "sample")
        _not_negative(self, "seed", "worst")
        if self.sample + 2 * self.worst > MAX_GALLERY_IMAGES:
            raise ConfigError(f"--sample + 2 × --worst must be at most {MAX_GALLERY_IMAGES} (the page embeds every "
                             f"image), got {self.sample} + 2 × {self.worst}")
        if not 16 <= self.thumbnail_size <= 1024:
            raise ConfigError(f"--thumbnail-size must be 16..1024 pixels, got {self.thumbnail_size}")


@dataclass(frozen=True)
class DemoConfig:
    """``capray demo``: the whole pipeline on a generated dataset, local Ray, local folders."""

    out: str = "demo-output"
    """Folder for everything the demo writes (it starts from scratch there)."""
    num_images: int = 0
    """Shapes-world size; 0: the demo preset's."""
    epochs: int = 0
    """Training epochs; 0: the demo preset's."""

    def __post_init__(self):
        _not_negative(self, "num_images", "epochs")


COMMANDS: Mapping[str, type] = MappingProxyType({
    "synth": SynthJob,
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "caption": CaptionConfig,
    "evaluate": EvaluateConfig,
    "attend": AttendConfig,
    "gallery": GalleryConfig,
    "demo": DemoConfig,
})
"""Each subcommand's options; the first line of the class docstring is its help."""

RENAMED: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "prepare": MappingProxyType({"--encoder": ("--encoder.name",), "--weights": ("--encoder.weights",),
                                 "--image-size": ("--encoder.image-size",), "--encoder-layer": ("--encoder.layer",)}),
    "train": MappingProxyType({"--gpu": ("--gpus-per-worker", "1"), "--lr": ("--learning-rate",)}),
    "caption": MappingProxyType({"--output": ("--out",)}),
    "demo": MappingProxyType({"--workdir": ("--out",)}),
})
"""Flags renamed in 0.2 → what they became (a flag, and for a valueless flag the value it meant).
The old names still work, with a warning, until 0.3."""
