"""The training loop without Ray: batches, the loss, one epoch, validation.

``capray.training`` runs this inside Ray Train workers; the benchmark runs it in a plain process.

A worker's share of a split that fits in memory is held as :class:`Examples` after it has been read
once: features once per image (fp16, as stored) and every caption of an image in one padded token
matrix, so an epoch is tensor indexing — no Ray Data execution, no per-caption Python work. A share
too big for that streams from Ray Data each epoch through :func:`collate`, which makes the same
:class:`Batch` from a numpy batch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from capray.config import TrainConfig
from capray.errors import ConfigError
from capray.formats import CAPTIONS, FEATURES, TOKENS
from capray.metrics import score_captions
from capray.model import Decoder
from capray.precision import autocast_dtype
from capray.vocab import Vocabulary


@dataclass
class Batch:
    """Features once per image; one row per (image, caption) pair pointing at its image."""

    features: torch.Tensor  # (B, P, E)
    image_index: torch.Tensor  # (N,) which image each caption belongs to
    tokens: torch.Tensor  # (N, T) padded with 0
    references: list[list[str]] = field(default_factory=list)


@dataclass
class Examples:
    """A split (or a worker's share of one) in memory, ready to be cut into batches."""

    features: torch.Tensor
    """(N, P, E) as stored (float16)."""
    tokens: torch.Tensor
    """(N, C, T) int64: caption c of image i in row [i, c], 0-padded; C is the most captions of an image."""
    counts: torch.Tensor
    """(N,) captions of each image."""
    references: list[list[str]]
    """Each image's reference captions (text), for BLEU."""

    @classmethod
    def from_batches(cls, batches: Iterable[dict]) -> "Examples":
        """Collect numpy batches (``features``, ``tokens``, ``captions`` columns) once."""
        features, token_lists, references = [], [], []
        for batch in batches:
            features.append(np.asarray(batch[FEATURES]))
            token_lists += [list(t) for t in batch[TOKENS]]
            references += [list(c) for c in batch[CAPTIONS]]
        if not features:
            raise ConfigError("no feature rows to train on")
        counts = [len(t) for t in token_lists]
        longest = max((len(c) for t in token_lists for c in t), default=1)
        tokens = np.zeros((len(token_lists), max(counts), longest), dtype=np.int64)
        for i, captions in enumerate(token_lists):
            for j, caption in enumerate(captions):
                tokens[i, j, : len(caption)] = caption
        return cls(features=torch.from_numpy(np.concatenate(features)), tokens=torch.from_numpy(tokens),
                   counts=torch.tensor(counts), references=references)

    def __len__(self) -> int:
        return self.features.size(0)

    def batches(self, batch_size: int, *, device: torch.device, captions_per_image: int = 0,
                seed: int | None = None) -> Iterator[Batch]:
        """Batches of ``batch_size`` images (the last may be smaller), shuffled when ``seed`` is given.

        With ``captions_per_image`` k > 0, k of each image's captions are drawn afresh (all if fewer).
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        order = torch.randperm(len(self), generator=generator) if seed is not None else torch.arange(len(self))
        columns = torch.arange(self.tokens.size(1))
        for start in range(0, len(self), batch_size):
            index = order[start: start + batch_size]
            counts = self.counts[index]  # (B,)
            if captions_per_image:
                keys = torch.rand(index.numel(), columns.numel(), generator=generator)
                keys[columns.unsqueeze(0) >= counts.unsqueeze(1)] = 2.0  # absent captions sort last
                chosen = keys.argsort(dim=1)[:, :captions_per_image]  # (B, k)
            else:
                chosen = columns.expand(index.numel(), -1)  # (B, C)
            present = torch.arange(chosen.size(1)).unsqueeze(0) < counts.unsqueeze(1)  # (B, k)
            tokens = self.tokens[index.unsqueeze(1), chosen][present]  # (N, T)
            longest = int((tokens != 0).sum(dim=1).max())
            yield Batch(features=self.features[index].to(device, non_blocking=True),
                        image_index=present.nonzero()[:, 0].to(device),
                        tokens=tokens[:, :longest].to(device),
                        references=[self.references[i] for i in index.tolist()])


def collate(batch: dict, device: torch.device, *, captions_per_image: int = 0,
            rng: np.random.Generator | None = None) -> Batch:
    """A Ray Data numpy batch of images → a :class:`Batch`; captions padded to the batch's longest.

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


def caption_loss(model: torch.nn.Module, batch: Batch, *, attention_weight: float, label_smoothing: float = 0.0):
    """Masked cross-entropy over the next word + the doubly stochastic attention regulariser.

    Returns (loss, summed token cross-entropy, number of tokens) so callers can average exactly; the
    summed cross-entropy is always the plain one (without label smoothing), comparable across runs.
    """
    logits, alphas = model(batch.features, batch.tokens, batch.image_index)  # (N, T-1, V), (N, T-1, P)
    targets = batch.tokens[:, 1:]  # (N, T-1)
    mask = targets != 0
    logits = logits.float().transpose(1, 2)
    ce = F.cross_entropy(logits, targets, reduction="none")  # (N, T-1)
    ce_sum, num_tokens = (ce * mask).sum(), mask.sum()
    if label_smoothing:
        smoothed = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
        objective = (smoothed * mask).sum()
    else:
        objective = ce_sum
    coverage = (alphas.float() * mask.unsqueeze(2)).sum(dim=1)  # (N, P): Σ_t α_ti over real words
    regulariser = ((1.0 - coverage) ** 2).sum(dim=1).mean()
    loss = objective / num_tokens.clamp(min=1) + attention_weight * regulariser
    return loss, ce_sum.detach(), num_tokens.detach()


def amp_settings(device: torch.device) -> tuple[bool, torch.dtype]:
    """Mixed precision on GPUs only, by ``capray.precision``: bf16 where native (no loss scaling), else fp16."""
    dtype = autocast_dtype(device)
    return (False, torch.float32) if dtype is None else (True, dtype)


WARMUP_FRACTION = 0.02
"""Share of a new run's epochs over which the learning rate rises linearly to its peak."""
FINAL_FACTOR = 0.01
"""The cosine ends at this share of the peak learning rate."""


@dataclass(frozen=True)
class Schedule:
    """The learning rate, as a share of the peak, over training progress counted in epochs.

    Linear warm-up to the peak over ``warmup_epochs``, then a cosine from ``start_factor`` at
    ``start_epoch`` down to ``FINAL_FACTOR`` at ``end_epoch``. Progress is counted in epochs (passes
    over the train split), not optimizer steps, so a run resumed with another ``--workers`` (another
    number of steps per epoch) keeps its schedule. A run resumed with another ``--epochs`` continues
    from the share it had reached (``retarget``): the rate never jumps back up.
    """

    end_epoch: float
    """Where the cosine reaches ``FINAL_FACTOR``: the run's ``--epochs``."""
    warmup_epochs: float
    """Epochs of the linear warm-up at the start of the run."""
    start_epoch: float = 0.0
    """Where the cosine starts (after the warm-up when that ends later)."""
    start_factor: float = 1.0
    """The share of the peak the cosine starts from."""

    @classmethod
    def new(cls, epochs: int) -> "Schedule":
        """A new run's: warm-up over the first 2% of the epochs, then a cosine from the peak to 1%."""
        return cls(end_epoch=float(epochs), warmup_epochs=WARMUP_FRACTION * epochs)

    def factor(self, progress: float) -> float:
        """The share of the peak learning rate at ``progress`` epochs into the run."""
        if progress < self.warmup_epochs:
            return self.start_factor * max(progress, 0.0) / self.warmup_epochs
        begin = max(self.start_epoch, self.warmup_epochs)
        done = min(1.0, max(0.0, (progress - begin) / max(self.end_epoch - begin, 1e-9)))
        return FINAL_FACTOR + (self.start_factor - FINAL_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * done))

    def retarget(self, at: float, epochs: int) -> "Schedule":
        """This schedule, resumed after ``at`` epochs with ``epochs`` as the new last epoch: from the share
        reached at ``at``, a cosine down to ``FINAL_FACTOR`` at ``epochs`` (a warm-up not yet over stays)."""
        if epochs == self.end_epoch:
            return self
        if at <= max(self.warmup_epochs, self.start_epoch):  # the cosine has not begun: lengthen it
            return replace(self, end_epoch=float(epochs))
        return replace(self, end_epoch=float(epochs), start_epoch=float(at), start_factor=self.factor(at))

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate(peak: float, schedule: Schedule, progress: float) -> float:
    """The learning rate ``progress`` epochs into the run."""
    return peak * schedule.factor(progress)


def train_epoch(model, optimizer, batches: Iterable[Batch], *, config: TrainConfig, device: torch.device,
                schedule: Schedule, epoch: int, steps_per_epoch: int, scaler=None, step: int = 0) -> tuple[dict, int]:
    """One pass over ``batches`` (epoch ``epoch``, about ``steps_per_epoch`` of them); returns (metrics,
    global step). Each step's learning rate is the schedule's at the progress the step reaches. No host
    sync until the epoch ends."""
    model.train()
    use_amp, amp_dtype = amp_settings(device)
    ce_total = torch.zeros((), device=device)
    token_total = torch.zeros((), dtype=torch.long, device=device)
    images, started = 0, time.perf_counter()
    for index, batch in enumerate(batches):
        progress = epoch + min(1.0, (index + 1) / max(steps_per_epoch, 1))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config.learning_rate, schedule, progress)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            loss, ce_sum, num_tokens = caption_loss(model, batch, attention_weight=config.attention_weight,
                                                    label_smoothing=config.label_smoothing)
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
        ce_total += ce_sum
        token_total += num_tokens
        images += batch.features.size(0)
        step += 1
    seconds = time.perf_counter() - started
    return {"train_loss": float(ce_total) / max(int(token_total), 1), "train_images": images,
            "train_seconds": seconds}, step


@torch.no_grad()
def evaluate_batches(decoder: Decoder, batches: Iterable[Batch], vocab: Vocabulary, *, max_length: int,
                     max_images: int) -> dict:
    """Validation loss (teacher-forced) and free-running greedy captions for up to ``max_images``."""
    decoder.eval()
    ce_total, token_total, hypotheses, references = 0.0, 0, [], []
    for batch in batches:
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
