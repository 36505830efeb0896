"""The GPU check: capray's GPU path measured on one node, in one command (a benchmark, not a test).

    make gpu-check      # python bench/gpu_check.py --json bench-output/gpu_check.json

Every measurement goes through the classes the jobs use (``EncoderStage``, ``Decoder.beam_search``,
``Captioner``, ``prepare``, ``train``, ``caption``, ``evaluate``), not copies. On a machine without a
GPU it says so and runs the same sections at small sizes (``--quick`` is then implied), so the script
itself is checked on CPU; no GPU number comes from such a run. Sections (one table at the end, and
``--json``):

1. encoder images/s: InceptionV3 at 299 px (the seed's encoder) and EfficientNet-Lite0 at 224 px,
   random weights (speed does not depend on them), batch 64/128/256, in the precision of
   ``capray.precision`` (bf16 from compute capability 8.0, fp16 before, fp32 on CPU), channels-last;
2. beam search (beam 3, max 20 words, the seed's decoder: 5,000 words, GRU 512, attention 512 over
   64 regions × 2048 channels, random weights so no caption ends early): a batch vs one image at a time;
3. JPEG decode + resize to 299 px: one CPU core (a 640×480 photo), the cores one GPU's model stage
   keeps busy, and ``torchvision.io.decode_jpeg(..., device="cuda")`` on batches;
4. the shapes world through Ray on this node: prepare (encoder actor on the GPU) → train (1 GPU worker)
   → caption (one captioner per GPU) end to end, images/s per GPU in steady state, against the
   ``Captioner`` alone on decoded batches; caption's text vs evaluate's for every test image of the
   checkpoint; the captioner's text and scores on CPU vs on the GPU;
5. ``capray train`` (1 worker, the GPU) at the seed's decoder sizes on generated 64 × 2048 features.

Sections 4 and 5 need Ray (on an air-gapped GPU node: ``make bundle``, see the README).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from capray import storage  # noqa: E402
from capray.encoders import EncoderSpec, build_encoder  # noqa: E402
from capray.images import decode_image  # noqa: E402
from capray.model import Decoder, DecoderConfig  # noqa: E402
from capray.precision import EncoderStage, autocast_dtype  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    encoder_batches: tuple[int, ...]
    timed_batches: int
    beam_batch: int
    single_images: int
    shapes_images: int
    shapes_epochs: int
    seed_images: int
    seed_epochs: int


GPU = Sizes(encoder_batches=(64, 128, 256), timed_batches=6, beam_batch=128, single_images=16, shapes_images=3000,
            shapes_epochs=6, seed_images=4096, seed_epochs=3)
CPU = Sizes(encoder_batches=(4, 8), timed_batches=1, beam_batch=8, single_images=2, shapes_images=160,
            shapes_epochs=2, seed_images=96, seed_epochs=2)
SEED_DECODER = dict(embed_dim=256, hidden_dim=512, projection_dim=256, attention_dim=512)
SEED_REGIONS, SEED_CHANNELS, SEED_VOCAB = 64, 2048, 5000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (implied without a GPU)")
    p.add_argument("--skip", default="", help="sections to leave out, by number (e.g. 4,5)")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default="", help="write the results here too (after every section)")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="start no section after this many seconds (0: none); a lent GPU's call has a time limit")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = GPU if cuda and not args.quick else CPU
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    workdir = args.workdir or tempfile.mkdtemp(prefix="capray-gpu-check-")
    threads = max(1, min(8, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    results: dict = {"node": node(device), "sizes": "gpu" if sizes is GPU else "cpu (quick)"}
    if not cuda:
        print("gpu-check: no GPU here: running every section at CPU sizes; no GPU number comes from this run")
    sections = [("1", "encoder", lambda: encoder_rates(device, sizes, threads)),
                ("2", "beam_search", lambda: beam_rates(device, sizes)),
                ("3", "decode", lambda: decode_rates(device, results)),
                ("4", "shapes_on_ray", lambda: shapes_on_ray(cuda, sizes, workdir)),
                ("5", "seed_training", lambda: seed_training(cuda, sizes, workdir))]
    for number, name, run in sections:
        if number in skip:
            continue
        if args.deadline_s and time.perf_counter() - started > args.deadline_s:
            results[name] = {"error": f"not run: past --deadline-s {args.deadline_s:g}"}
            continue
        t0 = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # a section that cannot run says why; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"gpu-check: section {number} ({name}) done in {results[name]['seconds']} s", flush=True)
        if args.json:  # what is measured survives a call cut short
            storage.write_json(args.json, results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print_table(results)
    if args.json:
        storage.write_json(args.json, results)
        print(f"wrote {args.json}")


def node(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cpus": os.cpu_count(), "device": device.type}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    dtype = autocast_dtype(device)
    info["encoder_precision"] = str(dtype).replace("torch.", "") if dtype else "float32"
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, repeats: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call (kernels are picked per shape on the first)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


# --- 1. encoder ------------------------------------------------------------------------------------

def encoder_rates(device: torch.device, sizes: Sizes, threads: int) -> dict:
    out = {}
    for name, size in (("inception_v3", 299), ("efficientnet_lite0", 224)):
        stage = EncoderStage(build_encoder(EncoderSpec(name, "none", size)), device, threads=threads)
        for batch in sizes.encoder_batches:
            pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            seconds = timed(device, lambda: stage(pixels), sizes.timed_batches)
            out[f"{name}@{size} b{batch}"] = round(batch / seconds, 1)
    return out


# --- 2. beam search --------------------------------------------------------------------------------

def seed_decoder(device: torch.device) -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=SEED_VOCAB, feature_dim=SEED_CHANNELS, **SEED_DECODER)
    return Decoder(config).to(device).eval()


def beam_rates(device: torch.device, sizes: Sizes) -> dict:
    decoder = seed_decoder(device)
    features = torch.randn(sizes.beam_batch, SEED_REGIONS, SEED_CHANNELS, device=device)

    def search(x):
        with torch.inference_mode():
            return decoder.beam_search(x, beam_size=3, max_length=20)

    batched = sizes.beam_batch / timed(device, lambda: search(features), 2)
    k = sizes.single_images
    single = k / timed(device, lambda: [search(features[i:i + 1]) for i in range(k)], 1)
    return {"batch": sizes.beam_batch, "batched_images_per_s": round(batched, 1),
            "single_images_per_s": round(single, 1), "batched_vs_single": round(batched / single, 1)}


# --- 3. decode ---------------------------------------------------------------------------------------

def photo_jpeg() -> bytes:
    """A COCO-sized photo (640×480 JPEG, quality 90): the scikit-image astronaut, tiled."""
    from PIL import Image
    from skimage import data

    photo = np.tile(data.astronaut(), (1, 2, 1))[:480, :640]
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decode_rates(device: torch.device, results: dict) -> dict:
    jpeg = photo_jpeg()
    torch.set_num_threads(1)
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:  # capray's decode: PIL draft mode, EXIF, RGB, bilinear to 299
        decode_image(jpeg, 299)
        done += 1
    per_core = done / (time.perf_counter() - t0)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    out = {"cpu_images_per_s_per_core": round(per_core, 1)}
    encoder = results.get("encoder", {}).get("inception_v3@299 b128") or results.get("encoder", {}).get(
        "inception_v3@299 b8")
    beam = results.get("beam_search", {}).get("batched_images_per_s")
    if encoder and beam:  # the model stage: encoder, then beam search, one after the other
        model = 1.0 / (1.0 / encoder + 1.0 / beam)
        out["model_stage_images_per_s"] = round(model, 1)
        out["decode_cores_per_model_stage"] = round(model / per_core, 2)
    if device.type == "cuda":
        import torch.nn.functional as F
        import torchvision
        from torchvision.io import decode_jpeg

        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        batch = [data] * 128

        def gpu_decode():
            images = decode_jpeg(batch, device=device)
            return [F.interpolate(i[None].float(), size=(299, 299), mode="bilinear", antialias=True) for i in images]

        out["gpu_images_per_s"] = round(128 / timed(device, gpu_decode, 5), 1)
        out["torchvision"] = torchvision.__version__
    return out


# --- 4. the shapes world through Ray ---------------------------------------------------------------

def shapes_on_ray(cuda: bool, sizes: Sizes, workdir: str) -> dict:
    from capray.captioning import CaptionConfig, Captioner, caption
    from capray.config import ActorPool, PrepareConfig, SynthConfig, TrainConfig
    from capray.evaluation import EvaluateConfig, evaluate
    from capray.features import prepare
    from capray.connect import ensure_ray
    from capray.synth import generate
    from capray.training import train

    ensure_ray()
    gpus = 1.0 if cuda else 0.0
    root = os.path.join(workdir, "shapes")
    manifest = generate(root, SynthConfig(num_images=sizes.shapes_images, seed=7, image_size=128))
    weights = "imagenet"
    try:
        build_encoder(EncoderSpec("efficientnet_lite0", "imagenet", 128))
    except Exception:  # the weights package is not installed: random weights still measure the path
        weights = "none"
    features = os.path.join(workdir, "shapes-features")
    t0 = time.perf_counter()
    encoder = EncoderSpec("efficientnet_lite0", weights, 128, layer="blocks.7+blocks.10")  # the demo's
    prepared = prepare(PrepareConfig(annotations=(manifest,), out=features, pool=ActorPool(gpus_per_actor=gpus),
                                     batch_size=128,
                                     encoder=encoder))
    prepare_s = time.perf_counter() - t0
    runs = os.path.join(workdir, "runs")
    t0 = time.perf_counter()
    train(TrainConfig(features=features, out=runs, name="shapes", workers=1, gpus_per_worker=gpus,
                      epochs=sizes.shapes_epochs, batch_size=64, learning_rate=4e-3, embed_dim=128, hidden_dim=256,
                      projection_dim=128, attention_dim=128, val_every=sizes.shapes_epochs))
    train_s = time.perf_counter() - t0
    checkpoint = os.path.join(runs, "shapes")

    out_dir = os.path.join(workdir, "captions")
    batch = 128 if cuda else 16  # shards of two batches: enough of them to time the steady state
    summary = caption(CaptionConfig(input=os.path.join(root, "images"), out=out_dir, checkpoint=checkpoint,
                                    pool=ActorPool(gpus_per_actor=gpus), batch_size=batch, rows_per_shard=2 * batch))
    steady = steady_rate(out_dir)

    # The captioner alone on decoded batches, as an actor holds it.
    paths = sorted(storage.list_files(os.path.join(root, "images", "test"), extensions=("png",)))
    pixels = np.stack([decode_image(storage.read_bytes(p), 128)[0] for p in paths])
    threads = max(1, min(8, os.cpu_count() or 1))
    gpu_captioner = Captioner(checkpoint, beam_size=3, max_length=20, threads=threads, use_gpu=cuda,
                              warmup_batch=128)
    stage_images = np.concatenate([pixels] * max(1, 1024 // len(pixels)))[:1024 if cuda else 64]
    t0 = time.perf_counter()
    for start in range(0, len(stage_images), 128):
        gpu_captioner.caption(stage_images[start:start + 128])
    stage_rate = len(stage_images) / (time.perf_counter() - t0)

    agreement = {}
    texts, scores = caption_batches(gpu_captioner, pixels)
    if cuda:  # the same images and checkpoint on the CPU
        cpu_texts, cpu_scores = caption_batches(Captioner(checkpoint, beam_size=3, max_length=20, threads=threads,
                                                          use_gpu=False), pixels)
        agreement["cpu_vs_gpu_identical"] = f"{sum(a == b for a, b in zip(texts, cpu_texts))}/{len(texts)}"
        agreement["cpu_vs_gpu_max_score_diff"] = float(np.max(np.abs(scores - cpu_scores)))
    metrics = evaluate(EvaluateConfig(checkpoint=checkpoint, features=features, out=os.path.join(workdir, "eval")))
    evaluated = {r["image_id"]: r["caption"] for r in storage.read_json(os.path.join(workdir, "eval", "results.json"))}
    images = feature_images(features, "test")
    captioned = caption_texts(out_dir)
    same = sum(captioned.get(images[i]) == text for i, text in evaluated.items())
    agreement["caption_vs_evaluate_identical"] = f"{same}/{len(evaluated)}"
    return {"images": sizes.shapes_images, "encoder_weights": weights, "prepare_s": round(prepare_s, 1),
            "prepare_images_per_s": prepared["images_per_s"], "train_s": round(train_s, 1),
            "caption_e2e_images_per_s": round(steady, 1), "caption_cold_images_per_s": summary.images_per_s,
            "captioner_stage_images_per_s": round(stage_rate, 1), "e2e_vs_stage": round(steady / stage_rate, 2),
            "test_bleu4": round(metrics["bleu4"], 3), **agreement}


def caption_batches(captioner, pixels: np.ndarray) -> tuple[list[str], np.ndarray]:
    texts, scores = [], []
    for start in range(0, len(pixels), 128):
        t, s = captioner.caption(pixels[start:start + 128])
        texts += t
        scores.append(s)
    return texts, np.concatenate(scores)


def steady_rate(output: str) -> float:
    """Rows written between the first and the last caption shard over the time between them."""
    import pyarrow.parquet as pq

    shards = sorted((os.path.getmtime(os.path.join(output, f)), f) for f in os.listdir(output)
                    if f.startswith("part-") and f.endswith(".parquet"))
    if len(shards) < 3:
        return float("nan")
    rows = [pq.ParquetFile(os.path.join(output, f)).metadata.num_rows for _, f in shards]
    return sum(rows[1:]) / (shards[-1][0] - shards[0][0])


def feature_images(features: str, split: str) -> dict[str, str]:
    import pyarrow.dataset as pads

    table = pads.dataset(os.path.join(features, split), format="parquet").to_table(columns=["image_id", "image"])
    return dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))


def caption_texts(output: str) -> dict[str, str]:
    import pyarrow.dataset as pads

    files = [os.path.join(output, f) for f in os.listdir(output) if f.startswith("part-")]
    table = pads.dataset(files, format="parquet").to_table(columns=["path", "caption"])
    return dict(zip(table["path"].to_pylist(), table["caption"].to_pylist()))


# --- 5. capray train at the seed's sizes -------------------------------------------------------------

def seed_training(cuda: bool, sizes: Sizes, workdir: str) -> dict:
    from capray.config import TrainConfig
    from capray.connect import ensure_ray
    from capray.runlog import read_metrics
    from capray.training import train

    ensure_ray()
    features = os.path.join(workdir, "seed-features")
    write_seed_features(features, sizes.seed_images)
    runs = os.path.join(workdir, "runs")
    train(TrainConfig(features=features, out=runs, name="seed", workers=1, gpus_per_worker=1.0 if cuda else 0.0,
                      epochs=sizes.seed_epochs, batch_size=64, positions="none",
                      val_every=sizes.seed_epochs, val_images=64, attention_images=0, **SEED_DECODER))
    rates = [m["train_images_per_s"] for m in read_metrics(os.path.join(runs, "seed"))[1:]]
    return {"images": sizes.seed_images, "epochs": sizes.seed_epochs,
            "samples_per_s": round(statistics.median(rates), 1) if rates else None}


def write_seed_features(out: str, num_images: int) -> None:
    """A feature dataset as prepare writes it, of random 64 × 2048 features and 5 random captions of
    ~12 words each over 5,000 words: the seed's shapes, made in seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capray.formats import ENCODER_STATE_FILE, PREPARE_FILE, VOCAB_FILE, feature_schema
    from capray.vocab import SPECIALS, Vocabulary

    vocab = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(SEED_VOCAB - len(SPECIALS))])
    rng = np.random.default_rng(0)
    counts = {"train": num_images, "val": 64}
    for split, n in counts.items():
        for part, start in enumerate(range(0, n, 1024)):
            rows = min(1024, n - start)
            features = rng.standard_normal((rows, SEED_REGIONS, SEED_CHANNELS), dtype=np.float32).astype(np.float16)
            tokens = [[[vocab.start_id, *rng.integers(4, len(vocab), 11).tolist(), vocab.end_id] for _ in range(5)]
                      for _ in range(rows)]
            captions = [[vocab.decode(t) for t in image] for image in tokens]
            ids = [f"{split}-{start + i}" for i in range(rows)]
            table = pa.table({"image_id": ids, "image": ids,
                              "features": pa.FixedShapeTensorArray.from_numpy_ndarray(features),
                              "captions": captions, "tokens": tokens},
                             schema=feature_schema(SEED_REGIONS, SEED_CHANNELS))
            os.makedirs(os.path.join(out, split), exist_ok=True)
            pq.write_table(table, os.path.join(out, split, f"part-{part:05d}.parquet"))
    encoder = build_encoder(EncoderSpec("inception_v3", "none", 299))
    buffer = io.BytesIO()
    torch.save(encoder.state_dict(), buffer)
    storage.write_bytes(os.path.join(out, ENCODER_STATE_FILE), buffer.getvalue())
    vocab.save(os.path.join(out, VOCAB_FILE))
    storage.write_json(os.path.join(out, PREPARE_FILE), {
        "encoder": encoder.spec.to_dict(), "num_regions": SEED_REGIONS, "num_features": SEED_CHANNELS,
        "vocab_size": len(vocab), "splits": {s: {"images": n, "captions": 5 * n} for s, n in counts.items()},
        "num_images": sum(counts.values()), "num_errors": 0, "errors": []})


# --- the table --------------------------------------------------------------------------------------

def print_table(results: dict) -> None:
    n = results["node"]
    where = f"{n.get('gpu')} (capability {n.get('capability')})" if n["device"] == "cuda" else "CPU only"
    print(f"\ncapray gpu-check on {where}, {n['cpus']} CPUs, torch {n['torch']}, Ray {n['ray']}, "
          f"encoder in {n['encoder_precision']}; sizes: {results['sizes']}")
    for section, values in results.items():
        if not isinstance(values, dict) or section == "node":
            continue
        print(f"\n{section}")
        for key, value in values.items():
            print(f"  {key:<36}{json.dumps(value) if not isinstance(value, (int, float)) else value}")
    print(f"\ntotal {results['seconds']} s")


if __name__ == "__main__":
    main()
