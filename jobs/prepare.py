"""`capray prepare` as a Ray job; same flags as the subcommand (`--help` lists them).

    ray job submit --working-dir . -- python jobs/prepare.py \\
      --annotations s3://my-bucket/coco/captions_train2014.json --images s3://my-bucket/coco/train2014 \\
      --out s3://my-bucket/capray/features --encoder.name inception_v3 --encoder.weights imagenet --gpus-per-actor 1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when capray is not installed

from capray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(job_main("prepare"))
