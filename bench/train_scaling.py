"""Training samples/s with 1 vs 2 Ray Train workers, one thread each (a table, not a test).

    .venv/bin/python bench/train_scaling.py [--num-images 1200] [--features URI] [--json out.json]

Samples/s is images per second of training (every caption of each image is used), taken as the median
over the epochs after the first, so Ray Train's start-up and the first epoch's warm-up are excluded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from capray import storage
from capray.encoders import EncoderSpec
from capray.features import PrepareConfig, prepare
from capray.runtime import ensure_ray
from capray.synth import SynthConfig, generate
from capray.training import TrainConfig, existing_checkpoints, train
from capray.formats import TRAIN_STATE_FILE


def samples_per_s(features: str, out: str, *, workers: int, epochs: int) -> float:
    config = TrainConfig(features=features, out=out, name=f"w{workers}", workers=workers, epochs=epochs,
                         batch_size=32, embed_dim=128, hidden_dim=256, projection_dim=128, attention_dim=64,
                         cpus_per_worker=0.5, keep_checkpoints=epochs, val_images=50)
    train(config)
    states = [storage.read_json(f"{d}/{TRAIN_STATE_FILE}") for d in existing_checkpoints(f"{out}/w{workers}")]
    rates = [s["train_images_per_s"] for s in sorted(states, key=lambda s: s["epoch"])][1:]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=1200)
    p.add_argument("--features", default="", help="reuse a prepared feature dataset")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--json", default="")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        ensure_ray(dashboard=True)
        features = args.features
        if not features:
            manifest = generate(os.path.join(tmp, "shapes"), SynthConfig(num_images=args.num_images, image_size=128))
            features = os.path.join(tmp, "features")
            prepare(PrepareConfig(annotations=manifest, out=features, actors=2, batch_size=64,
                                  encoder=EncoderSpec("efficientnet_lite0", "imagenet", 128)))
        rates = {w: samples_per_s(features, os.path.join(tmp, "runs"), workers=w, epochs=args.epochs) for w in (1, 2)}
    results = {"samples_per_s_1_worker": round(rates[1], 1), "samples_per_s_2_workers": round(rates[2], 1),
               "scaling_ratio": round(rates[2] / rates[1], 3)}
    print("\ntraining throughput (decoder: hidden 256, attention 64; one thread per worker; median epoch)")
    print(f"{'workers':<10}{'samples/s':>12}")
    print(f"{1:<10}{rates[1]:>12.1f}")
    print(f"{2:<10}{rates[2]:>12.1f}")
    print(f"scaling ratio (2 workers / 1): {rates[2] / rates[1]:.2f}  (ideal 2.00)")
    if args.json:
        storage.write_json(args.json, results)


if __name__ == "__main__":
    main()
