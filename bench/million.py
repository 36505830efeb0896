"""A million images through ``capray caption``, killed half way and resumed (a benchmark, not a test).

    .venv/bin/python bench/million.py [--num-images 1000000] [--loose] [--only loose] [--json bench-output/million.json]

What it does, on this machine:

1. draws N small images of the shapes world (``--image-size`` px JPEGs) as WebDataset shards of
   ``--samples-per-shard`` on moto's S3 server (started here), plus one shard of ``--broken`` samples
   whose bytes are not an image; with ``--loose``, the same JPEGs (and the broken ones) as files in a
   local folder too;
2. measures, for each input, a plain single-process loop over its first ``--loop-shards`` shards (or
   as many loose files): read, decode, caption with the same ``Captioner``, 2 torch threads, no Ray;
   the rate that input's pipeline is held against;
3. runs ``capray caption`` (``jobs/caption.py``) in a subprocess, SIGKILLs it (the driver and the Ray
   it started) once its progress lines pass ``--kill-at`` of the images, counts the rows it left, then
   runs the same command again to the end; and does one uninterrupted run over N/10 images for the
   driver's memory at a tenth of the size;
4. checks the output: rows, unique paths, error rows (exactly the broken samples), and how many images
   were captioned twice because of the kill (captioned by the killed run, per its last progress line,
   but not in its shards: a lower bound, as the last line is up to ``--progress-s`` old);
5. with ``--prepare-samples M``, runs ``capray prepare`` (``jobs/prepare.py``, the same cheap encoder) over M
   and M/10 shapes-world samples in WebDataset shards on the same S3 server: rows, errors, images/s and
   the driver's peak RSS at both sizes (``--num-images 0`` measures prepare alone).

The captioner is cheap on purpose (mobilenet_v3_small at 64 px, random weights, a small decoder, beam 3,
at most 8 words: bench/shard_input.py's) so that the pipeline, not the model, sets the pace. The
driver's peak RSS is read from /proc (VmHWM) of the driver process alone; Ray's own processes are not
counted. The targets (issue 19): rows == unique paths == N + broken; pipeline steady-state images/s
≥ 0.8 × the plain loop; driver peak RSS at N over N/10 ≤ 1.2; work redone after the kill ≤ 2% of N.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shard_input import build_checkpoint, start_s3  # noqa: E402 (the bench next door's captioner and S3)

from capray import shards, storage  # noqa: E402
from capray.synth import SynthConfig, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"(?:caption|prepare): ([\d,]+)(?:/([\d,]+))? images.*?, ((?:[\d,.]+)|-) images/s, "
                      r"([\d,]+) error rows")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=1_000_000)
    p.add_argument("--image-size", type=int, default=56, help="side of the generated JPEGs")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--broken", type=int, default=100, help="samples whose bytes are not an image")
    p.add_argument("--loose", action="store_true", help="also caption the same images as loose local files")
    p.add_argument("--only", choices=("webdataset", "loose"), default="",
                   help="caption this input alone (the shards are drawn either way: loose files are copied from them)")
    p.add_argument("--kill-at", type=float, default=0.5, help="kill the first run past this share of the images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--progress-s", type=float, default=10.0)
    p.add_argument("--rows-per-shard", type=int, default=0, help="caption's --rows-per-shard (0: its default)")
    p.add_argument("--loop-shards", type=int, default=10, help="shards the plain loop reads")
    p.add_argument("--workdir", default="bench-output/million")
    p.add_argument("--prepare-samples", type=int, default=0,
                   help="also measure prepare's driver memory over this many shard samples and a tenth of them")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()
    if args.only == "loose":
        args.loose = True
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    server = start_s3("bench")
    results: dict = {"num_images": args.num_images, "broken": args.broken, "image_size": args.image_size,
                     "rows_per_shard": args.rows_per_shard or "default",
                     "samples_per_shard": args.samples_per_shard, "inputs": {}}
    try:
        if args.num_images:
            started = time.perf_counter()
            inputs = make_inputs("s3://bench", workdir, args)
            results["generate_s"] = round(time.perf_counter() - started, 1)
            checkpoint = str(workdir / "checkpoint")
            build_checkpoint(checkpoint)
            for name, uri in inputs.items():
                if args.only and name != args.only:
                    continue
                loop = plain_loop(loop_images(name, uri, args), checkpoint, args)
                run = results["inputs"][name] = run_input(name, uri, checkpoint, workdir, args)
                run["plain_loop_images_per_s"] = loop
                run["vs_plain_loop"] = round(run["steady_images_per_s"] / loop, 2)
        if args.prepare_samples:
            results["prepare"] = prepare_memory("s3://bench", workdir, args)
    finally:
        server.stop()
    if args.num_images:
        print_table(results)
    if args.prepare_samples:
        print_prepare(results["prepare"])
    if args.json:
        storage.write_json(args.json, results)


def make_inputs(bucket: str, workdir: Path, args) -> dict[str, str]:
    """N shapes-world JPEGs as WebDataset shards on S3 (and loose files), plus ``--broken`` bad samples."""
    world = SynthConfig(num_images=args.num_images, seed=0, image_size=args.image_size)
    tars = generate(f"{bucket}/world", world, format="webdataset", samples_per_shard=args.samples_per_shard)
    drawn = shards.list_shards(tars, shards.WEBDATASET)
    broken = {f"broken-{i:06d}": b"\xff\xd8 not a jpeg " + str(i).encode() for i in range(args.broken)}
    storage.write_bytes(f"{tars}/broken.tar", _tar(broken))
    inputs = {"webdataset": tars}
    if args.loose:
        folder = workdir / "loose"
        folder.mkdir(exist_ok=True)

        def copy(shard: str) -> None:
            for sample in shards.iter_samples(shard, image_extensions=("jpg",)):
                sub = folder / sample.key[-3:]  # 1,000 files a folder at most
                sub.mkdir(exist_ok=True)
                (sub / f"{sample.key}.jpg").write_bytes(sample.image)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(copy, drawn))
        (folder / "broken").mkdir(exist_ok=True)
        for key, data in broken.items():
            (folder / "broken" / f"{key}.jpg").write_bytes(data)
        inputs["loose"] = str(folder)
    return inputs


def _tar(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, data in members.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def loop_images(name: str, uri: str, args):
    """The bytes of the plain loop's images: the first ``--loop-shards`` shards' samples, or as many
    loose files (``--loop-shards`` × ``--samples-per-shard``, in path order)."""
    if name == "webdataset":
        for shard in shards.list_shards(uri, shards.WEBDATASET)[:args.loop_shards]:
            for sample in shards.iter_samples(shard, image_extensions=("jpg",)):
                yield sample.image
        return
    left = args.loop_shards * args.samples_per_shard
    for folder in sorted(Path(uri).iterdir()):
        for path in sorted(folder.glob("*.jpg"))[:left]:
            yield path.read_bytes()
            left -= 1
        if not left:
            return


def plain_loop(images, checkpoint: str, args) -> float:
    """Images/s of one process reading, decoding and captioning ``images`` (an iterator of bytes), without Ray."""
    import numpy as np
    import torch

    from capray.captioning import Captioner
    from capray.images import ImageDecodeError, decode_image

    torch.set_num_threads(2)
    captioner = Captioner(checkpoint, beam_size=3, max_length=8, threads=2, use_gpu=False,
                          warmup_batch=args.batch_size)
    size = captioner.encoder.spec.image_size
    count, batch, started = 0, [], time.perf_counter()
    for data in images:
        try:
            batch.append(decode_image(data, size)[0])
        except ImageDecodeError:
            continue
        if len(batch) == args.batch_size:
            captioner.caption(np.stack(batch))
            count, batch = count + len(batch), []
    if batch:
        captioner.caption(np.stack(batch))
        count += len(batch)
    return round(count / (time.perf_counter() - started), 1)


def run_input(name: str, uri: str, checkpoint: str, workdir: Path, args) -> dict:
    """Killed half way, resumed to the end; then a tenth of the input, uninterrupted."""
    expected = args.num_images + args.broken
    out = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    killed = run_caption(uri, out, checkpoint, args, kill_at=int(args.kill_at * expected))
    rows_after_kill = len(output_paths(out))
    resumed = run_caption(uri, out, checkpoint, args)
    paths = output_paths(out)
    errors = sum(1 for _, error in paths if error)
    summary = json.loads(Path(out, "summary.json").read_text())
    tenth_uri = tenth(uri, name, workdir, args)
    small_out = tempfile.mkdtemp(prefix=f"{name}-tenth-", dir=workdir)
    small = run_caption(tenth_uri, small_out, checkpoint, args)
    redone = max(0, killed["done_at_last_line"] - rows_after_kill)
    return {
        "expected": expected, "rows": len(paths), "unique_paths": len({p for p, _ in paths}),
        "error_rows": errors, "killed_after_rows": rows_after_kill, "redone_after_kill": redone,
        "redone_share": round(redone / expected, 4),
        "steady_images_per_s": resumed["steady_images_per_s"],
        "resume_to_first_line_s": resumed["first_progress_s"], "resumed_wall_s": resumed["wall_s"],
        "killed_run_wall_s": killed["wall_s"], "summary_skipped": summary["skipped"],
        "driver_peak_rss_mb": max(killed["driver_peak_rss_mb"], resumed["driver_peak_rss_mb"]),
        "driver_peak_rss_mb_tenth": small["driver_peak_rss_mb"], "shards": len(list(Path(out).glob("part-*.parquet"))),
        "rss_ratio": round(max(killed["driver_peak_rss_mb"], resumed["driver_peak_rss_mb"])
                           / small["driver_peak_rss_mb"], 2),
    }


def prepare_memory(bucket: str, workdir: Path, args) -> dict:
    """``capray prepare`` over a tenth of ``--prepare-samples`` and over all of them: the driver's peak RSS."""
    runs = {}
    for n in (args.prepare_samples // 10, args.prepare_samples):
        world = SynthConfig(num_images=n, seed=1, image_size=args.image_size)
        tars = generate(f"{bucket}/prepare-{n}", world, format="webdataset", samples_per_shard=args.samples_per_shard)
        out = tempfile.mkdtemp(prefix=f"prepare-{n}-", dir=workdir)
        command = [sys.executable, str(ROOT / "jobs" / "prepare.py"), "--annotations", tars, "--out", out,
                   "--encoder.name", "mobilenet_v3_small", "--encoder.weights", "none", "--encoder.image-size", "64",
                   "--batch-size", str(args.batch_size), "--progress-s", str(args.progress_s)]
        run = run_job(command, what=f"prepare of {tars}")
        prepared = json.loads(Path(out, "prepare.json").read_text())
        runs[n] = {"samples": n, "rows": prepared["num_images"], "errors": prepared["num_errors"],
                   "images_per_s": prepared["images_per_s"], "wall_s": run["wall_s"],
                   "driver_peak_rss_mb": run["driver_peak_rss_mb"]}
    small, large = runs[args.prepare_samples // 10], runs[args.prepare_samples]
    return {"runs": list(runs.values()),
            "rss_ratio": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 2)}


def print_prepare(results: dict) -> None:
    print("\ncapray prepare from WebDataset shards (mobilenet_v3_small at 64 px, random weights)")
    print(f"{'samples':>10}{'rows':>10}{'errors':>8}{'images/s':>10}{'wall s':>9}{'driver RSS MB':>15}")
    for r in results["runs"]:
        print(f"{r['samples']:>10,}{r['rows']:>10,}{r['errors']:>8}{r['images_per_s']:>10.1f}{r['wall_s']:>9.1f}"
              f"{r['driver_peak_rss_mb']:>15.1f}")
    print(f"driver peak RSS ratio (all / a tenth): {results['rss_ratio']}")


def tenth(uri: str, name: str, workdir: Path, args) -> str:
    """The same kind of input with a tenth of the images: the first shards, or their loose files."""
    if name == "webdataset":
        count = max(1, len(shards.list_shards(uri, shards.WEBDATASET)) // 10)
        return f"{uri}/{{00000..{count - 1:05d}}}.tar"
    folder = workdir / "loose-tenth"
    if not folder.exists():
        folder.mkdir()
        for i, path in enumerate(sorted(Path(uri).rglob("*.jpg"))):
            if i % 10 == 0:
                os.link(path, folder / path.name)
    return str(folder)


def run_caption(uri: str, out: str, checkpoint: str, args, *, kill_at: int | None = None) -> dict:
    """``jobs/caption.py`` over ``uri`` (``run_job``)."""
    command = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", uri, "--out", out,
               "--checkpoint", checkpoint, "--batch-size", str(args.batch_size), "--beam-size", "3",
               "--max-length", "8", "--progress-s", str(args.progress_s), "--extensions", "jpg",
               *(["--rows-per-shard", str(args.rows_per_shard)] if args.rows_per_shard else [])]
    return run_job(command, what=f"caption of {uri}", kill_at=kill_at)


def run_job(command: list[str], *, what: str, kill_at: int | None = None) -> dict:
    """A job in its own session with its own local Ray; its progress lines read as they come, the driver's
    RSS sampled every second; SIGKILLed (with its Ray) once a line passes ``kill_at`` images."""
    ray_dir = tempfile.mkdtemp(prefix="capray-million-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "CAPRAY_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    peak = [0.0]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(1.0):
            peak[0] = max(peak[0], vm_hwm_mb(job.pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    lines: list[tuple[float, int, float | None]] = []  # (seconds since start, done, images/s)
    tail: list[str] = []
    for line in job.stderr:
        tail = (tail + [line])[-30:]
        match = PROGRESS.search(line)
        if not match:
            continue
        done = int(match.group(1).replace(",", ""))
        rate = None if match.group(3) == "-" else float(match.group(3).replace(",", ""))
        lines.append((time.perf_counter() - started, done, rate))
        if kill_at is not None and done >= kill_at:
            peak[0] = max(peak[0], vm_hwm_mb(job.pid))
            os.killpg(job.pid, signal.SIGKILL)
            break
    job.wait()
    stop.set()
    sampler.join()
    subprocess.run(["pkill", "-9", "-f", ray_dir], check=False)  # Ray's processes of a killed driver
    if kill_at is None and job.returncode != 0:
        raise SystemExit(f"{what} failed (exit {job.returncode}):\n{''.join(tail)}")
    rates = [r for t, _, r in lines[1:-1] if r]  # the first and the last interval are partial
    return {"wall_s": round(time.perf_counter() - started, 1), "driver_peak_rss_mb": round(peak[0], 1),
            "done_at_last_line": lines[-1][1] if lines else 0,
            "first_progress_s": round(lines[0][0], 1) if lines else None,
            "steady_images_per_s": round(statistics.median(rates), 1) if rates else float("nan")}


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of one process so far (Linux ``VmHWM``), 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


def output_paths(out: str) -> list[tuple[str, bool]]:
    """(path, is an error row) of every row in the output's shards."""
    import pyarrow.parquet as pq

    rows = []
    for shard in sorted(Path(out).glob("part-*.parquet")):
        table = pq.read_table(shard, columns=["path", "error"])
        rows += [(p, e is not None) for p, e in zip(table.column("path").to_pylist(),
                                                    table.column("error").to_pylist())]
    return rows


def print_table(results: dict) -> None:
    print(f"\ncapray caption at N = {results['num_images']:,} (+{results['broken']} broken), "
          f"{results['image_size']} px JPEGs, rows per shard {results['rows_per_shard']}")
    keys = ["expected", "rows", "unique_paths", "error_rows", "killed_after_rows", "redone_after_kill",
            "redone_share", "plain_loop_images_per_s", "steady_images_per_s", "vs_plain_loop",
            "resume_to_first_line_s", "resumed_wall_s", "killed_run_wall_s", "shards", "driver_peak_rss_mb",
            "driver_peak_rss_mb_tenth", "rss_ratio"]
    names = list(results["inputs"])
    print(f"{'':<26}" + "".join(f"{n:>14}" for n in names))
    for key in keys:
        print(f"{key:<26}" + "".join(f"{results['inputs'][n][key]!s:>14}" for n in names))


if __name__ == "__main__":
    main()
