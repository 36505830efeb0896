"""`capray train` as a Ray job; same flags as the subcommand (`--help` lists them).

    ray job submit --working-dir . -- python jobs/train.py \\
      --features s3://my-bucket/capray/features --out s3://my-bucket/capray/runs --name coco --workers 4 --gpus-per-worker 1

Running the same command again resumes the run from its latest checkpoint.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when capray is not installed

from capray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(job_main("train"))
