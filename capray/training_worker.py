"""What every Ray Train worker of ``capray train`` runs: DDP over its shard, a report and a checkpoint per epoch.

``train_worker`` reads as the run's steps: build the decoder, resume from Ray Train's latest
checkpoint, then per epoch train (``capray.loop.train_epoch``), validate, record and report. The
driver that starts the workers is ``capray.training``.
"""
from __future__ import annotations

import inspect
import logging
import os
import tempfile
import time

import numpy as np
import torch

from capray import storage
from capray.checkpoint import decoder_state, model_state, read_state, write_checkpoint
from capray.config import TrainConfig
from capray.console import quiet_ray_train_logs
from capray.formats import MODEL_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE
from capray.loop import Examples, Schedule, amp_settings, bleu4, collate, evaluate_batches, train_epoch
from capray.model import Decoder, DecoderConfig
from capray.runlog import TENSORBOARD_DIR, EventLog, append_metrics, epoch_line
from capray.vocab import Vocabulary

log = logging.getLogger(__name__)


def train_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: DDP over its shard, report + checkpoint every epoch."""
    import ray.train
    import ray.train.torch

    config = TrainConfig(**loop_config["train"])
    _set_up_logging()
    vocab = Vocabulary(loop_config["vocab"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads"])  # the worker's CPU share, not the node's core count (GPU too)
    torch.manual_seed(config.seed)
    decoder = _build_decoder(loop_config, device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    use_amp, amp_dtype = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    epoch, step, best, resumed_from = _resume(decoder, optimizer, scaler)
    if rank == 0 and resumed_from >= 0:
        log.info("resuming from the checkpoint of epoch %d (step %d)", epoch, step)
    model = ray.train.torch.prepare_model(decoder, parallel_strategy_kwargs=ddp_options())
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    schedule = Schedule(**loop_config["schedule"])  # the run's, decided by the driver (see resume_schedule)
    encoder_state = read_state(loop_config["encoder_state_uri"]) if rank == 0 else None
    events = EventLog(storage.join(loop_config["run_dir"], TENSORBOARD_DIR)) if rank == 0 else None
    held: dict[str, Examples] = {}  # the worker's shares in memory, when they fit (loop_config["hold"])
    try:
        for epoch in range(epoch, config.epochs):
            epoch_started = time.perf_counter()
            if loop_config["hold"] and not held:  # read once; later epochs index tensors
                held = {name: Examples.from_batches(shard.iter_batches(batch_size=1024, batch_format="numpy"))
                        for name, shard in shards.items()}
            seed = int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])
            batches, val_batches = _epoch_batches(held, shards, config=config, device=device, seed=seed)
            train_metrics, step = train_epoch(model, optimizer, batches, config=config, device=device, scaler=scaler,
                                              step=step, schedule=schedule, epoch=epoch,
                                              steps_per_epoch=loop_config["steps_per_epoch"])
            validate = (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs
            val_loss, hyps, val_bleu4 = _validate(decoder, val_batches, vocab, config=config, world=world,
                                                  validate=validate)
            best = max(best, val_bleu4) if validate else best
            images_per_s = train_metrics["train_images"] * world / max(train_metrics["train_seconds"], 1e-9)
            metrics = {"epoch": epoch, "step": step, "train_loss": train_metrics["train_loss"], "val_loss": val_loss,
                       "val_bleu4": val_bleu4 if validate else -1.0, "best_val_bleu4": best,
                       "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - epoch_started, 3),
                       "train_images_per_s": images_per_s,
                       "resumed_from_epoch": resumed_from, "example": hyps[0] if hyps else ""}
            if rank == 0:
                _record(metrics, epochs=config.epochs, metrics_uri=loop_config["metrics_uri"], events=events)
            if rank == 0 and validate:  # checkpoints are ranked by val BLEU-4: one per validated epoch
                _report_with_checkpoint(metrics, decoder=decoder, optimizer=optimizer, scaler=scaler,
                                        encoder_state=encoder_state, schedule=schedule, vocab=vocab,
                                        checkpoint_config=loop_config["checkpoint_config"])
            else:
                ray.train.report(metrics, checkpoint=None)
    finally:
        if events is not None:
            events.close()


def ddp_options() -> dict:
    """DistributedDataParallel without its broadcast of the buffers before every forward.

    The decoder's buffers (feature statistics, grid coordinates) are set the same on every rank before
    training and never change, so the per-forward broadcast is one more collective per step, in
    lockstep, for nothing (its cost on 2 cores: docs/benchmarks.md). torch 2.14 renamed the option
    ``forward_sync_buffers`` (which still syncs them once, when DDP wraps the model; the older
    ``broadcast_buffers=False`` does not, and need not).
    """
    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False}


def _set_up_logging() -> None:
    """A fresh worker process: progress lines go to the driver's log, Ray Train's own lines stay quiet."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    quiet_ray_train_logs()


def _build_decoder(loop_config: dict, device: torch.device) -> Decoder:
    """The run's decoder on ``device``, normalising features with the driver's statistics."""
    decoder = Decoder(DecoderConfig(**loop_config["decoder"]))
    decoder.feature_mean.copy_(torch.tensor(loop_config["feature_mean"]))
    decoder.feature_std.copy_(torch.tensor(loop_config["feature_std"]))
    return decoder.to(device)


def _resume(decoder: Decoder, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> tuple[int, int, float, int]:
    """Load Ray Train's latest checkpoint, if there is one, into the decoder, optimizer and scaler.

    Returns the epoch to start at, the step, the best val BLEU-4 so far and the epoch resumed from
    (-1: a new run).
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, float("-inf"), -1
    with checkpoint.as_directory() as directory:
        decoder.load_state_dict(decoder_state(read_state(os.path.join(directory, MODEL_FILE))))
        extra = read_state(os.path.join(directory, OPTIMIZER_FILE))
        optimizer.load_state_dict(extra["optimizer"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        train_state = storage.read_json(os.path.join(directory, TRAIN_STATE_FILE))
    epoch = train_state["epoch"] + 1
    return epoch, train_state["step"], train_state.get("best_val_bleu4", float("-inf")), epoch


def _epoch_batches(held: dict, shards: dict, *, config: TrainConfig, device: torch.device, seed: int):
    """One epoch's train batches (shuffled by ``seed``) and val batches: indexed from the shares held in
    memory, else streamed from the worker's dataset shards."""
    if held:
        return (held["train"].batches(config.batch_size, device=device, seed=seed,
                                      captions_per_image=config.captions_per_image),
                held["val"].batches(config.batch_size, device=device))
    rng = np.random.default_rng(seed)
    batches = (collate(raw, device, captions_per_image=config.captions_per_image, rng=rng)
               for raw in shards["train"].iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                                       local_shuffle_buffer_size=4 * config.batch_size,
                                                       local_shuffle_seed=seed))
    val_batches = (collate(raw, device) for raw in shards["val"].iter_batches(batch_size=config.batch_size,
                                                                              batch_format="numpy"))
    return batches, val_batches


def _validate(decoder: Decoder, val_batches, vocab: Vocabulary, *, config: TrainConfig, world: int,
              validate: bool) -> tuple[float, list[str], float]:
    """The val loss over every rank's share, the captions decoded, and their BLEU-4 (NaN when not ``validate``:
    then only the loss is computed, and no image is decoded)."""
    val = evaluate_batches(decoder, val_batches, vocab, max_length=config.max_length,
                           max_images=max(1, config.val_images // world) if validate else 0)
    gathered = _gather(val, world)
    val_loss = sum(v["ce_sum"] for v in gathered) / max(1, sum(v["tokens"] for v in gathered))
    hyps = [h for v in gathered for h in v["hypotheses"]]
    refs = [r for v in gathered for r in v["references"]]
    return val_loss, hyps, bleu4(hyps, refs) if validate else float("nan")


def _record(metrics: dict, *, epochs: int, metrics_uri: str, events: EventLog) -> None:
    """Rank 0's record of an epoch: its line in the log, ``metrics.jsonl`` and TensorBoard."""
    log.info("%s", epoch_line(metrics, epochs))  # on the console with --verbose
    append_metrics(metrics_uri, metrics)
    events.add(metrics)


def _report_with_checkpoint(metrics: dict, *, decoder: Decoder, optimizer: torch.optim.Optimizer,
                            scaler: torch.amp.GradScaler | None, encoder_state: dict, schedule: Schedule,
                            vocab: Vocabulary, checkpoint_config: dict) -> None:
    """Report the epoch to Ray Train with a checkpoint directory (model, optimizer, schedule), which Ray
    Train copies into the run and keeps by its val BLEU-4."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, state=model_state(encoder_state=encoder_state, decoder_state=decoder.state_dict()),
                         config=checkpoint_config, vocab=vocab,
                         train_state={**metrics, "schedule": schedule.to_dict()},
                         optimizer_state={"optimizer": optimizer.state_dict(),
                                          **({"scaler": scaler.state_dict()} if scaler else {})})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _gather(value, world: int) -> list:
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out
