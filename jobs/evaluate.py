"""`capray evaluate` as a Ray job; same flags as the subcommand (`--help` lists them).

    ray job submit --working-dir . -- python jobs/evaluate.py \\
      --checkpoint s3://my-bucket/capray/runs/coco --features s3://my-bucket/capray/features --out s3://my-bucket/capray/eval
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when capray is not installed

from capray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(job_main("evaluate"))
