"""`capray gallery` as a Ray job; same flags as the subcommand (`--help` lists them).

    ray job submit --working-dir . -- python jobs/gallery.py \\
      --captions s3://my-bucket/capray/captions --out s3://my-bucket/capray/gallery.html --sample 100
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when capray is not installed

from capray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(job_main("gallery"))
