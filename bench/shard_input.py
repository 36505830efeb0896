"""Loose objects vs shards as ``capray caption`` input on moto's S3 (a benchmark, not a test).

    python bench/shard_input.py --num-images 600 --json bench-output/shard_input.json

The same N JPEGs (the shapes world, ``--source-size`` px) go to one bucket three ways: as loose
objects under a prefix, as WebDataset shards of ``--samples-per-shard`` samples (img2dataset's layout,
written by ``capray synth --format webdataset``) and as Parquet files of the same bytes. For each
the table gives:

- list_s: listing the input as a caption run does (objects under the prefix, or the shards);
- wall_s and images_per_s: the whole ``caption()`` run in a subprocess with its own local Ray
  (Ray's start and model loading included, the same for every input);
- vs_loose: images/s over the loose objects' images/s, measured in this run.

The captioner is deliberately cheap (mobilenet_v3_small at 64 px, random weights, a small decoder,
captions of at most 8 words) so that reading the input, not the model, sets the pace. moto answers
from this process on 127.0.0.1: there is no network latency here, which is what shards save most
on a real bucket (one GET per shard instead of one per image), so the ratio is a lower bound.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from caption_throughput import run_job  # noqa: E402 (the bench next door runs a job the same way)

from capray import shards, storage  # noqa: E402
from capray.captioning import CaptionConfig  # noqa: E402
from capray.checkpoint import model_state, write_checkpoint  # noqa: E402
from capray.encoders import EncoderSpec, build_encoder  # noqa: E402
from capray.model import Decoder, DecoderConfig  # noqa: E402
from capray.synth import SynthConfig, generate  # noqa: E402
from capray.vocab import SPECIALS, Vocabulary  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=600)
    p.add_argument("--source-size", type=int, default=128, help="side of the generated JPEGs")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", default="bench-output/shards")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    server = start_s3("bench")
    try:
        inputs = make_inputs("s3://bench", args)
        checkpoint = os.path.join(workdir, "checkpoint")
        build_checkpoint(checkpoint)
        config = CaptionConfig(input="-", out="-", checkpoint=checkpoint, batch_size=args.batch_size, beam_size=3,
                               max_length=8)
        results = {"num_images": args.num_images, "samples_per_shard": args.samples_per_shard, "inputs": {}}
        for name, uri in inputs.items():
            started = time.perf_counter()
            listed = listing_count(uri, name)
            list_s = time.perf_counter() - started
            out = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
            run = run_job(uri, out, config, rows_per_shard=10_000, sample_memory=False)
            results["inputs"][name] = {"listed": listed, "list_s": round(list_s, 3),
                                       "wall_s": run["wall_seconds"],
                                       "images_per_s": round(args.num_images / run["wall_seconds"], 1)}
        loose = results["inputs"]["loose"]["images_per_s"]
        for row in results["inputs"].values():
            row["vs_loose"] = round(row["images_per_s"] / loose, 2)
    finally:
        server.stop()
    print_table(results)
    if args.json:
        storage.write_json(args.json, results)



def start_s3(bucket: str):
    """moto's S3 server on 127.0.0.1, in this process, with ``bucket`` made and the AWS variables set so
    that this process and every process it starts (Ray's included) use it; returns the server."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3").create_bucket(Bucket=bucket)
    return server

def make_inputs(bucket: str, args) -> dict[str, str]:
    """The same JPEG bytes as loose objects, WebDataset shards and Parquet files."""
    world = SynthConfig(num_images=args.num_images, seed=0, image_size=args.source_size)
    tars = generate(f"{bucket}/world", world, format="webdataset", samples_per_shard=args.samples_per_shard)
    parquet = generate(f"{bucket}/world", world, format="parquet", samples_per_shard=args.samples_per_shard)
    for shard in shards.list_shards(tars, shards.WEBDATASET):
        for sample in shards.iter_samples(shard, image_extensions=("jpg",)):
            storage.write_bytes(f"{bucket}/loose/{sample.key}.jpg", sample.image)
    return {"loose": f"{bucket}/loose", "webdataset": tars, "parquet": parquet}


def listing_count(uri: str, name: str) -> int:
    if name == "loose":
        return sum(1 for _ in storage.list_files(uri, extensions=("jpg",)))
    return len(shards.list_shards(uri, name))


def build_checkpoint(directory: str) -> None:
    encoder = build_encoder(EncoderSpec("mobilenet_v3_small", "none", 64))
    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(50)])
    config = DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.num_features, embed_dim=16, hidden_dim=64,
                           projection_dim=32, attention_dim=16)
    write_checkpoint(directory, state=model_state(encoder_state=encoder.state_dict(),
                                                  decoder_state=Decoder(config).state_dict()),
                     config={"encoder": encoder.spec.to_dict(), "decoder": config.to_dict()}, vocab=vocab,
                     train_state={"epoch": 0})


def print_table(results: dict) -> None:
    print(f"\ncapray caption, {results['num_images']} images on moto S3 "
          f"({results['samples_per_shard']} per shard)")
    print(f"{'input':<12}{'listed':>8}{'list s':>9}{'wall s':>9}{'images/s':>10}{'vs loose':>10}")
    for name, r in results["inputs"].items():
        print(f"{name:<12}{r['listed']:>8}{r['list_s']:>9.2f}{r['wall_s']:>9.1f}{r['images_per_s']:>10.1f}"
              f"{r['vs_loose']:>10.2f}")


if __name__ == "__main__":
    main()
