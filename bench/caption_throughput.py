"""Throughput and memory of ``capray caption`` against its limits (a benchmark, not a test).

    python bench/caption_throughput.py --num-images 250 --json bench-output/caption.json

What it measures, on the shapes world (PNG, ``--source-size`` px) and one checkpoint built here
(``--encoder`` with ``--weights`` at ``--image-size``; a decoder of DecoderConfig's default sizes over a
vocabulary of ``--vocab-size`` made-up words, randomly initialised: with random weights almost no
caption ends early, so beam search always runs ``--max-length`` steps, the worst case):

- model_images_per_s: encoder + batched beam search on pre-decoded tensors, at the batch size and
  torch threads the captioner actor gets: the ceiling of the whole job on this machine;
- e2e_images_per_s: the whole job (``caption()`` in a subprocess with its own local Ray), in steady
  state: rows written between the first and the last shard over the time between them
  (``e2e_cold_images_per_s`` is images / wall time including Ray's start and model loading);
- ratio = e2e / model (target ≥ 0.85);
- loop_images_per_s: a seed-style loop, one image at a time (read → decode → encode → beam search);
- decode_batched/single_images_per_s: beam search over the same features, a batch vs one at a time;
- peak_rss_mb_n / _4n: peak memory of the whole job (driver + every Ray process), summed as PSS so
  the shared object store is counted once, at N and 4N images (target ratio ≤ 1.2);
- where the time goes: read+decode per image (one thread), encoder and beam search per image.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from capray import storage
from capray.captioning import CaptionConfig
from capray.checkpoint import load_checkpoint, model_state, write_checkpoint
from capray.encoders import EncoderSpec, build_encoder
from capray.images import decode_image
from capray.model import Decoder, DecoderConfig
from capray.sizing import Machine, plan_pipeline
from capray.synth import SynthConfig, generate
from capray.vocab import SPECIALS, Vocabulary

JOB = """
import json, sys
from capray.captioning import CaptionConfig, caption
summary = caption(CaptionConfig(**json.loads(sys.argv[1])))
print(json.dumps(summary.to_dict()))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=250, help="N (the memory run also does 4N)")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--source-size", type=int, default=256, help="side of the generated PNGs")
    p.add_argument("--vocab-size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--loop-images", type=int, default=12, help="images for the one-at-a-time measurements")
    p.add_argument("--workdir", default="bench-output/caption")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    workdir = os.path.abspath(args.workdir)

    checkpoint = os.path.join(workdir, "checkpoint")
    build_checkpoint(checkpoint, args)
    inputs = {n: make_images(os.path.join(workdir, f"images-{n}"), n, args.source_size)
              for n in (args.num_images, 4 * args.num_images)}
    config = CaptionConfig(input="-", out="-", checkpoint=checkpoint, batch_size=args.batch_size,
                           beam_size=args.beam_size, max_length=args.max_length)
    plan = plan_pipeline(config.pool, machine=Machine(cpus=float(os.cpu_count()), gpus=0.0)).actors
    results = {"num_images": args.num_images, "encoder": args.encoder, "weights": args.weights,
               "image_size": args.image_size, "vocab_size": args.vocab_size, "batch_size": args.batch_size,
               "beam_size": args.beam_size, "max_length": args.max_length, "threads": plan.threads,
               "cpus": os.cpu_count()}

    results.update(measure_model(checkpoint, inputs[args.num_images], args, plan.threads))
    # Throughput: no sampling (it costs CPU); shards of up to 256 rows (one decode task each, as in
    # a real run), at least 6 of them, timed by their mtimes.
    rows = args.batch_size * max(1, min(256, 4 * args.num_images // 6) // args.batch_size)
    run = run_job(inputs[4 * args.num_images], os.path.join(workdir, "out-speed"), config,
                  rows_per_shard=rows, sample_memory=False)
    results["e2e_images_per_s"] = run["steady_images_per_s"]
    results["e2e_cold_images_per_s"] = run["cold_images_per_s"]
    results["wall_seconds_4n"] = run["wall_seconds"]
    # Memory: the default shard size, the whole process tree sampled once a second (~30 ms a sample).
    for n, tag in ((args.num_images, "n"), (4 * args.num_images, "4n")):
        run = run_job(inputs[n], os.path.join(workdir, f"out-{n}"), config,
                      rows_per_shard=CaptionConfig.rows_per_shard, sample_memory=True)
        results[f"peak_rss_mb_{tag}"] = run["peak_pss_mb"]
        results[f"peak_rss_sum_mb_{tag}"] = run["peak_rss_sum_mb"]
        results[f"cpu_seconds_{tag}"] = run["cpu_seconds"]
    results["ratio"] = results["e2e_images_per_s"] / results["model_images_per_s"]
    results["speedup_vs_loop"] = results["e2e_images_per_s"] / results["loop_images_per_s"]
    results["decode_speedup"] = results["decode_batched_images_per_s"] / results["decode_single_images_per_s"]
    results["rss_ratio_4n_n"] = results["peak_rss_mb_4n"] / results["peak_rss_mb_n"]
    results = {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}
    print_table(results)
    if args.json:
        storage.write_json(args.json, results)
        print(f"wrote {args.json}")


def build_checkpoint(directory: str, args) -> None:
    encoder = build_encoder(EncoderSpec(args.encoder, args.weights, args.image_size))
    vocab = Vocabulary(list(SPECIALS) + [f"word{i}" for i in range(args.vocab_size - len(SPECIALS))])
    config = DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.num_features)
    torch.manual_seed(0)
    decoder = Decoder(config)
    write_checkpoint(directory, state=model_state(encoder_state=encoder.state_dict(),
                                                  decoder_state=decoder.state_dict()),
                     config={"encoder": encoder.spec.to_dict(), "decoder": config.to_dict()}, vocab=vocab,
                     train_state={})


def make_images(directory: str, n: int, size: int) -> str:
    images = os.path.join(directory, "images")
    if not os.path.exists(os.path.join(directory, "manifest.jsonl")):
        generate(directory, SynthConfig(num_images=n, seed=1, image_size=size))
    return images


def measure_model(checkpoint: str, images: str, args, threads: int) -> dict:
    """Everything that runs without Ray: the model's ceiling, the loop, and where the time goes."""
    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)
    encoder, decoder, vocab = model.encoder, model.decoder, model.vocab
    size = encoder.spec.image_size
    paths = sorted(storage.list_files(images, extensions=("png",)))
    batch = args.batch_size
    paths = (paths * (1 + 4 * batch // len(paths)))[: 4 * batch]

    started = time.perf_counter()
    pixels = np.stack([decode_image(storage.read_bytes(p), size)[0] for p in paths])
    decode_per_image = (time.perf_counter() - started) / len(paths)
    x = torch.from_numpy(pixels)

    def beam(features):
        return decoder.beam_search(features, beam_size=args.beam_size, max_length=args.max_length)

    with torch.inference_mode():
        beam(encoder(x[:batch]))  # warm-up
        encode_seconds = beam_seconds = 0.0
        for start in range(0, len(x), batch):
            t0 = time.perf_counter()
            features = encoder(x[start:start + batch])
            t1 = time.perf_counter()
            beam(features)
            t2 = time.perf_counter()
            encode_seconds, beam_seconds = encode_seconds + t1 - t0, beam_seconds + t2 - t1
        model_rate = len(x) / (encode_seconds + beam_seconds)

        features = encoder(x[:batch])
        k = min(args.loop_images, batch)
        t0 = time.perf_counter()
        beam(features)
        t1 = time.perf_counter()
        for i in range(k):
            beam(features[i:i + 1])
        t2 = time.perf_counter()
        decode_batched, decode_single = batch / (t1 - t0), k / (t2 - t1)

        t0 = time.perf_counter()
        for path in paths[:k]:  # the seed: one image at a time, start to end
            array, _, _ = decode_image(storage.read_bytes(path), size)
            decoded = beam(encoder(torch.from_numpy(array)[None]))
            vocab.decode(decoded.tokens[0].tolist())
        loop_rate = k / (time.perf_counter() - t0)
    return {
        "model_images_per_s": model_rate,
        "encoder_images_per_s": len(x) / encode_seconds,
        "beam_images_per_s": len(x) / beam_seconds,
        "read_decode_images_per_s_one_thread": 1.0 / decode_per_image,
        "photo_decode_images_per_s_one_thread": photo_decode_rate(size),
        "photo_decode_299_images_per_s_one_thread": photo_decode_rate(299),
        "decode_batched_images_per_s": decode_batched,
        "decode_single_images_per_s": decode_single,
        "loop_images_per_s": loop_rate,
    }


def photo_decode_rate(size: int, seconds: float = 3.0) -> float:
    """Decode + resize to ``size`` of a COCO-sized photo (640×480 JPEG, quality 90) per second, one thread.

    The shapes world's small PNGs decode far faster than real photos; sizing a cluster's decode CPUs
    needs the photo figure. The photo is the scikit-image astronaut, tiled to 640×480.
    """
    import io

    from PIL import Image
    from skimage import data

    photo = np.tile(data.astronaut(), (1, 2, 1))[:480, :640]
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        decode_image(jpeg, size)
        done += 1
    return done / (time.perf_counter() - started)


def run_job(images: str, output: str, config: CaptionConfig, *, rows_per_shard: int, sample_memory: bool) -> dict:
    """``caption()`` in a subprocess with its own Ray; peak memory of its whole process tree."""
    values = {k: v for k, v in config.__dict__.items() if k not in ("input", "output", "extensions")}
    values.update(input=images, out=output, overwrite=True, rows_per_shard=rows_per_shard)
    ray_dir = tempfile.mkdtemp(prefix="capray-bench-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "CAPRAY_LOG_LEVEL": "WARNING", "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "300"}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    job = subprocess.Popen([sys.executable, "-c", JOB, json.dumps(values)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    peak = {"pss": 0.0, "rss": 0.0}
    cpu: dict[int, tuple[str, float]] = {}  # pid → (what it is, CPU seconds so far)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            pss, rss = tree_memory_mb(job.pid, cpu)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    out, _ = job.communicate()
    stop.set()
    if sample_memory:
        sampler.join()
    if job.returncode != 0:
        raise SystemExit(f"the caption job failed (exit {job.returncode})")
    summary = json.loads(out.strip().splitlines()[-1])
    shards = sorted((p.stat().st_mtime, p) for p in Path(output).glob("part-*.parquet"))
    import pyarrow.parquet as pq

    rows = [pq.ParquetFile(p).metadata.num_rows for _, p in shards]
    steady = (sum(rows[1:]) / (shards[-1][0] - shards[0][0])) if len(shards) >= 3 else float("nan")
    cpu_by_kind: dict[str, float] = {}
    for kind, seconds in cpu.values():
        cpu_by_kind[kind] = cpu_by_kind.get(kind, 0.0) + seconds
    return {"peak_pss_mb": peak["pss"], "peak_rss_sum_mb": peak["rss"], "steady_images_per_s": steady,
            "cold_images_per_s": summary["total"] / (time.time() - started), "wall_seconds": summary["wall_seconds"],
            "cpu_seconds": {k: round(v, 1) for k, v in sorted(cpu_by_kind.items(), key=lambda kv: -kv[1])}}


def _kind(pid: int, root: int) -> str:
    """What a process of the job is: the driver, a Ray worker (by the task or actor it runs), a Ray daemon."""
    if pid == root:
        return "driver"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = cmdline[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split("(")[-1].rstrip(")") if "MapWorker" in first else first
    name = os.path.basename(first)
    if name.startswith("python") and len(cmdline) > 1:
        name = os.path.basename(next((c.decode() for c in cmdline[1:] if c.endswith(b".py")), name))
    return f"ray daemons ({name})" if name else "?"


def tree_memory_mb(root: int, cpu: dict | None = None) -> tuple[float, float]:
    """(PSS, RSS) summed over ``root`` and all its descendants, in MB; updates ``cpu`` (pid → kind, seconds)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    pss = rss = 0.0
    todo = [root]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if cpu is not None:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / tick
                kind = _kind(pid, root)
                if pid in cpu and kind in ("ray::IDLE", "ray daemons (default_worker.py)"):
                    kind = cpu[pid][0]  # an idle worker keeps the name of what it last ran
                cpu[pid] = (kind, seconds)
            except (OSError, IndexError, ValueError):
                pass
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
        except OSError:
            continue
    return pss, rss


def print_table(r: dict) -> None:
    rows = [
        ("e2e images/s (steady, 4N)", f"{r['e2e_images_per_s']:.2f}", ""),
        ("e2e images/s (whole job, with startup)", f"{r['e2e_cold_images_per_s']:.2f}", ""),
        ("model images/s (encoder + beam)", f"{r['model_images_per_s']:.2f}", ""),
        ("ratio e2e / model", f"{r['ratio']:.2f}", "target ≥ 0.85"),
        ("loop images/s (one at a time)", f"{r['loop_images_per_s']:.2f}", ""),
        ("speedup vs loop", f"{r['speedup_vs_loop']:.1f}×", ""),
        ("beam search batched images/s", f"{r['decode_batched_images_per_s']:.2f}", ""),
        ("beam search single images/s", f"{r['decode_single_images_per_s']:.2f}", ""),
        ("decode speedup", f"{r['decode_speedup']:.1f}×", "target ≥ 10"),
        ("peak memory N / 4N (PSS MB)", f"{r['peak_rss_mb_n']:.0f} / {r['peak_rss_mb_4n']:.0f}", ""),
        ("memory ratio 4N / N", f"{r['rss_ratio_4n_n']:.2f}", "target ≤ 1.2"),
        ("where the time goes, per image:", "", ""),
        ("  read + decode (1 thread) ms", f"{1000 / r['read_decode_images_per_s_one_thread']:.1f}", ""),
        ("  (a 640×480 JPEG photo → image size) ms", f"{1000 / r['photo_decode_images_per_s_one_thread']:.1f}", ""),
        ("  (a 640×480 JPEG photo → 299 px) ms", f"{1000 / r['photo_decode_299_images_per_s_one_thread']:.1f}", ""),
        ("  encoder ms", f"{1000 / r['encoder_images_per_s']:.1f}", ""),
        ("  beam search ms", f"{1000 / r['beam_images_per_s']:.1f}", ""),
    ]
    print("CPU seconds of the 4N job by process:", ", ".join(f"{k} {v}" for k, v in r["cpu_seconds_4n"].items()))
    print(f"capray caption, {r['num_images']} / {4 * r['num_images']} images: {r['encoder']} ({r['weights']}) "
          f"@ {r['image_size']} px, vocab {r['vocab_size']}, batch {r['batch_size']}, beam {r['beam_size']}, "
          f"max length {r['max_length']}, {r['threads']} torch threads, {r['cpus']} CPUs")
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>15}  {note}")


if __name__ == "__main__":
    main()
