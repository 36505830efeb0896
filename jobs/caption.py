"""Caption a bucket, folder or manifest of images into Parquet (same flags as ``capray caption``).

Submit to a running cluster from the repository root::

    ray job submit --working-dir . -- python jobs/caption.py \
        --input s3://my-bucket/photos/ --out s3://my-bucket/captions/ \
        --checkpoint s3://my-bucket/runs/capray --gpus-per-actor 1 --batch-size 64

Re-running with the same ``--out`` captions only the images that are not there yet;
``--overwrite`` starts over. Exit codes: 0 done, 2 bad configuration (one line on stderr), 1 failure.
"""
from capray.cli import job_main

if __name__ == "__main__":
    raise SystemExit(job_main("caption"))
