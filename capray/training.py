"""The train job's driver: checks, resources, Ray Train's trainer, then the run's plots and summary.

``train`` checks the feature set and any earlier run (same ``--out/--name``: it resumes), waits for
the workers' resources, reads the features (``capray.training_data``) and starts a ``TorchTrainer``
whose workers run ``capray.training_worker.train_worker``. The loop itself, without Ray, is
``capray.loop``; the run's record (``metrics.jsonl``, TensorBoard, the epoch lines) is ``capray.runlog``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

from capray import storage
from capray.autoscaler import wait_for_resources
from capray.checkpoint import CHECKPOINT_PREFIX, CheckpointError, is_complete
from capray.config import TrainConfig
from capray.connect import ensure_ray
from capray.errors import ConfigError
from capray.formats import CONFIG_FILE, ENCODER_STATE_FILE, TRAIN_STATE_FILE, VOCAB_FILE
from capray.loop import Schedule
from capray.model import DecoderConfig
from capray.runlog import METRICS_LOG, EpochLines
from capray.sizing import local_machine, worker_cpus
from capray.tasks import run_in_task
from capray.training_data import feature_statistics, fits_in_worker_memory, read_features
from capray.training_worker import train_worker
from capray.vocab import Vocabulary

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> dict:
    """Train with Ray Train; the same ``--out/--name`` resumes from the run's latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from capray.features import check_split, load_prepare_info

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
    train_ds, val_ds = read_features(config, info)
    mean, std = feature_statistics(storage.join(config.features, "train"), max_images=config.stats_images)
    loop_config = {
        "hold": fits_in_worker_memory(config, info),
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
    with EpochLines(storage.join(run_dir, METRICS_LOG), epochs=config.epochs, logger=log):
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


def existing_checkpoints(run_dir: str) -> list[str]:
    """The run's whole checkpoint directories (see ``capray.checkpoint.is_complete``)."""
    return [d for d in storage.list_dirs(run_dir)
            if storage.basename(d).startswith(CHECKPOINT_PREFIX) and is_complete(d)]


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


PLOTS_TIMEOUT_S = 600.0
"""How long the plotting task may take (waiting for a CPU included) before the plots are given up."""


def write_run_plots(run_dir: str, *, features: str, images: int) -> None:
    """``RUN/curves.png`` (loss and BLEU-4 per epoch) and ``RUN/attention/*.png`` for a few fixed val images.

    Drawn by a Ray task (``capray.tasks.run_in_task``): the attention maps read images and run the
    model, which the driver, on a cluster's head, must not do. What a run looks like, not what it is:
    a plot that cannot be made is a warning, never a failed run.
    """
    from ray.exceptions import RayError

    from capray.plots import ATTENTION_DIR, CURVES_FILE, plot_run

    try:
        run_in_task(plot_run, run_dir, features=features, images=images, what="run plots",
                    timeout_s=PLOTS_TIMEOUT_S)
        log.info("curves: %s; attention maps of %d val image(s): %s", storage.join(run_dir, CURVES_FILE), images,
                 storage.join(run_dir, ATTENTION_DIR))
    except (OSError, ValueError, RayError) as exc:  # TimeoutError is an OSError; RayError: a lost node
        log.warning("could not plot the run (%s); training itself is done", " ".join(str(exc).split())[:300])


def _storage_path(out: str) -> str:
    """Ray Train wants an absolute local path or a URI (``out`` is normalised already)."""
    return out
