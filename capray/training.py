"""Training the decoder data-parallel with Ray Train over the prepared feature shards.

``train_epoch`` and ``evaluate_batches`` are plain functions that also run without Ray; the Ray
part is ``train_worker`` (what every Train worker runs) and ``train`` (the driver).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from capray import storage
from capray.checkpoint import decoder_state, model_state, read_state, write_checkpoint
from capray.formats import (CAPTIONS, ENCODER_STATE_FILE, FEATURES, MODEL_FILE, OPTIMIZER_FILE, TOKENS,
                            TRAIN_STATE_FILE, VOCAB_FILE)
from capray.metrics import score_captions
from capray.model import Decoder, DecoderConfig
from capray.vocab import Vocabulary

log = logging.getLogger(__name__)

FAULT_HANG_SECONDS = 5.0
"""How long an injected fault (tests only) hangs before the worker exits: over two controller polls."""


@dataclass(frozen=True)
class TrainConfig:
    features: str
    """Feature dataset written by ``capray prepare`` (URI)."""
    out: str
    """Where runs are stored (URI): checkpoints land in ``OUT/NAME/checkpoint_*``."""
    name: str = "capray"
    """Run name; the same ``--out/--name`` again resumes the run."""
    workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    gpu: bool = False
    """One GPU per worker, mixed precision."""
    epochs: int = 20
    """Total epochs; a resumed run continues up to this count."""
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
    decoder: str = "gru"
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
    captions_per_image: int = 0
    """Reference captions used per image per epoch, sampled afresh each epoch; 0 uses all of them."""
    max_length: int = 20
    """Longest caption generated in validation."""
    val_images: int = 500
    """Validation images decoded per epoch for BLEU-4 (all of the val split if fewer)."""
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
    inject_fault: str = ""
    """Test-only: ``RANK:STEP`` makes that rank exit at that global step, once per run."""

    def __post_init__(self):
        # Resolved where the user typed them: Train workers run in Ray's working directory, not the user's.
        object.__setattr__(self, "features", storage.normalize(self.features))
        object.__setattr__(self, "out", storage.normalize(self.out))
        if self.cpus_per_worker < 0 or self.wait_timeout < 0:
            raise ValueError("--cpus-per-worker and --wait-timeout must not be negative")
        if self.captions_per_image < 0:
            raise ValueError(f"--captions-per-image must be >= 0, got {self.captions_per_image}")
        for name in ("workers", "epochs", "batch_size", "max_length", "val_images", "stats_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be >= 0, got {self.max_failures}")
        if not self.name or "/" in self.name:
            raise ValueError(f"--name must be a plain name, got {self.name!r}")
        if self.inject_fault and not _parse_fault(self.inject_fault):
            raise ValueError(f"inject_fault must be RANK:STEP, got {self.inject_fault!r}")

    def decoder_config(self, *, vocab_size: int, feature_dim: int, vocab: Vocabulary) -> DecoderConfig:
        return DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, kind=self.decoder,
                             embed_dim=self.embed_dim, hidden_dim=self.hidden_dim,
                             projection_dim=self.projection_dim, attention_dim=self.attention_dim,
                             dropout=self.dropout, start_id=vocab.start_id, end_id=vocab.end_id)


@dataclass
class Batch:
    """Features once per image; one row per (image, caption) pair pointing at its image."""

    features: torch.Tensor  # (B, P, E)
    image_index: torch.Tensor  # (N,) which image each caption belongs to
    tokens: torch.Tensor  # (N, T) padded with 0
    references: list[list[str]] = field(default_factory=list)


def collate(batch: dict, device: torch.device, *, captions_per_image: int = 0,
            rng: np.random.Generator | None = None) -> Batch:
    """A Ray Data numpy batch of images → tensors; captions are padded to the batch's longest.

    With ``captions_per_image`` k > 0, k of each image's captions are drawn at random (all if fewer).
    """
    features = torch.as_tensor(np.array(batch[FEATURES])).to(device, non_blocking=True)
    per_image = [list(t) for t in batch[TOKENS]]
    if captions_per_image:
        rng = rng or np.random.default_rng()
        per_image = [[t[j] for j in sorted(rng.choice(len(t), min(captions_per_image, len(t)), replace=False))]
                     for t in per_image]
    token_lists = [t for image_tokens in per_image for t in image_tokens]
    image_index = [i for i, image_tokens in enumerate(per_image) for _ in image_tokens]
    longest = max(len(t) for t in token_lists)
    tokens = np.zeros((len(token_lists), longest), dtype=np.int64)  # (N, T), 0 = <pad>
    for row, t in enumerate(token_lists):
        tokens[row, : len(t)] = t
    references = [list(c) for c in batch[CAPTIONS]]
    return Batch(features=features, image_index=torch.as_tensor(image_index, device=device),
                 tokens=torch.as_tensor(tokens, device=device), references=references)


def caption_loss(model: torch.nn.Module, batch: Batch, *, attention_weight: float):
    """Masked cross-entropy over the next word + the doubly stochastic attention regulariser.

    Returns (loss, summed token cross-entropy, number of tokens) so callers can average exactly.
    """
    logits, alphas = model(batch.features, batch.tokens, batch.image_index)  # (N, T-1, V), (N, T-1, P)
    targets = batch.tokens[:, 1:]  # (N, T-1)
    mask = targets != 0
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (N, T-1)
    ce_sum, num_tokens = (ce * mask).sum(), mask.sum()
    coverage = (alphas.float() * mask.unsqueeze(2)).sum(dim=1)  # (N, P): Σ_t α_ti over real words
    regulariser = ((1.0 - coverage) ** 2).sum(dim=1).mean()
    loss = ce_sum / num_tokens.clamp(min=1) + attention_weight * regulariser
    return loss, ce_sum.detach(), num_tokens.detach()


def amp_settings(device: torch.device) -> tuple[bool, torch.dtype]:
    """Mixed precision on GPUs only: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda":
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over the first 2% of steps, then cosine decay to 1% of the peak."""
    warmup = max(1, int(0.02 * total_steps))
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.learning_rate * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_epoch(model, optimizer, batches: Iterable[dict], *, config: TrainConfig, device: torch.device,
                scaler=None, step: int = 0, total_steps: int = 1, on_step=None) -> tuple[dict, int]:
    """One pass over ``batches``; returns (metrics, global step). Runs with or without Ray."""
    model.train()
    use_amp, amp_dtype = amp_settings(device)
    ce_total, token_total, images, started = 0.0, 0, 0, time.perf_counter()
    rng = np.random.default_rng([config.seed, step])
    for raw in batches:
        batch = collate(raw, device, captions_per_image=config.captions_per_image, rng=rng)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, total_steps)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            loss, ce_sum, num_tokens = caption_loss(model, batch, attention_weight=config.attention_weight)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        ce_total += float(ce_sum)
        token_total += int(num_tokens)
        images += batch.features.size(0)
        step += 1
        if on_step is not None:
            on_step(step)
    seconds = time.perf_counter() - started
    return {"train_loss": ce_total / max(token_total, 1), "train_images": images,
            "train_seconds": seconds}, step


@torch.no_grad()
def evaluate_batches(decoder: Decoder, batches: Iterable[dict], vocab: Vocabulary, *, device: torch.device,
                     max_length: int, max_images: int) -> dict:
    """Validation loss (teacher-forced) and free-running greedy captions for up to ``max_images``."""
    decoder.eval()
    ce_total, token_total, hypotheses, references = 0.0, 0, [], []
    for raw in batches:
        batch = collate(raw, device)
        _, ce_sum, num_tokens = caption_loss(decoder, batch, attention_weight=0.0)
        ce_total, token_total = ce_total + float(ce_sum), token_total + int(num_tokens)
        if len(hypotheses) < max_images:
            decoded = decoder.greedy(batch.features, max_length=max_length)
            hypotheses += [vocab.decode(t) for t in decoded.tokens.tolist()]
            references += batch.references
    return {"ce_sum": ce_total, "tokens": token_total, "hypotheses": hypotheses[:max_images],
            "references": references[:max_images]}


def bleu4(hypotheses: list[str], references: list[list[str]]) -> float:
    if not hypotheses:
        return 0.0
    ids = [str(i) for i in range(len(hypotheses))]
    return score_captions(dict(zip(ids, references)), dict(zip(ids, hypotheses)))["bleu4"]


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
    if device.type == "cpu":
        torch.set_num_threads(loop_config["threads"])  # the worker's CPU share, not the node's core count
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
    model = ray.train.torch.prepare_model(decoder)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    steps_per_epoch = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * config.epochs
    fault = _parse_fault(config.inject_fault)
    on_step = _fault_hook(fault, rank, loop_config["fault_marker"]) if fault else None
    encoder_state = read_state(loop_config["encoder_state_uri"]) if rank == 0 else None
    for epoch in range(epoch, config.epochs):
        batches = train_shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                           local_shuffle_buffer_size=4 * config.batch_size,
                                           local_shuffle_seed=config.seed + epoch)
        train_metrics, step = train_epoch(model, optimizer, batches, config=config, device=device, scaler=scaler,
                                          step=step, total_steps=total_steps, on_step=on_step)
        val = evaluate_batches(decoder, val_shard.iter_batches(batch_size=config.batch_size, batch_format="numpy"),
                               vocab, device=device, max_length=config.max_length,
                               max_images=max(1, config.val_images // world))
        gathered = _gather(val, world)
        val_loss = sum(v["ce_sum"] for v in gathered) / max(1, sum(v["tokens"] for v in gathered))
        hyps = [h for v in gathered for h in v["hypotheses"]]
        refs = [r for v in gathered for r in v["references"]]
        val_bleu4 = bleu4(hyps, refs)
        best = max(best, val_bleu4)
        metrics = {"epoch": epoch, "step": step, "train_loss": train_metrics["train_loss"], "val_loss": val_loss,
                   "val_bleu4": val_bleu4, "best_val_bleu4": best, "lr": optimizer.param_groups[0]["lr"],
                   "train_images_per_s": train_metrics["train_images"] * world / max(train_metrics["train_seconds"], 1e-9),
                   "resumed_from_epoch": resumed_from, "example": hyps[0] if hyps else ""}
        if rank == 0:
            log.info("epoch %d/%d  train loss %.3f  val loss %.3f  val BLEU-4 %.3f  (%.0f images/s)",
                     epoch + 1, config.epochs, metrics["train_loss"], val_loss, val_bleu4,
                     metrics["train_images_per_s"])
            with tempfile.TemporaryDirectory() as directory:
                write_checkpoint(directory, state=model_state(encoder_state=encoder_state,
                                                              decoder_state=decoder.state_dict()),
                                 config=loop_config["checkpoint_config"], vocab=vocab, train_state=metrics,
                                 optimizer_state={"optimizer": optimizer.state_dict(),
                                                  **({"scaler": scaler.state_dict()} if scaler else {})})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics, checkpoint=None)


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


def _parse_fault(text: str) -> tuple[int, int] | None:
    try:
        rank, step = (int(x) for x in text.split(":"))
    except ValueError:
        return None
    return (rank, step) if rank >= 0 and step >= 1 else None


def _fault_hook(fault: tuple[int, int], rank: int, marker: str):
    """Exit the worker process at a step, once per run (a marker in the run directory remembers)."""
    fault_rank, fault_step = fault

    def hook(step: int) -> None:
        if rank == fault_rank and step == fault_step and not storage.exists(marker):
            storage.write_text(marker, f"worker {rank} exited at step {step}\n")
            log.warning("injected fault: worker %d exits at step %d", rank, step)
            # Ray Train's controller collects reported checkpoints by polling the workers (every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). A group that fails before the poll
            # after a report loses that report and restarts from the checkpoint before it. Hang long
            # enough for that poll first, so a test knows which checkpoint the restart must use.
            time.sleep(FAULT_HANG_SECONDS)
            os._exit(1)

    return hook


def feature_statistics(dataset, *, max_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the region features over a sample of train images."""
    total, total_sq, count = None, None, 0
    for batch in dataset.select_columns([FEATURES]).limit(max_images).iter_batches(batch_size=256,
                                                                                   batch_format="numpy"):
        x = batch[FEATURES].astype(np.float64)  # (B, P, E)
        x = x.reshape(-1, x.shape[-1])  # (B·P, E)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += x.shape[0]
    if not count:
        raise ValueError("the train split has no feature rows")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def existing_checkpoints(run_dir: str) -> list[str]:
    from capray.checkpoint import CHECKPOINT_PREFIX

    return [d for d in storage.list_dirs(run_dir) if storage.basename(d).startswith(CHECKPOINT_PREFIX)]


def train(config: TrainConfig) -> dict:
    """Train with Ray Train; the same ``--out/--name`` resumes from the run's latest checkpoint."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from capray.features import load_prepare_info
    from capray.runtime import ensure_ray, local_machine, wait_for_resources, worker_cpus

    started = time.perf_counter()
    info = load_prepare_info(config.features)
    for split in ("train", "val"):
        if not info["splits"].get(split, {}).get("images"):
            raise ValueError(f"{config.features}: the {split} split has no images; prepare it first")
    storage.check_bucket(config.out)
    vocab = Vocabulary.load(storage.join(config.features, VOCAB_FILE))
    decoder_config = config.decoder_config(vocab_size=len(vocab), feature_dim=info["num_features"], vocab=vocab)
    run_dir = storage.join(config.out, config.name)
    previous = existing_checkpoints(run_dir)
    if previous:
        latest = max((storage.read_json(storage.join(d, TRAIN_STATE_FILE)) for d in previous),
                     key=lambda state: state["epoch"])
        if latest["epoch"] + 1 >= config.epochs:
            log.info("run %s already trained %d epochs; pass a larger --epochs to continue", run_dir,
                     latest["epoch"] + 1)
            return _summary(run_dir, config, latest, resumed=True, checkpoint=None, started=started)
        log.info("resuming run %s from epoch %d (%d checkpoint(s) in %s); training continues up to epoch %d",
                 config.name, latest["epoch"] + 1, len(previous), run_dir, config.epochs)
    ensure_ray(dashboard=True)
    machine = local_machine()
    cpus = config.cpus_per_worker or worker_cpus(workers=config.workers, machine=machine)
    worker = {"CPU": cpus, **({"GPU": 1} if config.gpu else {})}
    if machine is not None and config.gpu and machine.gpus < config.workers:
        raise ValueError(f"--gpu with {config.workers} workers but this machine has {machine.gpus:g} GPUs")
    if machine is None:  # a cluster: GPU nodes may not be up yet; Ray Train itself would retry forever
        wait_for_resources([worker] * config.workers, timeout_s=config.wait_timeout, what="train")
    train_ds = ray.data.read_parquet(storage.join(config.features, "train"))
    val_ds = ray.data.read_parquet(storage.join(config.features, "val"))
    if _fits_in_object_store(info):
        # Small enough to keep in Ray's object store: epochs then skip re-reading the Parquet files.
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    mean, std = feature_statistics(train_ds, max_images=config.stats_images)
    train_images = info["splits"]["train"]["images"]
    loop_config = {
        "train": asdict(config),
        "vocab": vocab.words,
        "decoder": decoder_config.to_dict(),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
        "steps_per_epoch": math.ceil(train_images / config.workers / config.batch_size),
        "threads": max(1, int(cpus)),
        "encoder_state_uri": storage.join(config.features, ENCODER_STATE_FILE),
        "fault_marker": storage.join(run_dir, ".injected-fault"),
        "checkpoint_config": {"encoder": info["encoder"], "decoder": decoder_config.to_dict(),
                              "training": asdict(config), "features": config.features},
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu, resources_per_worker=worker),
        run_config=RunConfig(
            name=config.name, storage_path=_storage_path(config.out),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints,
                                               checkpoint_score_attribute="val_bleu4",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=config.max_failures)),
        datasets={"train": train_ds, "val": val_ds},
    )
    log.info("train: %d worker(s) × %.2f CPU%s, %d train images, epochs → %d, run %s",
             config.workers, cpus, " + 1 GPU" if config.gpu else "", train_images, config.epochs, run_dir)
    result = trainer.fit()
    if result.error:
        raise result.error
    return _summary(run_dir, config, result.metrics or {}, resumed=bool(previous),
                    checkpoint=result.checkpoint.path if result.checkpoint else None, started=started)


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
    print(f"caption with: capray caption --checkpoint {summary['run']} --input IMAGES --output OUT")


def _fits_in_object_store(info: dict, *, fraction: float = 0.25) -> bool:
    import ray

    row_bytes = 2 * info["num_regions"] * info["num_features"] + 512  # fp16 features + captions
    images = info["splits"]["train"]["images"] + info["splits"]["val"]["images"]
    return images * row_bytes < fraction * ray.available_resources().get("object_store_memory", 0)


def _storage_path(out: str) -> str:
    """Ray Train wants an absolute local path or a URI (``out`` is normalised already)."""
    return out
