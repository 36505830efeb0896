"""``capray demo``: the whole pipeline on the embedded default — local Ray, local folders, the shapes world.

synth → prepare (encoder actor pool) → train (2 Ray Train workers) → caption a folder of held-out
images into Parquet → evaluate → attention plots. Everything lands under the work directory.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

from capray import storage
from capray.encoders import EncoderSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPreset:
    num_images: int = 2500
    """Shapes-world images (80/10/10 train/val/test)."""
    image_size: int = 128
    """Pixels; EfficientNet-Lite0's stride-16 stage then gives 8×8 regions."""
    layer: str = "blocks.7+blocks.10"
    """Both ends of that stage, 80 + 112 channels per region: block 7 keeps the colours that block 10
    loses, and with both the held-out object accuracy is higher at the same BLEU-4 (docs/demo.md)."""
    epochs: int = 30
    """Training epochs, the learning rate cosine-decayed over them (val loss is flat from about epoch 30)."""
    workers: int = 2
    """Ray Train workers."""
    seed: int = 0
    """Seed of the generated dataset and of training."""


def demo_preset() -> DemoPreset:
    """Sized to finish in under 5 minutes on 2 CPU cores, with held-out object accuracy ≥ 0.99 in most
    runs and BLEU-4 about 0.93 (measured runs: docs/benchmarks.md; the README's "What holds BLEU-4 back")."""
    return DemoPreset()


def demo_encoder(preset: DemoPreset) -> EncoderSpec:
    """The one encoder with real ImageNet weights offline; random frozen encoders cannot do this task."""
    return EncoderSpec(name="efficientnet_lite0", weights="imagenet", image_size=preset.image_size, layer=preset.layer)


def run_demo(workdir: str, *, num_images: int = 0, epochs: int = 0) -> dict:
    from capray.captioning import CaptionConfig, caption
    from capray.config import ActorPool
    from capray.connect import ensure_ray
    from capray.evaluation import EvaluateConfig, attend, evaluate
    from capray.features import PrepareConfig, prepare
    from capray.gallery import GalleryConfig, make_gallery
    from capray.synth import SynthConfig, generate
    from capray.training import TrainConfig, train

    preset = demo_preset()
    preset = replace(preset, num_images=num_images or preset.num_images, epochs=epochs or preset.epochs)
    workdir = os.path.abspath(workdir)
    paths = {name: os.path.join(workdir, name) for name in
             ("shapes", "features", "runs", "captions", "attention")}
    for name in ("features", "runs", "captions", "attention"):  # a demo run starts from scratch
        storage.delete_dir(paths[name])
    times: dict[str, float] = {}

    def stage(name: str):
        print(f"\n=== {name} ===", flush=True)
        return time.perf_counter()

    started = time.perf_counter()
    t = stage(f"1/6 synth: {preset.num_images} shapes-world images at {preset.image_size} px")
    manifest = generate(paths["shapes"], SynthConfig(num_images=preset.num_images, seed=preset.seed,
                                                     image_size=preset.image_size))
    times["synth"] = time.perf_counter() - t

    ensure_ray(dashboard=True)  # the demo trains: see ensure_ray
    t = stage("2/6 prepare: EfficientNet-Lite0 (ImageNet weights) features, 2 encoder actors")
    prepared = prepare(PrepareConfig(annotations=manifest, out=paths["features"], encoder=demo_encoder(preset),
                                     pool=ActorPool(actors=2), batch_size=64))
    times["prepare"] = time.perf_counter() - t

    t = stage(f"3/6 train: {preset.workers} Ray Train workers, {preset.epochs} epochs")
    trained = train(TrainConfig(features=paths["features"], out=paths["runs"], name="demo", workers=preset.workers,
                                epochs=preset.epochs, batch_size=32, learning_rate=1e-2, embed_dim=128,
                                hidden_dim=256, projection_dim=128, attention_dim=128, attention_weight=0.01,
                                captions_per_image=2, val_images=250, val_every=5, seed=preset.seed))
    times["train"] = time.perf_counter() - t
    run_dir = trained["run"]

    t = stage("4/6 caption: the held-out test images, folder → Parquet")
    captioned = caption(CaptionConfig(input=os.path.join(paths["shapes"], "images", "test"),
                                      out=paths["captions"], checkpoint=run_dir, beam_size=3, batch_size=32))
    gallery = make_gallery(GalleryConfig(captions=paths["captions"], out=os.path.join(workdir, "gallery.html"),
                                         references=paths["features"]))
    print(f"gallery of the captions (lowest confidence first, with the references): {gallery.out}", flush=True)
    times["caption"] = time.perf_counter() - t

    t = stage("5/6 evaluate: test split, beam 3")
    metrics = evaluate(EvaluateConfig(checkpoint=run_dir, features=paths["features"], out=workdir, beam_size=3))
    times["evaluate"] = time.perf_counter() - t

    t = stage("6/6 attend: attention maps per word")
    test_images = sorted(storage.list_files(os.path.join(paths["shapes"], "images", "test"), extensions=("png",)))
    plots = []
    for image in test_images[:3]:
        out = os.path.join(paths["attention"], storage.basename(image))
        attend(run_dir, image, out)
        plots.append(out)
    times["attend"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - started

    _print_report(preset=preset, prepared=prepared, trained=trained, captioned=captioned, metrics=metrics,
                  times=times, paths=paths, workdir=workdir, plots=plots)
    return {"metrics": metrics, "times": times}


def _print_report(*, preset, prepared, trained, captioned, metrics, times, paths, workdir, plots) -> None:
    import pyarrow.parquet as pq

    from capray.plots import CURVES_FILE
    from capray.runlog import METRICS_LOG

    print("\n=== capray demo: summary ===")
    print("stage times (s): " + "  ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"prepare: {prepared['num_images']} images at {prepared['images_per_s']:.1f} images/s "
          f"({prepared['num_regions']} regions × {prepared['num_features']} channels)")
    print(f"train: best val BLEU-4 {trained['best_val_bleu4']:.3f} after {preset.epochs} epochs")
    print(f"caption: {captioned.ok} ok, {captioned.errors} errors at {captioned.images_per_s:.1f} images/s")
    print("\nheld-out test split (beam 3):")
    names = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider", "object_accuracy")
    print("  " + "  ".join(f"{n} {metrics[n]:.3f}" for n in names if n in metrics))
    if "attention_grounding" in metrics:
        from capray.evaluation import grounding_line

        print("  " + grounding_line(metrics))
    print("\nsample captions (generated  |  a reference):")
    for example in metrics["examples"]:
        print(f"  {example['caption']:<48}|  {example['references'][0]}")
    shard = next(iter(sorted(storage.list_files(paths["captions"], extensions=("parquet",)))), None)
    if shard:
        rows = pq.read_table(shard).slice(0, 3).to_pylist()
        print("\ncaption Parquet rows:")
        for row in rows:
            print(f"  {os.path.relpath(row['path'], workdir)}: {row['caption']!r} (score {row['score']:.2f})")
    print("\noutputs:")
    print(f"  metrics      {os.path.join(workdir, 'metrics.json')}")
    print(f"  captions     {paths['captions']}/*.parquet")
    print(f"  gallery      {os.path.join(workdir, 'gallery.html')} (open in a browser: captions on their images)")
    print(f"  checkpoints  {trained['run']}")
    print(f"  curves       {os.path.join(trained['run'], CURVES_FILE)} (per-epoch lines: {METRICS_LOG} beside it)")
    print(f"  attention    {', '.join(os.path.relpath(p, workdir) for p in plots)} (under {workdir})")
