"""Training throughput: a plain PyTorch loop vs capray train with 1 and 2 Ray Train workers (a table).

    .venv/bin/python bench/train_scaling.py [--num-images 1200] [--features URI] [--epochs 6] [--json out.json]

All runs train the demo's decoder (embed 128, hidden 256, projection 128, attention 128, grid
positions) on the same shapes-world features (the demo's: Lite0 blocks 7+10 at 128 px), batch 32
images per step, 2 captions drawn per image, 2 CPU threads in all:

- plain: one process, 2 torch threads, no Ray, no validation; written here in plain PyTorch (its own
  batching), so it measures what capray costs on top of the model's own arithmetic; run twice, with
  the model's packed teacher forcing and with the padded loop it replaced (what packing bought);
- plain, 1 thread; two of those at once in two processes, independent (the most two processes get
  from this machine: the ceiling of two_vs_one) and as one plain DDP group over gloo without Ray (what
  the gradient all-reduce costs before Ray adds anything);
- capray, 1 worker × 1 thread and 2 workers × 1 thread (DDP over gloo);
- capray, 2 workers, features streamed from Ray Data every epoch (``--in-memory-gb 0``): what holding
  a worker's share in memory buys.

Samples/s is training images per second (validation excluded, as the plain loop has none), the median
over the epochs after the first; "epoch s" is the median wall time of a whole epoch, validation included.
Targets: ray_vs_plain (2 workers / plain) ≥ 0.9, two_vs_one ≥ 1.7.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import pyarrow.dataset as pads
import torch
import torch.nn.functional as F

from capray import storage
from capray.config import ActorPool, PrepareConfig, SynthConfig, TrainConfig
from capray.connect import ensure_ray
from capray.demo import demo_encoder, demo_preset
from capray.features import prepare
from capray.model import Decoder, DecoderConfig
from capray.runlog import read_metrics
from capray.synth import generate
from capray.training import train
from capray.training_worker import ddp_options
from capray.vocab import Vocabulary

DECODER = dict(embed_dim=128, hidden_dim=256, projection_dim=128, attention_dim=128)
BATCH, CAPTIONS_PER_IMAGE, THREADS = 32, 2, 2


def padded_forward(model: Decoder, features: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor):
    """Teacher forcing as textbooks write it (and capray did before packing): every caption of the batch
    runs every step up to the longest caption, padding included."""
    regions, keys, state = model.encode(features)
    regions, keys, state = regions[image_index], keys[image_index], state[image_index]
    logits = []
    for t in range(tokens.size(1) - 1):
        step_logits, state, _ = model.step(tokens[:, t], state, regions, keys)
        logits.append(step_logits)
    return torch.stack(logits, dim=1), None


def plain_loop(features_uri: str, *, epochs: int, packed: bool = True, threads: int = THREADS, rank: int = 0,
               world: int = 1, port: int = 0, broadcast_buffers: bool = False) -> float:
    """Images/s of a hand-written loop (median epoch after the first); ``packed=False`` runs the padded
    teacher forcing instead of the model's own (packed) forward. ``world`` > 1: this is process ``rank``
    of a plain DDP group over gloo (no Ray), training on every ``world``-th image, with capray's DDP
    options or (``broadcast_buffers``) DDP's default: rank 0's buffers sent to all before every forward."""
    torch.set_num_threads(threads)
    table = pads.dataset(os.path.join(features_uri, "train"), format="parquet").to_table()
    features = torch.from_numpy(table["features"].combine_chunks().to_numpy_ndarray().copy())  # (N, P, E) fp16
    captions = table["tokens"].to_pylist()
    longest = max(len(c) for image in captions for c in image)
    most = max(len(image) for image in captions)
    tokens = torch.zeros(len(captions), most, longest, dtype=torch.long)
    for i, image in enumerate(captions):
        for j, caption in enumerate(image):
            tokens[i, j, : len(caption)] = torch.tensor(caption)
    counts = torch.tensor([len(image) for image in captions])
    vocab = Vocabulary.load(os.path.join(features_uri, "vocab.json"))
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=features.size(2), start_id=vocab.start_id,
                                  end_id=vocab.end_id, num_regions=features.size(1), positions="grid", **DECODER))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model, **({} if broadcast_buffers else ddp_options()))
    rates = []
    for _ in range(epochs):
        started, order = time.perf_counter(), torch.randperm(len(captions))[rank::world]
        for start in range(0, len(order), BATCH):
            index = order[start: start + BATCH]
            pick = (torch.rand(len(index), most) * counts[index].unsqueeze(1)).long()[:, :CAPTIONS_PER_IMAGE]
            rows = tokens[index.unsqueeze(1), pick].flatten(0, 1)  # (B·k, T)
            image_index = torch.arange(len(index)).repeat_interleave(pick.size(1))
            forward = model if packed else functools.partial(padded_forward, model.module if world > 1 else model)
            logits, _ = forward(features[index], rows, image_index)
            targets = rows[:, 1:]
            loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        rates.append(len(order) / (time.perf_counter() - started))
    if world > 1:
        torch.distributed.destroy_process_group()
    return statistics.median(rates[1:])


def side_by_side(features_uri: str, *, epochs: int, ddp: bool, broadcast_buffers: bool = False) -> float:
    """Images/s of two 1-thread plain loops run at once in two processes, summed: independent loops
    (``ddp=False``: what this machine gives two processes at all) or one plain DDP group (gloo, no Ray),
    with or without DDP's per-forward broadcast of the buffers."""
    import multiprocessing
    import socket
    from concurrent.futures import ProcessPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [pool.submit(plain_loop, features_uri, epochs=epochs, threads=1, rank=rank,
                            world=2 if ddp else 1, port=port, broadcast_buffers=broadcast_buffers)
                for rank in range(2)]
        return sum(run.result() for run in runs)


def capray_run(features: str, out: str, *, workers: int, epochs: int, in_memory_gb: float = 4.0) -> dict:
    name = f"w{workers}-{'memory' if in_memory_gb else 'streamed'}"
    train(TrainConfig(features=features, out=out, name=name, workers=workers, epochs=epochs, batch_size=BATCH,
                      captions_per_image=CAPTIONS_PER_IMAGE, cpus_per_worker=1, val_images=250, attention_images=0,
                      in_memory_gb=in_memory_gb, learning_rate=3e-3, attention_weight=0.01, **DECODER))
    later = read_metrics(os.path.join(out, name))[1:]
    return {"samples_per_s": statistics.median(e["train_images_per_s"] for e in later),
            "epoch_seconds": statistics.median(e["seconds"] for e in later)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=1200)
    p.add_argument("--features", default="", help="reuse a prepared feature dataset (local folder)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        features = os.path.abspath(args.features) if args.features else os.path.join(tmp, "features")
        if not args.features:
            manifest = generate(os.path.join(tmp, "shapes"), SynthConfig(num_images=args.num_images, image_size=128))
            ensure_ray(dashboard=True)
            prepare(PrepareConfig(annotations=manifest, out=features, pool=ActorPool(actors=2), batch_size=64,
                                  encoder=demo_encoder(demo_preset())))
        plain = plain_loop(features, epochs=args.epochs)
        padded = plain_loop(features, epochs=args.epochs, packed=False)
        alone = plain_loop(features, epochs=args.epochs, threads=1)
        independent = side_by_side(features, epochs=args.epochs, ddp=False)
        plain_ddp = side_by_side(features, epochs=args.epochs, ddp=True)
        plain_ddp_broadcast = side_by_side(features, epochs=args.epochs, ddp=True, broadcast_buffers=True)
        ensure_ray(dashboard=True)
        runs = os.path.join(tmp, "runs")
        one = capray_run(features, runs, workers=1, epochs=args.epochs)
        two = capray_run(features, runs, workers=2, epochs=args.epochs)
        streamed = capray_run(features, runs, workers=2, epochs=args.epochs, in_memory_gb=0.0)
    results = {"plain_samples_per_s": round(plain, 1), "plain_padded_samples_per_s": round(padded, 1),
               "packed_vs_padded": round(plain / padded, 3), "one_worker_samples_per_s": round(one["samples_per_s"], 1),
               "two_workers_samples_per_s": round(two["samples_per_s"], 1),
               "two_workers_streamed_samples_per_s": round(streamed["samples_per_s"], 1),
               "plain_one_thread_samples_per_s": round(alone, 1),
               "plain_two_independent_samples_per_s": round(independent, 1),
               "plain_ddp_samples_per_s": round(plain_ddp, 1),
               "plain_ddp_broadcast_buffers_samples_per_s": round(plain_ddp_broadcast, 1),
               "ray_vs_plain": round(two["samples_per_s"] / plain, 3),
               "two_vs_one": round(two["samples_per_s"] / one["samples_per_s"], 3),
               "machine_two_vs_one": round(independent / alone, 3),
               "plain_ddp_two_vs_one": round(plain_ddp / alone, 3),
               "epoch_seconds": {"one_worker": one["epoch_seconds"], "two_workers": two["epoch_seconds"],
                                 "two_workers_streamed": streamed["epoch_seconds"]}}
    print(f"\ntraining throughput: demo decoder, batch {BATCH}, {CAPTIONS_PER_IMAGE} captions/image, "
          f"{THREADS} threads in all; median of epochs 2..{args.epochs}")
    print(f"{'run':<44}{'samples/s':>11}{'epoch s':>9}")
    print(f"{'plain PyTorch loop, 1 process × 2 threads':<44}{plain:>11.1f}{'-':>9}")
    print(f"{'  the same, padded teacher forcing':<44}{padded:>11.1f}{'-':>9}")
    print(f"{'plain loop, 1 process × 1 thread':<44}{alone:>11.1f}{'-':>9}")
    print(f"{'  2 of them at once, independent (sum)':<44}{independent:>11.1f}{'-':>9}")
    print(f"{'  2 at once as plain DDP, gloo, no Ray':<44}{plain_ddp:>11.1f}{'-':>9}")
    print(f"{'  the same, broadcasting buffers every step':<44}{plain_ddp_broadcast:>11.1f}{'-':>9}")
    for label, run in (("capray, 1 worker × 1 thread", one), ("capray, 2 workers × 1 thread", two),
                       ("capray, 2 workers, streamed every epoch", streamed)):
        print(f"{label:<44}{run['samples_per_s']:>11.1f}{run['epoch_seconds']:>9.2f}")
    print(f"ray_vs_plain (2 workers / plain): {results['ray_vs_plain']:.2f}   (target >= 0.90)")
    print(f"two_vs_one   (2 workers / 1):     {results['two_vs_one']:.2f}   (target >= 1.70)")
    print(f"  what this machine allows: 2 independent 1-thread loops give x{results['machine_two_vs_one']:.2f} "
          f"one alone; 2 in plain DDP x{results['plain_ddp_two_vs_one']:.2f}")
    print(f"what each removal bought: packed teacher forcing x{results['packed_vs_padded']:.2f} (plain loop); "
          f"holding the shares in memory x{two['samples_per_s'] / streamed['samples_per_s']:.2f} (2 workers); "
          f"no per-step buffer broadcast x{plain_ddp / plain_ddp_broadcast:.2f} (plain DDP)")
    if args.json:
        storage.write_json(args.json, results)


if __name__ == "__main__":
    main()
