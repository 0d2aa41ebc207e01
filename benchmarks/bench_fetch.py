"""Fetch throughput against plain copies, and the fetch record at 200 k entries.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_fetch.py [--runs 5] [--copies 3]

Throughput: a moto S3 server in its own process on 127.0.0.1 holds ``--copies`` copies of
the tiny dataset (``jrc_tiny-<i>``, 471 objects each: raw chunks of ~200 kB, label
chunks and metadata of a few hundred bytes to kB). Three commands, each a fresh process as
a user would run it, copy exactly the same objects (the whole bucket) into an empty folder:

* project: ``cellmap-repro fetch`` of every crop with ``--fetch-all-em-resolutions`` and a
  context covering each volume (planning, record and checks included);
* s3fs: ``S3FileSystem(anon=True).get(bucket, recursive=True)``;
* boto3, 8 threads: list the bucket, then ``get_object`` each key streamed to its file;
* the project's fetch before issue 12 (``--old``, default 604a76f, exported from git), with
  ``--raw-padding`` covering each volume.

Runs are interleaved (method order rotates each round); medians of MB/s and objects/s,
and the project's ratio to each baseline, are printed. Every run's copy is checked
against the bucket's listing (same keys and sizes).

Record: a synthetic record of ``--entries`` objects; the old save (whole JSON rewritten
with fsync, as before) against the new one (one journal line per object), the cost of
loading and folding the record, and the per-object cost of deciding on a rerun that an
object is complete: the old MD5 of the local file against the new size/mtime check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
BUCKET = "janelia-cosem-datasets"

S3FS = """
import sys, s3fs
fs = s3fs.S3FileSystem(anon=True, client_kwargs={"endpoint_url": sys.argv[1]})
fs.get(sys.argv[2] + "/", sys.argv[3] + "/", recursive=True)
"""

BOTO3 = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import boto3
from botocore import UNSIGNED
from botocore.config import Config
endpoint, bucket, out = sys.argv[1:4]
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(signature_version=UNSIGNED, max_pool_connections=8))
keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
def one(key):
    target = Path(out) / key
    target.parent.mkdir(parents=True, exist_ok=True)
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with open(target, "wb") as handle:
        for block in body.iter_chunks(1 << 20):
            handle.write(block)
with ThreadPoolExecutor(8) as pool:
    list(pool.map(one, keys))
"""


def copied(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith(".cellmap-repro-fetch")}


def old_source(revision: str, scratch: Path) -> Path | None:
    """The project's ``src`` at ``revision``, or None without git history."""
    target = scratch / "old"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "src"], capture_output=True)
    if archive.returncode != 0:
        print(f"  (no old fetch: git archive {revision} failed)")
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def throughput(runs: int, copies: int, scratch: Path, old_revision: str | None) -> None:
    from cellmap_repro import tiny_crop
    from s3server import LocalS3

    source = tiny_crop.write_dataset(scratch / "source", seed=0)
    server = LocalS3(own_process=True).start()
    try:
        server.public_bucket(BUCKET)
        rows = ["crop_number,collection,alignment,crop_url,em_url"]
        for copy in range(1, copies + 1):
            dataset = f"jrc_tiny-{copy}"
            server.upload_tree(BUCKET, source, f"{dataset}/{dataset}.zarr")
            base = f"s3://{BUCKET}/{dataset}/{dataset}.zarr/recon-1"
            rows += [f"{100 * copy + crop},{dataset},recon-1,{base}/labels/groundtruth/crop{crop},{base}/em/fibsem-uint8" for crop in tiny_crop.CROPS]
        manifest = scratch / "manifest.csv"
        manifest.write_text("\n".join(rows) + "\n")
        listing = {o["Key"]: o["Size"] for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])}
        total_bytes = sum(listing.values())
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        project = [sys.executable, "-m", "cellmap_repro", "fetch", "--endpoint-url", server.endpoint, "--manifest", str(manifest), "--crops", ",".join(r.split(",")[0] for r in rows[1:]), "--fetch-all-em-resolutions", "--raw-context-nm", "5000"]
        methods = {
            "project": lambda out: project + ["--data", str(out)],
            "s3fs get(recursive=True)": lambda out: [sys.executable, "-c", S3FS, server.endpoint, BUCKET, str(out)],
            "boto3, 8 threads": lambda out: [sys.executable, "-c", BOTO3, server.endpoint, BUCKET, str(out)],
        }
        old_src = old_source(old_revision, scratch) if old_revision else None
        if old_src is not None:
            old = [sys.executable, "-m", "cellmap_repro", "fetch", "--endpoint-url", server.endpoint, "--manifest", str(manifest), "--crops", project[project.index("--crops") + 1], "--fetch-all-em-resolutions", "--raw-padding", "256"]
            methods[f"old fetch ({old_revision})"] = lambda out: old + ["--data", str(out)]
        environments = {name: env for name in methods}
        if old_src is not None:
            environments[f"old fetch ({old_revision})"] = {**os.environ, "PYTHONPATH": str(old_src)}
        print(f"throughput: {len(listing)} objects, {total_bytes / 1e6:.1f} MB; moto server in its own process; {runs} interleaved runs")
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for round_number in range(runs):
            for name in names[round_number % len(names):] + names[: round_number % len(names)]:
                out = scratch / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                started = time.perf_counter()
                result = subprocess.run(methods[name](out), env=environments[name], capture_output=True, text=True, cwd=scratch)
                elapsed = time.perf_counter() - started
                if result.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
                if copied(out) != listing:
                    raise SystemExit(f"{name} did not copy exactly the bucket's objects")
                seconds[name].append(elapsed)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        for name, median in medians.items():
            spread = ", ".join(f"{total_bytes / 1e6 / s:.2f}" for s in seconds[name])
            print(f"  {name:26s} {total_bytes / 1e6 / median:6.2f} MB/s  {len(listing) / median:7.1f} objects/s  (median of {spread} MB/s)")
        for name in names[1:]:
            print(f"  project / {name}: {medians[name] / medians['project']:.2f}x")
    finally:
        server.stop()


def record(entries: int, scratch: Path, files: int) -> None:
    from cellmap_repro.fetch_record import Record, fold, load_entries, local_state, md5_file
    from cellmap_repro.storage import atomic_write_json

    root = scratch / "record"
    root.mkdir()
    synthetic = {
        f"jrc_x-{i % 20}/jrc_x-{i % 20}.zarr/recon-1/em/fibsem-uint8/s0/{i // 400}/{(i // 20) % 20}/{i % 20}": {
            "size": 200_000 + i, "md5": f"{i:032x}", "etag": f"{i:032x}", "mtime_ns": 1_700_000_000_000_000_000 + i
        }
        for i in range(entries)
    }
    print(f"record: {entries} entries")
    old_file = root / "old.json"
    started = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        atomic_write_json(old_file, synthetic)  # the old save: the whole record, once a second
    old_save = (time.perf_counter() - started) / repeats
    with Record(root) as new:
        new.entries = dict(synthetic)
        started = time.perf_counter()
        for i in range(1000):
            new.add(f"new/{i}", {"size": 1, "md5": "0" * 32, "etag": "0" * 32, "mtime_ns": i})
        new_add = (time.perf_counter() - started) / 1000
    # a snapshot of ``entries`` plus a journal of 1000 lines, as a fetch leaves it before folding
    from cellmap_repro.fetch_record import write_snapshot

    write_snapshot(root, synthetic)
    started = time.perf_counter()
    load_entries(root)
    load = time.perf_counter() - started
    started = time.perf_counter()
    fold(root)
    folded = time.perf_counter() - started
    print(f"  old save (whole record as JSON + fsync): {old_save * 1e3:9.1f} ms per save (up to once a second, workers waiting)")
    print(f"  new save (one journal line per object):  {new_add * 1e6:9.1f} us per object, whatever the record's size")
    print(f"  load snapshot + journal:                 {load * 1e3:9.1f} ms once per run")
    print(f"  fold journal into snapshot:              {folded * 1e3:9.1f} ms once per run (at start/end, when no other fetch runs)")

    data = root / "files"
    data.mkdir()
    payload = os.urandom(200_000)
    entries_on_disk = {}
    for i in range(files):
        path = data / f"{i:05d}"
        path.write_bytes(payload)
        stat = path.stat()
        entries_on_disk[path.name] = {"size": stat.st_size, "md5": md5_file(path), "mtime_ns": stat.st_mtime_ns}
    os.sync()
    started = time.perf_counter()
    assert all(md5_file(data / name) == entry["md5"] for name, entry in entries_on_disk.items())
    old_check = (time.perf_counter() - started) / files
    started = time.perf_counter()
    assert all(local_state(entry, data / name) == "ok" for name, entry in entries_on_disk.items())
    new_check = (time.perf_counter() - started) / files
    print(f"  rerun check, old (MD5 of the file):      {old_check * 1e6:9.1f} us per 200 kB object (page cache warm; reads the data)")
    print(f"  rerun check, new (size + mtime):         {new_check * 1e6:9.1f} us per object ({old_check / new_check:,.0f}x less); at 200 k objects: {old_check * 2e5:.0f} s vs {new_check * 2e5:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--copies", type=int, default=3, help="copies of the tiny dataset in the bucket")
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=500, help="files for the rerun check")
    parser.add_argument("--only", choices=["throughput", "record"], default=None)
    parser.add_argument("--old", default="604a76f", help="git revision of the old fetch to compare ('' to skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as scratch:
        if args.only in (None, "throughput"):
            throughput(args.runs, args.copies, Path(scratch), args.old or None)
        if args.only in (None, "record"):
            record(args.entries, Path(scratch), args.files)


if __name__ == "__main__":
    main()
