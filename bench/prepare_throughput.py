"""Prepare throughput vs the encoder's forward pass alone (a table, not a test).

    .venv/bin/python bench/prepare_throughput.py [--num-images 600] [--json out.json]

prepare's steady-state images/s is measured as the marginal rate between a run of N and a run of 2N
images (start-up costs cancel out; a first run of N, discarded, warms the Ray session up); the limit
is the encoder's forward-only images/s on pre-decoded uint8 tensors with the same batch size and the
same total number of threads as the actor pool.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from capray import storage
from capray.config import ActorPool
from capray.connect import ensure_ray
from capray.encoders import EncoderSpec, build_encoder
from capray.features import PrepareConfig, prepare
from capray.images import decode_image
from capray.sizing import local_machine, plan_pipeline
from capray.synth import SynthConfig, generate


def forward_only(spec: EncoderSpec, images: np.ndarray, *, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    encoder = build_encoder(spec)
    batch = torch.from_numpy(images[:batch_size])
    with torch.inference_mode():
        encoder(batch)  # warm-up
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < 10.0:
            encoder(batch)
            done += batch.shape[0]
    return done / (time.perf_counter() - started)


def prepare_seconds(manifest: str, out: str, spec: EncoderSpec, *, batch_size: int, actors: int) -> tuple[float, int]:
    summary = prepare(PrepareConfig(annotations=manifest, out=out, encoder=spec, pool=ActorPool(actors=actors),
                                    batch_size=batch_size, splits=("train",)))
    return summary["encode_seconds"], summary["splits"]["train"]["images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=600, help="train images of the small run (2N in the large)")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args()
    spec = EncoderSpec(args.encoder, args.weights, args.image_size)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        # All images in the train split: N and 2N images, same everything else.
        manifests = {}
        for n in (args.num_images, 2 * args.num_images):
            manifests[n] = generate(os.path.join(tmp, f"shapes-{n}"), SynthConfig(
                num_images=n, image_size=args.image_size, train_fraction=1.0, val_fraction=0.0, test_fraction=0.0))
        ensure_ray()
        plan = plan_pipeline(ActorPool(actors=args.actors), machine=local_machine()).actors  # as prepare plans it
        # A first run of N pays what only the first pipeline in a Ray session pays (worker processes,
        # imports): it is discarded, so the N and 2N runs differ only in their number of images.
        prepare_seconds(manifests[args.num_images], os.path.join(tmp, "features-warm-up"), spec,
                        batch_size=args.batch_size, actors=args.actors)
        runs = {n: prepare_seconds(m, os.path.join(tmp, f"features-{n}"), spec, batch_size=args.batch_size,
                                   actors=args.actors) for n, m in manifests.items()}
        sample = sorted(os.listdir(os.path.join(tmp, f"shapes-{args.num_images}", "images", "train")))[: args.batch_size]
        pixels = np.stack([decode_image(open(os.path.join(tmp, f"shapes-{args.num_images}", "images", "train", f),
                                             "rb").read(), spec.resolved().image_size)[0] for f in sample])
    threads = plan.min_actors * plan.threads
    limit = forward_only(spec, pixels, batch_size=args.batch_size, threads=threads)
    (s1, n1), (s2, n2) = runs[args.num_images], runs[2 * args.num_images]
    steady = (n2 - n1) / max(s2 - s1, 1e-9)
    results = {"encoder": spec.name, "image_size": spec.resolved().image_size, "batch_size": args.batch_size,
               "actors": plan.min_actors, "threads_total": threads,
               "forward_only_images_per_s": round(limit, 1),
               "prepare_images_per_s_n": round(n1 / s1, 1), "prepare_images_per_s_2n": round(n2 / s2, 1),
               "prepare_steady_images_per_s": round(steady, 1), "ratio": round(steady / limit, 3)}
    print(f"\nprepare throughput ({spec.name} @ {results['image_size']} px, batch {args.batch_size}, "
          f"{plan.min_actors} actors, {threads} threads in all)")
    print(f"{'measure':<50}{'images/s':>10}")
    print(f"{'encoder forward only (pre-decoded, same threads)':<50}{limit:>10.1f}")
    print(f"{f'prepare, whole split of {n1}':<50}{n1 / s1:>10.1f}")
    print(f"{f'prepare, whole split of {n2}':<50}{n2 / s2:>10.1f}")
    print(f"{'prepare, steady state (2N − N)':<50}{steady:>10.1f}")
    print(f"{'ratio steady / forward-only':<50}{steady / limit:>10.3f}")
    if args.json:
        storage.write_json(args.json, results)


if __name__ == "__main__":
    main()
