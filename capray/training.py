"""Training the decoder data-parallel with Ray Train over the prepared feature shards.

``train`` is the driver (checks, resources, the trainer, the run's curves and attention plots);
``train_worker`` is what every Train worker runs. The loop itself, without Ray, is ``capray.loop``.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import asdict

import numpy as np
import torch

from capray import storage
from capray.config import TrainConfig
from capray.checkpoint import CheckpointError, decoder_state, model_state, read_state, write_checkpoint
from capray.errors import ConfigError
from capray.formats import (CONFIG_FILE, ENCODER_STATE_FILE, FEATURES, MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE,
                            VOCAB_FILE)
from capray.loop import Examples, Schedule, amp_settings, bleu4, collate, evaluate_batches, train_epoch
from capray.model import Decoder, DecoderConfig
from capray.vocab import Vocabulary

log = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
"""``OUT/NAME/metrics.jsonl``: one line of metrics per epoch, written by rank 0 as the run goes."""
CURVES_FILE = "curves.png"
ATTENTION_DIR = "attention"
TENSORBOARD_DIR = "tensorboard"
"""``OUT/NAME/tensorboard/``: TensorBoard event files of the run's epochs (``tensorboard --logdir``)."""


def ddp_options() -> dict:
    """DistributedDataParallel without its broadcast of the buffers before every forward.

    The decoder's buffers (feature statistics, grid coordinates) are set the same on every rank before
    training and never change. The per-forward broadcast is one more collective per step, in lockstep.
    On 2 cores its cost is within this machine's noise: without it, plain DDP ran 13%, 1% and 2% faster
    in three interleaved pairs of runs, capray's 2 workers 1% and 12% faster in two. torch 2.14 renamed
    the option ``forward_sync_buffers`` (which still syncs them once, when DDP wraps the model; the
    older ``broadcast_buffers=False`` does not, and need not).
    """
    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False}


def train_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: DDP over its shard, report + checkpoint every epoch."""
    import ray.train
    import ray.train.torch

    config = TrainConfig(**loop_config["train"])
    if not logging.getLogger().handlers:  # a fresh worker process: progress lines go to the driver's log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    _quiet_ray_train_logs()
    vocab = Vocabulary(loop_config["vocab"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads"])  # the worker's CPU share, not the node's core count (GPU too)
    torch.manual_seed(config.seed)
    decoder = Decoder(DecoderConfig(**loop_config["decoder"]))
    decoder.feature_mean.copy_(torch.tensor(loop_config["feature_mean"]))
    decoder.feature_std.copy_(torch.tensor(loop_config["feature_std"]))
    decoder.to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    use_amp, amp_dtype = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    epoch, step, best, resumed_from = 0, 0, float("-inf"), -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            decoder.load_state_dict(decoder_state(read_state(os.path.join(directory, MODEL_FILE))))
            extra = read_state(os.path.join(directory, OPTIMIZER_FILE))
            optimizer.load_state_dict(extra["optimizer"])
            if scaler is not None and "scaler" in extra:
                scaler.load_state_dict(extra["scaler"])
            train_state = storage.read_json(os.path.join(directory, TRAIN_STATE_FILE))
        epoch, step = train_state["epoch"] + 1, train_state["step"]
        resumed_from = epoch
        best = train_state.get("best_val_bleu4", float("-inf"))
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d (step %d)", epoch, step)
    model = ray.train.torch.prepare_model(decoder, parallel_strategy_kwargs=ddp_options())
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    schedule = Schedule(**loop_config["schedule"])  # the run's, decided by the driver (see resume_schedule)
    encoder_state = read_state(loop_config["encoder_state_uri"]) if rank == 0 else None
    events = EventLog(storage.join(loop_config["run_dir"], TENSORBOARD_DIR)) if rank == 0 else None
    held: dict[str, Examples] = {}  # the worker's shares in memory, when they fit (loop_config["hold"])
    try:
        for epoch in range(epoch, config.epochs):
            epoch_started = time.perf_counter()
            if loop_config["hold"] and not held:  # read once; later epochs index tensors
                held = {name: Examples.from_batches(shard.iter_batches(batch_size=1024, batch_format="numpy"))
                        for name, shard in (("train", train_shard), ("val", val_shard))}
            seed = int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])
            if held:
                batches = held["train"].batches(config.batch_size, device=device, seed=seed,
                                                captions_per_image=config.captions_per_image)
                val_batches = held["val"].batches(config.batch_size, device=device)
            else:
                rng = np.random.default_rng(seed)
                batches = (collate(raw, device, captions_per_image=config.captions_per_image, rng=rng)
                           for raw in train_shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                                               local_shuffle_buffer_size=4 * config.batch_size,
                                                               local_shuffle_seed=seed))
                val_batches = (collate(raw, device) for raw in val_shard.iter_batches(batch_size=config.batch_size,
                                                                                     batch_format="numpy"))
            train_metrics, step = train_epoch(model, optimizer, batches, config=config, device=device, scaler=scaler,
                                              step=step, schedule=schedule, epoch=epoch,
                                              steps_per_epoch=loop_config["steps_per_epoch"])
            validate = (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs
            val = evaluate_batches(decoder, val_batches, vocab, max_length=config.max_length,
                                   max_images=max(1, config.val_images // world) if validate else 0)
            gathered = _gather(val, world)
            val_loss = sum(v["ce_sum"] for v in gathered) / max(1, sum(v["tokens"] for v in gathered))
            hyps = [h for v in gathered for h in v["hypotheses"]]
            refs = [r for v in gathered for r in v["references"]]
            val_bleu4 = bleu4(hyps, refs) if validate else float("nan")
            best = max(best, val_bleu4) if validate else best
            images_per_s = train_metrics["train_images"] * world / max(train_metrics["train_seconds"], 1e-9)
            metrics = {"epoch": epoch, "step": step, "train_loss": train_metrics["train_loss"], "val_loss": val_loss,
                       "val_bleu4": val_bleu4 if validate else -1.0, "best_val_bleu4": best,
                       "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - epoch_started, 3),
                       "train_images_per_s": images_per_s,
                       "resumed_from_epoch": resumed_from, "example": hyps[0] if hyps else ""}
            if rank == 0:
                log.info("%s", epoch_line(metrics, config.epochs))  # on the console with --verbose
                append_metrics(loop_config["metrics_uri"], metrics)
                events.add(metrics)
            if rank == 0 and validate:  # checkpoints are ranked by val BLEU-4: one per validated epoch
                with tempfile.TemporaryDirectory() as directory:
                    write_checkpoint(directory, state=model_state(encoder_state=encoder_state,
                                                                  decoder_state=decoder.state_dict()),
                                     config=loop_config["checkpoint_config"], vocab=vocab,
                                     train_state={**metrics, "schedule": schedule.to_dict()},
                                     optimizer_state={"optimizer": optimizer.state_dict(),
                                                      **({"scaler": scaler.state_dict()} if scaler else {})})
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics, checkpoint=None)
    finally:
        if events is not None:
            events.close()


def epoch_line(metrics: dict, epochs: int) -> str:
    bleu = f"val BLEU-4 {metrics['val_bleu4']:.3f}" if metrics["val_bleu4"] >= 0 else "val BLEU-4   -  "
    return (f"epoch {metrics['epoch'] + 1}/{epochs}  train loss {metrics['train_loss']:.3f}  "
            f"val loss {metrics['val_loss']:.3f}  {bleu}  ({metrics['train_images_per_s']:.0f} images/s, "
            f"{metrics['seconds']:.1f} s)")


class _EpochLines:
    """While the trainer runs: the driver logs each epoch's line from ``metrics.jsonl`` as it appears.

    The workers' own console output reaches the driver only with ``--verbose`` (then they say it).
    """

    def __init__(self, uri: str, *, epochs: int, poll_s: float = 2.0):
        self.uri, self.epochs, self.poll_s = uri, epochs, poll_s
        self.printed = -1
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="capray-epoch-lines", daemon=True)

    def __enter__(self) -> "_EpochLines":
        from capray.runtime import verbose

        if not verbose():
            self.printed = max((e["epoch"] for e in self._read()), default=-1)  # a resumed run's are old news
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()

    def _read(self) -> list[dict]:
        try:
            return _read_jsonl(self.uri)
        except (OSError, ValueError):  # mid-rewrite on a local disk, or a transient S3 error: next poll
            return []

    def _run(self) -> None:
        while True:
            stopping = self.done.wait(self.poll_s)
            for metrics in self._read():
                if metrics["epoch"] > self.printed:
                    log.info("%s", epoch_line(metrics, self.epochs))
                    self.printed = metrics["epoch"]
            if stopping:
                return


class EventLog:
    """A run's epochs as TensorBoard scalars, written by rank 0 with tensorboardX.

    In a local run folder the event file is written in place. For S3, which cannot append, events go
    to a local file and after each epoch the file is copied whole into ``uri`` (~300 bytes per epoch).
    tensorboardX's ``EventsWriter`` writes synchronously (its ``SummaryWriter`` queues events for a
    thread that ``flush`` does not wait for). A worker group restarted after a failure starts a file
    of its own (a random suffix keeps two started in the same second apart); TensorBoard reads every
    file of the folder.
    """

    SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "bleu4/val": "val_bleu4", "lr": "lr",
               "images_per_s/train": "train_images_per_s"}
    """TensorBoard tag → metrics key."""

    def __init__(self, uri: str):
        from tensorboardX.event_file_writer import EventsWriter

        self.uri, self._copied = uri, storage.is_remote(uri)
        if self._copied:
            folder = tempfile.mkdtemp(prefix="capray-events-")
            # The local copy goes when the log closes, or when the process exits without closing it
            # (a process killed outright leaves it: ~300 bytes per epoch in the temp folder).
            self._remove = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        else:
            storage.makedirs(uri)
            folder, self._remove = storage.resolve(uri)[1], None
        suffix = f".{uuid.uuid4().hex[:8]}"
        self.writer = EventsWriter(os.path.join(folder, "events"), filename_suffix=suffix)
        (name,) = (n for n in os.listdir(folder) if n.endswith(suffix))  # events.out.tfevents.<time>.<host><suffix>
        self.path = os.path.join(folder, name)

    def add(self, metrics: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for tag, key in self.SCALARS.items():
            if key != "val_bleu4" or metrics[key] >= 0:  # -1: not validated this epoch
                self.writer.write_event(Event(wall_time=time.time(), step=metrics["epoch"] + 1,
                                              summary=scalar(tag, metrics[key])))
        self.writer.flush()
        if self._copied:
            with open(self.path, "rb") as f:
                storage.write_bytes(storage.join(self.uri, os.path.basename(self.path)), f.read())

    def close(self) -> None:
        """Close the file (and remove the local copy of an S3 run's); every epoch added is in ``uri``."""
        self.writer.close()
        if self._remove is not None:
            self._remove()


def append_metrics(uri: str, metrics: dict) -> None:
    """One JSON line per epoch in ``RUN/metrics.jsonl``; an epoch redone after a failure replaces its line.

    The file is rewritten whole (S3 cannot append); it holds one short line per epoch.
    """
    kept = [m for m in _read_jsonl(uri) if m["epoch"] < metrics["epoch"]]
    storage.write_text(uri, "".join(json.dumps(m) + "\n" for m in [*kept, metrics]))


def read_metrics(run_dir: str) -> list[dict]:
    """A run's ``metrics.jsonl``: one dict per epoch, in order ([] before the first epoch ends)."""
    return _read_jsonl(storage.join(run_dir, METRICS_LOG))


def _read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()] \
        if storage.exists(uri) else []


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; our epoch line says the same in one line.

    Some of its modules name their logger by file path rather than by module, hence the second loop.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    marker = os.path.join("ray", "train", "")
    for name in list(logging.root.manager.loggerDict):
        if marker in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _gather(value, world: int) -> list:
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def feature_statistics(uri: str, *, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the region features over the first ``max_images`` images of a split.

    Computed in a Ray task (``capray.runtime.run_in_task``), not in the driver: on a cluster the driver
    runs on the head, and ``max_images`` rows of features are hundreds of MB for a large encoder.
    Read with pyarrow: a sample of a few thousand rows needs no Ray Data execution.
    """
    from capray.runtime import run_in_task

    return run_in_task(_feature_statistics, uri, max_images=max_images, what="feature statistics")


def _feature_statistics(uri: str, *, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri)
    total, total_sq, count, images = None, None, 0, 0
    for record_batch in pads.dataset(path, filesystem=fs, format="parquet").to_batches(columns=[FEATURES],
                                                                                        batch_size=256):
        if images >= max_images:
            break
        record_batch = record_batch.slice(0, max_images - images)
        images += record_batch.num_rows
        if not record_batch.num_rows:
            continue
        x = record_batch.column(FEATURES).to_numpy_ndarray().astype(np.float64)  # (B, P, E)
        x = x.reshape(-1, x.shape[-1])  # (B·P, E)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += x.shape[0]
    if not count:
        raise ConfigError("the train split has no feature rows")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def existing_checkpoints(run_dir: str) -> list[str]:
    """The run's whole checkpoint directories (see ``capray.checkpoint.is_complete``)."""
    from capray.checkpoint import CHECKPOINT_PREFIX, is_complete

    return [d for d in storage.list_dirs(run_dir)
            if storage.basename(d).startswith(CHECKPOINT_PREFIX) and is_complete(d)]


def train(config: TrainConfig) -> dict:
    """Train with Ray Train; the same ``--out/--name`` resumes from the run's latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from capray.features import check_split, load_prepare_info
    from capray.runtime import ensure_ray, local_machine, wait_for_resources, worker_cpus

    started = time.perf_counter()
    info = load_prepare_info(config.features)
    for split in ("train", "val"):
        if not info["splits"].get(split, {}).get("images"):
            raise ConfigError(f"{config.features}: the {split} split has no images; prepare it first")
    storage.check_bucket(config.out)
    vocab = Vocabulary.load(storage.join(config.features, VOCAB_FILE))
    decoder_config = DecoderConfig(vocab_size=len(vocab), feature_dim=info["num_features"], kind=config.decoder,
                                   embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                                   projection_dim=config.projection_dim, attention_dim=config.attention_dim,
                                   dropout=config.dropout, start_id=vocab.start_id, end_id=vocab.end_id,
                                   num_regions=info["num_regions"] if config.positions != "none" else 0,
                                   positions="learned" if config.positions == "none" else config.positions)
    for split in ("train", "val"):  # a damaged or changed feature set is found here, not inside the workers
        check_split(config.features, split, info)
    run_dir = storage.join(config.out, config.name)
    previous = existing_checkpoints(run_dir)
    schedule = Schedule.new(config.epochs)
    if previous:
        states = {d: storage.read_json(storage.join(d, TRAIN_STATE_FILE)) for d in previous}
        latest_dir = max(states, key=lambda d: states[d]["epoch"])
        latest = states[latest_dir]
        trained_with = storage.read_json(storage.join(latest_dir, CONFIG_FILE))
        check_decoder_matches(trained_with, decoder_config, run_dir=run_dir)
        if latest["epoch"] + 1 >= config.epochs:
            log.info("run %s already trained %d epochs; pass a larger --epochs to continue", run_dir,
                     latest["epoch"] + 1)
            return _summary(run_dir, config, latest, resumed=True, checkpoint=None, started=started)
        schedule = resume_schedule(latest, trained_with, epochs=config.epochs)
        log.info("resuming run %s from epoch %d (%d checkpoint(s) in %s); training continues up to epoch %d",
                 config.name, latest["epoch"] + 1, len(previous), run_dir, config.epochs)
    ensure_ray(dashboard=True)
    machine = local_machine()
    cpus = config.cpus_per_worker or worker_cpus(workers=config.workers, machine=machine)
    worker = {"CPU": cpus, **({"GPU": config.gpus_per_worker} if config.use_gpu else {})}
    if machine is not None and config.gpus_per_worker * config.workers > machine.gpus:
        raise ConfigError(f"--gpus-per-worker {config.gpus_per_worker:g} with {config.workers} workers but this "
                          f"machine has {machine.gpus:g} GPUs")
    if machine is None:  # a cluster: GPU nodes may not be up yet; Ray Train itself would retry forever
        wait_for_resources([worker] * config.workers, timeout_s=config.wait_timeout, what="train")
    train_images = info["splits"]["train"]["images"]
    share_bytes = _stored_bytes(info, "train", "val") / config.workers
    train_ds, val_ds = read_features(config, info)
    mean, std = feature_statistics(storage.join(config.features, "train"), max_images=config.stats_images)
    loop_config = {
        "hold": share_bytes <= config.in_memory_gb * 2**30,
        "metrics_uri": storage.join(run_dir, METRICS_LOG),
        "run_dir": run_dir,
        "train": asdict(config),
        "vocab": vocab.words,
        "decoder": decoder_config.to_dict(),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
        "steps_per_epoch": math.ceil(train_images / config.workers / config.batch_size),
        "schedule": schedule.to_dict(),
        "threads": max(1, int(cpus)),
        "encoder_state_uri": storage.join(config.features, ENCODER_STATE_FILE),
        "checkpoint_config": {"encoder": info["encoder"], "decoder": decoder_config.to_dict(),
                              "training": asdict(config), "features": config.features},
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=worker),
        run_config=RunConfig(
            name=config.name, storage_path=_storage_path(config.out),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="val_bleu4",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=config.max_failures)),
        datasets={"train": train_ds, "val": val_ds},
    )
    log.info("train: %d worker(s) × %.2f CPU%s, %d train images, epochs → %d, run %s",
             config.workers, cpus, f" + {config.gpus_per_worker:g} GPU" if config.use_gpu else "", train_images, config.epochs, run_dir)
    with _EpochLines(storage.join(run_dir, METRICS_LOG), epochs=config.epochs):
        result = trainer.fit()
    if result.error:
        raise result.error
    write_run_plots(run_dir, features=config.features, images=config.attention_images)
    return _summary(run_dir, config, result.metrics or {}, resumed=bool(previous),
                    checkpoint=result.checkpoint.path if result.checkpoint else None, started=started)


DECODER_FLAGS = {"kind": "--decoder", "embed_dim": "--embed-dim", "hidden_dim": "--hidden-dim",
                 "projection_dim": "--projection-dim", "attention_dim": "--attention-dim", "dropout": "--dropout",
                 "positions": "--positions", "num_regions": "--positions"}
"""The flag behind each ``DecoderConfig`` field; the others (vocabulary size, channels, special ids) come from
``--features``."""


def check_decoder_matches(trained_with: dict, decoder_config: DecoderConfig, *, run_dir: str) -> None:
    """Raise ``CheckpointError`` (exit 2), naming every differing setting, when the decoder this command
    would build is not the one the run's checkpoint holds: found here, before any worker starts (each
    worker would fail to load the weights, and the run would spend ``--max-failures`` on it)."""
    try:
        before = DecoderConfig(**trained_with["decoder"]).to_dict()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"run {run_dir}: its latest checkpoint's {CONFIG_FILE} does not fit this capray "
                              f"({exc})") from exc
    now = decoder_config.to_dict()
    differ = [name for name in now if before.get(name) != now[name]]
    if differ:
        what = ", ".join(f"{name} {before.get(name)} → {now[name]} ({DECODER_FLAGS.get(name, '--features')})"
                         for name in differ)
        raise CheckpointError(f"run {run_dir} was trained with another decoder: {what}; resume it with the "
                              f"settings it was started with, or start a new run (--name)")


def resume_schedule(latest: dict, trained_with: dict, *, epochs: int) -> Schedule:
    """The learning-rate schedule of a run resumed after its latest checkpoint (``latest``: its train state).

    The run's own schedule, in epochs (so another ``--workers`` changes nothing); with another ``--epochs``
    the cosine goes on from the rate reached and decays to 1% of the peak by the new last epoch
    (``Schedule.retarget``). Checkpoints from before the schedule was saved had a new run's schedule
    over the epochs they were started with.
    """
    if "schedule" in latest:
        schedule = Schedule(**latest["schedule"])
    else:
        schedule = Schedule.new(trained_with.get("training", {}).get("epochs", epochs))
    done = latest["epoch"] + 1
    if schedule.end_epoch != epochs:
        log.info("--epochs %d (the run's schedule ended at epoch %g): the learning rate goes on from %.3g of its "
                 "peak after epoch %d and decays to 1%% of it by epoch %d", epochs, schedule.end_epoch,
                 schedule.factor(done), done, epochs)
        schedule = schedule.retarget(done, epochs)
    return schedule


def _summary(run_dir: str, config: TrainConfig, metrics: dict, *, resumed: bool, checkpoint: str | None,
             started: float) -> dict:
    return {"run": run_dir, "resumed": resumed, "epochs": config.epochs, "last_epoch": metrics.get("epoch", -1),
            "val_bleu4": metrics.get("val_bleu4", 0.0), "best_val_bleu4": metrics.get("best_val_bleu4", 0.0),
            "train_loss": metrics.get("train_loss", 0.0), "val_loss": metrics.get("val_loss", 0.0),
            "checkpoint": checkpoint, "seconds": round(time.perf_counter() - started, 1)}


def print_summary(summary: dict) -> None:
    print(f"\nrun {summary['run']} ({'resumed' if summary['resumed'] else 'new'}): epoch "
          f"{(summary['last_epoch'] or 0) + 1}/{summary['epochs']}, val BLEU-4 {summary['val_bleu4']:.3f} "
          f"(best {summary['best_val_bleu4']:.3f}), train loss {summary['train_loss']:.3f}, "
          f"{summary['seconds']:.0f} s")
    if summary["checkpoint"]:
        print(f"latest checkpoint: {summary['checkpoint']}")
    print(f"caption with: capray caption --checkpoint {summary['run']} --input IMAGES --out OUT")


def _plot_name(image: str) -> str:
    """A file name for an image's plot: its own name, or SHARD-KEY for a shard's sample."""
    from capray.shards import shard_of

    shard = shard_of(image)
    if shard == image:
        return storage.basename(image).rsplit(".", 1)[0]
    return storage.basename(shard).rsplit(".", 1)[0] + "-" + image[len(shard) + 1:].replace("/", "-")


PLOTS_TIMEOUT_S = 600.0
"""How long the plotting task may take (waiting for a CPU included) before the plots are given up."""


def write_run_plots(run_dir: str, *, features: str, images: int) -> None:
    """``RUN/curves.png`` (loss and BLEU-4 per epoch) and ``RUN/attention/*.png`` for a few fixed val images.

    Drawn by a Ray task (``capray.runtime.run_in_task``): the attention maps read images and run the
    model, which the driver, on a cluster's head, must not do. What a run looks like, not what it is:
    a plot that cannot be made is a warning, never a failed run.
    """
    from ray.exceptions import RayError

    from capray.runtime import run_in_task

    try:
        run_in_task(_write_run_plots, run_dir, features=features, images=images, what="run plots",
                    timeout_s=PLOTS_TIMEOUT_S)
        log.info("curves: %s; attention maps of %d val image(s): %s", storage.join(run_dir, CURVES_FILE), images,
                 storage.join(run_dir, ATTENTION_DIR))
    except (OSError, ValueError, RayError) as exc:  # TimeoutError is an OSError; RayError: a lost node
        log.warning("could not plot the run (%s); training itself is done", " ".join(str(exc).split())[:300])


def _write_run_plots(run_dir: str, *, features: str, images: int) -> None:
    from capray.plots import plot_curves

    plot_curves(read_metrics(run_dir), storage.join(run_dir, CURVES_FILE))
    if images:
        from capray.evaluation import attend, first_images

        for image in first_images(storage.join(features, "val"), images):
            attend(run_dir, image, storage.join(run_dir, ATTENTION_DIR, f"{_plot_name(image)}.png"))


READ_ATTEMPTS = 3
"""Tries at reading the feature dataset in the driver: a node lost mid-read (a spot node taken back, an
autoscaler scaling an idle node down as a reader lands on it) kills Ray Data's readers with it."""
DRIVER_BLOCK_ROWS = 512
"""Rows per block of a split read by the driver (``TrainConfig.driver_read_mb``)."""


def read_features(config: TrainConfig, info: dict):
    """The train and val datasets, read into Ray's object store now when they fit there.

    Read before the workers start, the data is in the object store whether or not the workers leave
    a CPU free for Ray Data's read tasks (with every CPU held by a worker, a lazy read would wait
    forever); streamed epochs then skip re-reading the Parquet files. Small feature sets
    (``--driver-read-mb``) are read by this process itself, without a Ray Data job.
    """
    import ray.data
    from ray.exceptions import RayError

    splits = [storage.join(config.features, split) for split in ("train", "val")]
    if 0 < _stored_bytes(info, "train", "val") <= config.driver_read_mb * 2**20:
        return tuple(_read_in_driver(uri) for uri in splits)
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            train_ds, val_ds = (ray.data.read_parquet(uri) for uri in splits)
            if _fits_in_object_store(info):
                train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
            return train_ds, val_ds
        except RayError as exc:  # a Ray failure (a lost node, a dead reader), not a bad dataset
            if attempt == READ_ATTEMPTS:
                raise
            log.warning("train: reading %s failed (%s); trying again (%d/%d)", config.features,
                        " ".join(str(exc).split())[:200], attempt + 1, READ_ATTEMPTS)


def _read_in_driver(uri: str):
    """A small split read here with pyarrow, into Ray's object store as blocks of ``DRIVER_BLOCK_ROWS``
    (several blocks, so the workers' shares split evenly); no Ray task runs."""
    import pyarrow.dataset as pads
    import ray.data

    fs, path = storage.resolve(uri)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    return ray.data.from_arrow([table.slice(start, DRIVER_BLOCK_ROWS)
                                for start in range(0, max(table.num_rows, 1), DRIVER_BLOCK_ROWS)])


def _stored_bytes(info: dict, *splits: str) -> int:
    return sum(info["splits"][split]["images"] for split in splits) * _row_bytes(info)


def _row_bytes(info: dict) -> int:
    return 2 * info["num_regions"] * info["num_features"] + 512  # fp16 features + captions


def _fits_in_object_store(info: dict, *, fraction: float = 0.25) -> bool:
    import ray

    return _stored_bytes(info, "train", "val") < fraction * ray.available_resources().get("object_store_memory", 0)


def _storage_path(out: str) -> str:
    """Ray Train wants an absolute local path or a URI (``out`` is normalised already)."""
    return out
