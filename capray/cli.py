"""The ``capray`` command: one parser per subcommand, shared with the job files in ``jobs/``.

Exit codes: 0 done; 2 bad usage or configuration (one line on stderr, before heavy work); 1 anything
unexpected (one line on stderr; ``CAPRAY_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

log = logging.getLogger("capray")


def _synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="where the images and manifest.jsonl go (path or s3://)")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="pixels (square)")


def _encoder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default="inception_v3",
                   help="torchvision classification model name, or efficientnet_lite0 (default: inception_v3)")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | URI of a state dict (default: imagenet)")
    p.add_argument("--image-size", type=int, default=0, help="input size in px (default: the encoder's own)")
    p.add_argument("--encoder-layer", default="", help="node giving the regions (default: last conv stage)")


def _actor_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--actors", type=int, default=0,
                   help=f"a fixed number of {what} actors (default 0: a pool that scales with the work and the "
                        "nodes that join; on a local machine one per GPU, else 1)")
    p.add_argument("--max-actors", type=int, default=0, help="most actors a scaling pool grows to (default 0: no limit)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=0.0,
                   help="CPUs (and torch threads) per actor (default: 1 on a cluster, the spare cores locally)")
    _wait_flag(p)


def _wait_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-timeout", type=float, default=600.0,
                   help="seconds to wait for the cluster to start the nodes the job needs (default 600)")


def _prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, action="append",
                   help="COCO captions JSON, Karpathy split JSON or JSONL manifest; repeat for several files")
    p.add_argument("--images", action="append", default=[],
                   help="root of relative image paths (default: the annotations' folder); repeat to pair with "
                        "each --annotations in order")
    p.add_argument("--out", required=True, help="feature dataset location (path or s3://)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="share of val images moved to a test split, by a hash of the image id (default 0)")
    _encoder_flags(p)
    p.add_argument("--vocab-size", type=int, default=5000)
    p.add_argument("--min-word-count", type=int, default=1)
    _actor_flags(p, "encoder")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder forward pass")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits to prepare")


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="feature dataset written by capray prepare")
    p.add_argument("--out", required=True, help="where runs are stored (path or s3://)")
    p.add_argument("--name", default="capray", help="run name; the same --out/--name resumes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, mixed precision")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="images per worker per step")
    p.add_argument("--lr", type=float, default=1e-3, dest="learning_rate")
    p.add_argument("--decoder", choices=("gru", "lstm"), default="gru")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--attention-dim", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attention-weight", type=float, default=1.0, help="doubly stochastic attention λ")
    p.add_argument("--captions-per-image", type=int, default=0,
                   help="captions sampled per image per epoch (default 0: all)")
    p.add_argument("--val-images", type=int, default=500, help="val images decoded per epoch for BLEU-4")
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.0,
                   help="CPUs (and torch threads) per worker (default: 1 on a cluster, a share locally)")
    _wait_flag(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inject-fault", default="", help=argparse.SUPPRESS)  # tests: RANK:STEP


def _caption(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="s3:// prefix, local folder (recursive) or a manifest")
    p.add_argument("--output", required=True, help="where the Parquet shards and summary.json go")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or training run directory")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    _actor_flags(p, "captioner")
    p.add_argument("--extensions", default="jpg,jpeg,png,webp,bmp,gif,tif,tiff")
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--overwrite", action="store_true", help="start over instead of skipping done images")
    p.add_argument("--retry-errors", action="store_true",
                   help="caption again the images that have error rows in --output (their rows are replaced)")


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--out", required=True, help="folder for metrics.json and results.json")


def _attend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--beam-size", type=int, default=3)


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo-output")
    p.add_argument("--num-images", type=int, default=0, help="shapes-world size (default: the demo preset's)")
    p.add_argument("--epochs", type=int, default=0, help="training epochs (default: the demo preset's)")


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "synth": (_synth, "generate the shapes world: a captioned dataset with ground truth"),
    "prepare": (_prepare, "encode captioned images once into a sharded Parquet feature dataset"),
    "train": (_train, "train the attention decoder data-parallel with Ray Train"),
    "caption": (_caption, "caption a bucket or folder of images into Parquet"),
    "evaluate": (_evaluate, "COCO metrics (BLEU, ROUGE-L, CIDEr-D) on a split"),
    "attend": (_attend, "plot the attention map of every generated word"),
    "demo": (_demo, "the whole pipeline on a generated dataset, local Ray, local folders"),
}


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of one subcommand (for ``jobs/*.py``), or of the whole ``capray`` command."""
    if command is not None:
        add, help_text = COMMANDS[command]
        p = argparse.ArgumentParser(prog=f"capray {command}", description=help_text)
        add(p)
        return p
    p = argparse.ArgumentParser(prog="capray", description="Distributed image captioning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (add, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return p


def run(command: str, args: argparse.Namespace) -> int:
    """Run a parsed subcommand with the exit-code contract; used by ``main`` and the job files."""
    setup_logging()
    try:
        _dispatch(command, args)
    except KeyboardInterrupt:
        print(f"capray {command}: interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:  # every user or configuration error in capray is a ValueError
        if _is_ray_error(exc):  # a failure inside a Ray task (Ray re-raises it as a ValueError subclass)
            return _unexpected(command, exc)
        print(f"capray {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _unexpected(command, exc)
    return 0


def _unexpected(command: str, exc: BaseException) -> int:
    if os.environ.get("CAPRAY_DEBUG"):
        traceback.print_exc()
    print(f"capray {command}: failed: {type(exc).__name__}: {_one_line(exc)} "
          "(set CAPRAY_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


def _is_ray_error(exc: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(exc, ray_exceptions.RayError)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args.command, args)


def job_main(command: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<command>.py``: same flags as ``capray <command>``."""
    return run(command, parser(command).parse_args(argv))


def setup_logging() -> None:
    level = os.environ.get("CAPRAY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # botocore: "Found credentials in environment variables" per client; matplotlib: its font cache, once.
    for chatty in ("botocore", "boto3", "urllib3", "matplotlib"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


def _dispatch(command: str, args: argparse.Namespace) -> None:
    values = {k: v for k, v in vars(args).items() if k != "command"}
    if command == "synth":
        from capray.synth import SynthConfig, generate

        manifest = generate(args.out, SynthConfig(num_images=args.num_images, seed=args.seed,
                                                  image_size=args.image_size))
        print(f"wrote {args.num_images} images; manifest: {manifest}")
    elif command == "prepare":
        from capray.features import PrepareConfig, prepare, print_summary

        print_summary(prepare(PrepareConfig.from_flags(**values)))
    elif command == "train":
        from capray.training import TrainConfig, print_summary, train

        print_summary(train(TrainConfig(**values)))
    elif command == "caption":
        from capray.captioning import CaptionConfig, caption, print_summary

        summary = caption(CaptionConfig.from_flags(**values))
        print_summary(summary)
        if summary.retryable:
            raise IncompleteRun(f"{summary.retryable} image(s) could not be read for a transient reason "
                                "(throttling, timeouts); run the same command again to caption them")
    elif command == "evaluate":
        from capray.evaluation import EvaluateConfig, evaluate, print_metrics

        print_metrics(evaluate(EvaluateConfig(**values)))
    elif command == "attend":
        from capray.evaluation import attend

        words = attend(args.checkpoint, args.image, args.out, beam_size=args.beam_size)
        print(f"{' '.join(words)}\nattention plot: {args.out}")
    elif command == "demo":
        from capray.demo import run_demo

        run_demo(args.workdir, num_images=args.num_images, epochs=args.epochs)


class IncompleteRun(Exception):
    """A run that did what it could but left work that running it again will do (exit 1)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
