"""Driver memory of ``capray caption``'s listing and resume filter vs the number of files (a table, not a test).

    .venv/bin/python bench/listing_memory.py [--sizes 250000,1000000] [--dir /tmp] [--json out.json]

A local folder of N empty ``.jpg`` files (in subfolders of ``FILES_PER_FOLDER``) is listed and
resume-filtered the way ``capray caption`` does it in its driver, with capray.captioning's own
functions: ``input_paths(folder, "prefix", extensions)`` streamed into ``write_listing(paths, done,
listing_dir, group_rows=...)``, where ``done`` holds the sorted digests of half of the files (as if a
killed run had captioned them). Each N runs in a fresh Python process, so its peak RSS
(``ru_maxrss``) is that N's alone. The files are made in yet another process: Linux carries a
parent's peak RSS over into its child's ``ru_maxrss`` (measured: the child of a parent that once
held 300 MB reports 313 MB), so the process that starts the measurements stays small. The folders
of the smaller sizes nest inside the largest one, so only max(N) files are created.

The same files are also named in a JSONL manifest and read the way ``capray caption --input
manifest.jsonl`` reads it: line by line (a COCO or Karpathy JSON file is one document and is parsed
whole). A streamed listing keeps the peak flat: the target is peak(largest N) / peak(smallest N) ≤ 1.2
(a listing held whole cost the driver 216 MB per million S3 objects).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# Nothing heavy is imported at the top: this process starts the measured ones (see above).

FILES_PER_FOLDER = 10_000  # files per leaf folder: a bucket's "date=.../" prefixes, roughly
DIGEST_CHUNK = 65_536  # paths digested at a time while building ``done`` (as _finished_paths does per shard)
TARGET_RATIO = 1.2
KINDS = ("prefix", "manifest")  # a folder listed with os.scandir; a JSONL manifest read line by line

MAKE = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from listing_memory import make_tree
print(json.dumps(make_tree(*json.loads(sys.argv[1]))))
"""
MEASURE = """
import json, resource, sys, time
import numpy as np
from capray.captioning import CaptionConfig, _decode_rows
from capray.listing import input_paths, write_listing

args = json.loads(sys.argv[1])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done = np.load(args["done"])
started = time.perf_counter()
paths = input_paths(args["input"], args["kind"], ("jpg",))
group_rows = _decode_rows(CaptionConfig.batch_size, CaptionConfig.rows_per_shard)
total, skipped, units = write_listing(paths, done, args["listing"], group_rows=group_rows,
                                       dedupe=args["kind"] != "prefix")  # as caption() calls it
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({"total": total, "skipped": skipped, "units": len(units), "seconds": seconds,
                  "baseline_rss_mb": baseline / 1024, "peak_rss_mb": peak / 1024,
                  "vm_hwm_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="250000,1000000", help="comma-separated numbers of files")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the (deleted afterwards) folder goes")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 2:
        raise SystemExit("--sizes must name at least one size of 2 files or more")

    workdir = tempfile.mkdtemp(prefix="capray-listing-", dir=args.dir)
    try:
        started = time.perf_counter()
        out = _run(MAKE, [os.path.join(workdir, "data"), sizes])
        created_s = time.perf_counter() - started
        rows = [measure(size, kind, *out[str(size)], os.path.join(workdir, f"listing-{kind}-{size}"))
                for kind in KINDS for size in sizes]
    finally:
        shutil.rmtree(workdir)
    ratios = {kind: round(_peak(rows, kind, sizes[-1]) / _peak(rows, kind, sizes[0]), 3) for kind in KINDS}
    results = {"sizes": sizes, "dir": args.dir, "create_seconds": round(created_s, 1), "runs": rows,
               "peak_rss_ratio": max(ratios.values()), "peak_rss_ratios": ratios}
    print_table(results)
    if args.json:
        from capray import storage

        storage.write_json(args.json, results)
        print(f"wrote {args.json}")


def make_tree(root: str, sizes: list[int]) -> dict[int, tuple[str, str, int, str]]:
    """Create max(sizes) empty files so that the folder for each size holds exactly that many.

    The folder of size k is ``root/smaller/…/smaller`` (one level per larger size). Returns, per size,
    its folder, an ``.npy`` file of the sorted digests of every second file under it, their number, and
    a JSONL manifest naming the same files (one ``{"image": ...}`` per line).
    """
    import numpy as np

    from capray.listing import digests_of

    folders: dict[int, str] = {}
    folder, halves, number = root, [], 0
    for index in reversed(range(len(sizes))):  # the largest size first: its folder is ``root``
        folders[sizes[index]] = folder
        for i in range(sizes[index] - (sizes[index - 1] if index else 0)):
            leaf = os.path.join(folder, f"part-{i // FILES_PER_FOLDER:05d}")
            if i % FILES_PER_FOLDER == 0:
                os.makedirs(leaf)
            path = os.path.join(leaf, f"img-{number:08d}.jpg")
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            if number % 2 == 0:
                halves.append(path)
            number += 1
        folder = os.path.join(folder, "smaller")
    made = {}
    for size in sizes:  # a smaller size's files are all under the larger sizes' folders too
        prefix = folders[size] + os.sep
        mine = [p for p in halves if p.startswith(prefix)]
        done = np.concatenate([digests_of(mine[i:i + DIGEST_CHUNK]) for i in range(0, len(mine), DIGEST_CHUNK)]
                              or [np.empty(0, dtype="S16")])
        done.sort()
        manifest = os.path.join(os.path.dirname(root), f"manifest-{size}.jsonl")
        with open(manifest, "w") as f:
            for folder_path, _, names in os.walk(folders[size]):
                f.writelines(json.dumps({"image": os.path.join(folder_path, n)}) + "\n" for n in names)
        made[size] = (folders[size], os.path.join(os.path.dirname(root), f"done-{size}.npy"), len(done), manifest)
        np.save(made[size][1], done)
    return made


def _peak(rows: list[dict], kind: str, size: int) -> float:
    return next(r["peak_rss_mb"] for r in rows if r["kind"] == kind and r["size"] == size)


def measure(size: int, kind: str, folder: str, done: str, num_done: int, manifest: str, listing: str) -> dict:
    """List (the folder, or the manifest naming its files) and resume-filter in a fresh process."""
    source = {"prefix": folder, "manifest": manifest}[kind]
    run = _run(MEASURE, {"input": source, "kind": kind, "done": done, "listing": listing})
    if run["total"] != size or run["skipped"] != num_done:
        raise SystemExit(f"{size} files: listed {run['total']}, skipped {run['skipped']} of {num_done}: wrong")
    run["size"], run["kind"] = size, kind
    run["files_per_s"] = size / run["seconds"]
    run["listing_mb"] = run["peak_rss_mb"] - run["baseline_rss_mb"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}


def _run(code: str, args) -> dict:
    """Run ``code`` in a fresh Python with ``args`` as JSON; the JSON it prints last."""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(r: dict) -> None:
    print(f"capray caption's driver-side listing + resume filter of a local folder ({r['dir']}) and of a "
          f"JSONL manifest of the same files, half of them already done; {max(r['sizes']):,} files created in "
          f"{r['create_seconds']:.0f} s")
    header = ("input", "files", "list+filter s", "files/s", "listing units", "RSS after imports MB", "peak RSS MB",
              "peak - imports MB")
    rows = [(x["kind"], f"{x['size']:,}", f"{x['seconds']:.1f}", f"{x['files_per_s']:,.0f}", f"{x['units']:,}",
             f"{x['baseline_rss_mb']:.0f}", f"{x['peak_rss_mb']:.0f}", f"{x['listing_mb']:.0f}") for x in r["runs"]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    for kind, ratio in r["peak_rss_ratios"].items():
        print(f"peak RSS ratio {r['sizes'][-1]:,} / {r['sizes'][0]:,} files, {kind}: {ratio:.2f} "
              f"(target ≤ {TARGET_RATIO})")


if __name__ == "__main__":
    main()
