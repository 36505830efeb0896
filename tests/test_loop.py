"""capray.loop without Ray: in-memory batches match the streamed ones; metrics.jsonl keeps each epoch once;
the DDP wrapper's options."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from capray.loop import Examples, collate
from capray.model import Decoder, DecoderConfig
from capray.runlog import append_metrics, read_metrics
from capray.training_worker import ddp_options

CPU = torch.device("cpu")


def _batch(num_images: int = 7, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens, captions = [], []
    for i in range(num_images):
        count = 1 + i % 4  # 1..4 captions per image
        tokens.append([[1, *rng.integers(4, 30, size=2 + (i + j) % 5).tolist(), 2] for j in range(count)])
        captions.append([f"image {i} caption {j}" for j in range(count)])
    return {"features": rng.standard_normal((num_images, 6, 5)).astype(np.float16), "tokens": tokens,
            "captions": captions}


def _pairs(batch) -> list[tuple[float, tuple[int, ...]]]:
    """(image identity, caption without padding) for every row of a Batch."""
    firsts = batch.features[:, 0, 0].tolist()
    return sorted((firsts[i], tuple(t for t in row if t)) for i, row in zip(batch.image_index.tolist(),
                                                                            batch.tokens.tolist()))


def test_examples_give_the_rows_collate_gives_for_the_same_images():
    raw = _batch()
    held = next(Examples.from_batches([raw]).batches(16, device=CPU))
    streamed = collate(raw, CPU)
    assert _pairs(held) == _pairs(streamed)
    assert held.tokens.size(1) == streamed.tokens.size(1)  # padded to the batch's longest caption, no more
    assert held.references == streamed.references


def test_sampled_captions_are_each_images_own_and_distinct():
    raw = _batch(num_images=9)
    examples = Examples.from_batches([raw])
    own = {float(raw["features"][i, 0, 0]): {tuple(c) for c in raw["tokens"][i]} for i in range(9)}
    batches = list(examples.batches(4, device=CPU, captions_per_image=2, seed=5))
    assert [b.features.size(0) for b in batches] == [4, 4, 1]
    seen_images = []
    for batch in batches:
        pairs = _pairs(batch)
        for image, caption in pairs:
            assert caption in own[image]
        per_image = {}
        for image, caption in pairs:
            per_image.setdefault(image, []).append(caption)
        for image, chosen in per_image.items():
            assert len(chosen) == min(2, len(own[image])) == len(set(chosen))
        seen_images += per_image
    assert sorted(seen_images) == sorted(own)  # every image once per epoch


def test_shuffling_follows_the_seed():
    examples = Examples.from_batches([_batch(num_images=20)])
    order = lambda seed: [b.features[:, 0, 0].tolist() for b in examples.batches(5, device=CPU, seed=seed)]
    assert order(1) == order(1) and order(1) != order(2)


def test_metrics_log_keeps_one_line_per_epoch_when_epochs_are_redone(tmp_path):
    uri = str(tmp_path / "metrics.jsonl")
    for epoch, loss in [(0, 3.0), (1, 2.0), (2, 1.5), (1, 2.1), (2, 1.4), (3, 1.2)]:  # resumed after epoch 0
        append_metrics(uri, {"epoch": epoch, "train_loss": loss})
    assert read_metrics(str(tmp_path)) == [{"epoch": 0, "train_loss": 3.0}, {"epoch": 1, "train_loss": 2.1},
                                           {"epoch": 2, "train_loss": 1.4}, {"epoch": 3, "train_loss": 1.2}]


def test_ddp_wraps_the_decoder_without_a_buffer_broadcast_every_step(tmp_path):
    """The decoder's buffers never change in training, so DDP must not send them before every forward
    (a collective per step, in lockstep); the option's name must be this torch's own (no
    deprecation warning), and the wrapped decoder still trains."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        decoder = Decoder(DecoderConfig(vocab_size=12, feature_dim=5, embed_dim=8, hidden_dim=8, projection_dim=8,
                                        attention_dim=8, num_regions=4, positions="grid"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = DistributedDataParallel(decoder, **ddp_options())
        assert model.broadcast_buffers is False
        tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
        logits, _ = model(torch.randn(2, 4, 5), tokens, torch.tensor([0, 1]))
        logits.sum().backward()
        assert decoder.cell.weight_hh.grad is not None and decoder.position_map.weight.grad is not None
    finally:
        dist.destroy_process_group()


# --- the learning-rate schedule: in epochs, continued on resume ------------------------------------

def test_a_resumed_run_with_more_epochs_goes_on_from_the_rate_it_had_reached():
    from capray.loop import FINAL_FACTOR, Schedule

    first = Schedule.new(10)
    after_six = first.factor(6.0)
    extended = first.retarget(6, 20)
    rates = [extended.factor(6.0 + i / 10) for i in range(141)]  # epochs 6..20 in tenths
    assert abs(rates[0] - after_six) < 1e-12  # no jump back up at the resume ...
    assert all(b <= a + 1e-12 for a, b in zip(rates, rates[1:]))  # ... a decay from there ...
    assert abs(rates[-1] - FINAL_FACTOR) < 1e-12  # ... to 1% at the new last epoch
    assert extended.factor(13.0) > first.factor(13.0)  # spread over the longer run, not the old one's floor
    assert first.retarget(6, 10) == first  # the same --epochs: the same schedule
    shorter = first.retarget(6, 8)
    assert abs(shorter.factor(6.0) - after_six) < 1e-12 and abs(shorter.factor(8.0) - FINAL_FACTOR) < 1e-12


def test_a_resume_during_the_warm_up_keeps_warming_up():
    from capray.loop import Schedule

    first = Schedule.new(100)  # warm-up: the first 2 epochs
    longer = first.retarget(1, 200)
    assert longer.factor(1.0) == first.factor(1.0) < 1.0 and longer.factor(2.0) == 1.0


def test_the_rate_at_an_epoch_does_not_depend_on_the_steps_per_epoch():
    """A run resumed with another --workers has another number of steps per epoch: the learning rate
    after an epoch is the same, because the schedule counts epochs."""
    from capray.config import TrainConfig
    from capray.loop import Schedule, train_epoch

    examples = Examples.from_batches([_batch(num_images=8)])
    config = TrainConfig(features="f", out="o", learning_rate=1e-2)
    schedule = Schedule.new(10)
    rates = []
    for batch_size in (2, 4, 8):  # 4, 2 and 1 steps per epoch
        torch.manual_seed(0)
        decoder = Decoder(DecoderConfig(vocab_size=30, feature_dim=5, embed_dim=8, hidden_dim=8, projection_dim=8,
                                        attention_dim=8))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=config.learning_rate)
        _, steps = train_epoch(decoder, optimizer, examples.batches(batch_size, device=CPU, seed=0), config=config,
                               device=CPU, schedule=schedule, epoch=3, steps_per_epoch=8 // batch_size, step=0)
        assert steps == 8 // batch_size
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [rates[0]] * 3 and abs(rates[0] - 1e-2 * schedule.factor(4.0)) < 1e-15


def test_a_resumed_run_takes_its_schedule_from_its_checkpoint():
    from capray.loop import Schedule
    from capray.training import resume_schedule

    saved = Schedule.new(10).retarget(4, 12)  # a run already extended once
    latest = {"epoch": 7, "schedule": saved.to_dict()}  # 8 epochs done
    assert resume_schedule(latest, {}, epochs=12) == saved  # the same --epochs: as it was
    assert resume_schedule(latest, {}, epochs=16) == saved.retarget(8, 16)
    # A checkpoint from before schedules were saved had a new run's over the epochs it was started with.
    assert resume_schedule({"epoch": 7}, {"training": {"epochs": 10}}, epochs=10) == Schedule.new(10)
    assert resume_schedule({"epoch": 7}, {"training": {"epochs": 10}}, epochs=20) == Schedule.new(10).retarget(8, 20)
