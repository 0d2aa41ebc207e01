"""`cellmap-repro fetch`: download CellMap crops from S3, resumable and verified.

Reads the challenge's crop manifest (``crop_number,collection,alignment,crop_url,em_url``),
selects crops (all, by id, by dataset, by class) and copies, for each, every object of its
ground-truth group and the raw EM that training needs, into the layout cellmap-data
reads: ``<data>/<dataset>/<dataset>.zarr/...``. As the toolbox does, EM metadata of every
scale level is copied, and chunk data only for levels not finer than the crop's labels
(voxel size ratio > 0.8 on every axis; ``--fetch-all-em-resolutions`` for all), only
chunks intersecting the crop's box enlarged by ``--raw-padding`` voxels of that level.

Every object is written to a temporary name, checked (size, and the MD5 that S3 reports
as ETag for single-part uploads) and renamed; what was fetched is recorded in
``<data>/.cellmap-repro-fetch.json``. A rerun skips objects whose local copy still
matches the record and fetches the rest, so an interrupted fetch just continues.
``--verify`` re-checks the local copy against the record without any network.
Anonymous access; endpoint and bucket are settings, so a local S3 server works too.
"""

from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_output_path, atomic_write_json

DEFAULT_BUCKET = "janelia-cosem-datasets"
DEFAULT_MANIFEST = "https://raw.githubusercontent.com/janelia-cellmap/cellmap-segmentation-challenge/main/src/cellmap_segmentation_challenge/utils/manifest.csv"
RECORD_NAME = ".cellmap-repro-fetch.json"
# Fault injection for the tests: SIGKILL this process after writing this many objects.
KILL_AFTER_ENV = "CELLMAP_REPRO_SIGKILL_AFTER_OBJECTS"


@dataclass(frozen=True)
class Crop:
    crop_id: int
    dataset: str
    crop_key: str  # bucket-relative key of the crop group
    em_key: str  # bucket-relative key of the EM multiscale group

    @property
    def container_key(self) -> str:
        return self.crop_key.split(".zarr/", 1)[0] + ".zarr"


def _split_url(url: str, bucket_override: str | None) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise ReproError(f"manifest URL is not an s3:// URL: {url}")
    bucket, _, key = url[5:].partition("/")
    return bucket_override or bucket, key.rstrip("/")


def read_crop_manifest(text: str, where: str, bucket: str | None) -> tuple[str, list[Crop]]:
    crops, buckets = [], set()
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            crop_bucket, crop_key = _split_url(row["crop_url"], bucket)
            _, em_key = _split_url(row["em_url"], bucket)
            crops.append(Crop(int(row["crop_number"]), row["collection"], crop_key, em_key))
        except (KeyError, ValueError, TypeError) as exc:
            raise ReproError(f"{where}:{line}: malformed crop manifest row ({exc})") from None
        buckets.add(crop_bucket)
    if not crops:
        raise ReproError(f"{where}: crop manifest has no rows")
    if len(buckets) > 1:
        raise ReproError(f"{where}: crops from several buckets ({', '.join(sorted(buckets))}); pass --bucket")
    return buckets.pop(), crops


class Remote:
    """Anonymous S3 access with errors turned into one clear line."""

    def __init__(self, bucket: str, endpoint: str | None):
        import s3fs

        self.bucket = bucket
        self.endpoint = endpoint
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        config = {"retries": {"max_attempts": 2}, "connect_timeout": 10, "read_timeout": 60}
        self.fs = s3fs.S3FileSystem(anon=True, client_kwargs=client_kwargs, config_kwargs=config)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, key: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FileNotFoundError:
            raise ReproError(f"object missing: {self.url(key)}") from None
        except PermissionError:
            raise ReproError(f"access denied: {self.url(key)}") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            raise ReproError(f"cannot reach S3 {self.endpoint or 'AWS'} for {what} {self.url(key)} ({type(exc).__name__}: {str(exc)[:160]})") from None
        except Exception as exc:  # botocore/aiohttp connection errors have no common base
            name = type(exc).__name__
            if "AccessDenied" in str(exc) or "Forbidden" in str(exc):
                raise ReproError(f"access denied: {self.url(key)}") from None
            raise ReproError(f"cannot reach S3 {self.endpoint or 'AWS'} for {what} {self.url(key)} ({name}: {str(exc)[:160]})") from None

    def find(self, key: str) -> dict[str, dict]:
        found = self._call("listing", key, self.fs.find, f"{self.bucket}/{key}", detail=True)
        if not found:
            raise ReproError(f"object missing: {self.url(key)} (nothing under that prefix)")
        return {path.split("/", 1)[1]: info for path, info in found.items()}

    def cat(self, key: str) -> bytes:
        return self._call("reading", key, self.fs.cat_file, f"{self.bucket}/{key}")

    def info(self, key: str) -> dict | None:
        try:
            return self._call("reading", key, self.fs.info, f"{self.bucket}/{key}")
        except ReproError as error:
            if str(error).startswith("object missing"):
                return None
            raise


def _etag_md5(info: dict) -> str | None:
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return etag if len(etag) == 32 and "-" not in etag else None


def plan_crop(remote: Remote, crop: Crop, raw_padding: int, all_em_levels: bool) -> dict[str, dict]:
    """Every object to copy for one crop: key -> remote info (size, ETag)."""
    objects = remote.find(crop.crop_key)
    # group metadata of every ancestor, so the copy is a valid zarr hierarchy
    parts = crop.crop_key.split("/")
    em_parts = crop.em_key.split("/")
    for prefix in {"/".join(parts[:i]) for i in range(1, len(parts))} | {"/".join(em_parts[:i]) for i in range(1, len(em_parts) + 1)}:
        if not prefix.endswith(".zarr") and ".zarr/" not in prefix:
            continue
        for name in (".zgroup", ".zattrs"):
            info = remote.info(f"{prefix}/{name}")
            if info is not None:
                objects[f"{prefix}/{name}"] = info
    label_scale, box_low, box_high = _crop_box(remote, crop, objects)
    em_attrs = json.loads(remote.cat(f"{crop.em_key}/.zattrs"))
    for dataset in em_attrs["multiscales"][0]["datasets"]:
        transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
        scale = np.array(transforms["scale"]["scale"], float)
        translation = np.array(transforms.get("translation", {"translation": [0.0] * 3})["translation"], float)
        level_key = f"{crop.em_key}/{dataset['path']}"
        zarray = json.loads(remote.cat(f"{level_key}/.zarray"))
        objects[f"{level_key}/.zarray"] = remote.info(f"{level_key}/.zarray")
        attrs_info = remote.info(f"{level_key}/.zattrs")
        if attrs_info is not None:
            objects[f"{level_key}/.zattrs"] = attrs_info
        if not all_em_levels and not np.all(scale / label_scale > 0.8):
            continue
        chunks = np.array(zarray["chunks"])
        shape = np.array(zarray["shape"])
        separator = zarray.get("dimension_separator", ".")
        low = np.floor((box_low - translation) / scale + 0.5).astype(int) - raw_padding
        high = np.ceil((box_high - translation) / scale - 0.5).astype(int) + 1 + raw_padding
        low, high = np.clip(low, 0, shape), np.clip(high, 0, shape)
        first, last = low // chunks, np.maximum(high - 1, low) // chunks
        for index in np.ndindex(*(last - first + 1)):
            chunk = separator.join(str(int(i)) for i in first + np.array(index))
            objects[f"{level_key}/{chunk}"] = None  # looked up when fetched: absent chunks are fill value
    return objects


def _crop_box(remote: Remote, crop: Crop, objects: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s0 voxel size of the crop's labels and the crop's world box (nm)."""
    for key in sorted(objects):
        is_class_group = key.endswith("/.zattrs") and key.count("/") == crop.crop_key.count("/") + 2
        if is_class_group and "multiscales" in (attrs := json.loads(remote.cat(key))):
            dataset = attrs["multiscales"][0]["datasets"][0]
            transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
            scale = np.array(transforms["scale"]["scale"], float)
            translation = np.array(transforms.get("translation", {"translation": [0.0] * 3})["translation"], float)
            group = key.rsplit("/", 1)[0]
            shape = np.array(json.loads(remote.cat(f"{group}/{dataset['path']}/.zarray"))["shape"])
            low = translation - scale / 2
            return scale, low, low + scale * shape
    raise ReproError(f"crop {crop.crop_id}: no labelled class with multiscale metadata under {remote.url(crop.crop_key)}")


class Record:
    """What was fetched: relative path -> size and MD5, saved atomically as we go."""

    def __init__(self, data_root: Path):
        self.path = data_root / RECORD_NAME
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.lock = threading.Lock()
        self.last_save = 0.0

    def matches(self, relative: str, local: Path) -> bool:
        entry = self.entries.get(relative)
        if entry is None or not local.exists() or local.stat().st_size != entry["size"]:
            return False
        return entry.get("absent") or _md5(local) == entry["md5"]

    def add(self, relative: str, entry: dict) -> None:
        with self.lock:
            self.entries[relative] = entry
            if time.monotonic() - self.last_save > 1.0:
                self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.entries)
        self.last_save = time.monotonic()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    data_root: Path,
    manifest: str = DEFAULT_MANIFEST,
    crops: str = "all",
    datasets: list[str] | None = None,
    classes: list[str] | None = None,
    endpoint: str | None = None,
    bucket: str | None = None,
    raw_padding: int = 0,
    all_em_levels: bool = False,
    workers: int = 8,
    dry_run: bool = False,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    text = _read_manifest(manifest, endpoint)
    bucket_name, manifest_crops = read_crop_manifest(text, manifest, bucket)
    selected = select_crops(manifest_crops, crops, datasets)
    remote = Remote(bucket_name, endpoint)
    if classes:
        selected = [c for c in selected if any(remote.info(f"{c.crop_key}/{name}/.zattrs") for name in classes)]
        if not selected:
            raise ReproError(f"no selected crop annotates any of: {', '.join(classes)}")
    plan: dict[str, dict | None] = {}
    for crop in tqdm(selected, desc="planning", unit="crop", disable=not progress or len(selected) < 2):
        plan.update(plan_crop(remote, crop, raw_padding, all_em_levels))
    known_bytes = sum(info["size"] for info in plan.values() if info)
    if dry_run:
        unknown = sum(1 for info in plan.values() if info is None)
        print(f"would fetch {len(selected)} crop(s): {len(plan)} objects, {known_bytes / 1e6:.1f} MB of metadata and labels + {unknown} raw chunks (size known when fetched)")
        for crop in selected:
            print(f"  crop {crop.crop_id} ({crop.dataset})")
        return {"crops": len(selected), "objects": len(plan), "bytes": known_bytes, "written": 0}
    data_root.mkdir(parents=True, exist_ok=True)
    record = Record(data_root)
    kill_after = int(os.environ[KILL_AFTER_ENV]) if os.environ.get(KILL_AFTER_ENV) else None
    counts = {"transferred": 0, "skipped": 0, "absent": 0, "bytes": 0}
    lock = threading.Lock()

    def transfer(key: str, info: dict | None) -> None:
        relative = key  # bucket keys are <dataset>/<dataset>.zarr/...: the data root's layout
        local = data_root / relative
        if record.matches(relative, local):
            with lock:
                counts["skipped"] += 1
            return
        if info is None:
            info = remote.info(key)
            if info is None:  # a chunk that was never written: reads as the fill value
                record.add(relative, {"size": 0, "absent": True})
                with lock:
                    counts["absent"] += 1
                return
        payload = remote.cat(key)
        if len(payload) != info["size"]:
            raise ReproError(f"download of {remote.url(key)} truncated: {len(payload)} of {info['size']} bytes; run again")
        md5 = hashlib.md5(payload).hexdigest()
        expected = _etag_md5(info)
        if expected and md5 != expected:
            raise ReproError(f"download of {remote.url(key)} is corrupt (MD5 {md5} != ETag {expected}); run again")
        try:
            with atomic_output_path(local) as tmp:
                tmp.write_bytes(payload)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ReproError(f"disk full while writing {local}; nothing partial was kept, free space and run again") from None
            raise
        record.add(relative, {"size": len(payload), "md5": md5, "etag": info.get("ETag")})
        with lock:
            counts["transferred"] += 1
            counts["bytes"] += len(payload)
            if kill_after is not None and counts["transferred"] >= kill_after:
                record.save()
                os.kill(os.getpid(), signal.SIGKILL)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(plan), desc=f"fetch {len(selected)} crop(s)", unit="obj", disable=not progress) as bar:
            futures = [pool.submit(transfer, key, info) for key, info in sorted(plan.items())]
            for future in as_completed(futures):
                future.result()
                bar.update(1)
                bar.set_postfix(MB=f"{counts['bytes'] / 1e6:.1f}")
    finally:
        record.save()
    return {"crops": len(selected), "objects": len(plan), **counts}


def _read_manifest(manifest: str, endpoint: str | None) -> str:
    if manifest.startswith("s3://"):
        bucket, key = _split_url(manifest, None)
        return Remote(bucket, endpoint).cat(key).decode()
    if manifest.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(manifest, timeout=30) as response:
                return response.read().decode()
        except (urllib.error.URLError, TimeoutError) as exc:
            raise ReproError(f"cannot download the crop manifest {manifest} ({getattr(exc, 'reason', exc)}); pass --manifest with a local copy") from None
    path = Path(manifest)
    if not path.exists():
        raise ReproError(f"crop manifest not found: {path}")
    return path.read_text()


def select_crops(crops: list[Crop], which: str, datasets: list[str] | None) -> list[Crop]:
    chosen = crops
    if which != "all":
        try:
            wanted = [int(c) for c in which.split(",") if c.strip()]
        except ValueError:
            raise ReproError(f"--crops must be 'all' or crop ids like 111,112; got {which!r}") from None
        known = {c.crop_id for c in crops}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            examples = ", ".join(str(i) for i in sorted(known)[:8])
            raise ReproError(f"unknown crop id(s) {', '.join(map(str, unknown))} (the manifest has e.g. {examples})")
        chosen = [c for c in crops if c.crop_id in set(wanted)]
    if datasets:
        chosen = [c for c in chosen if c.dataset in set(datasets)]
        if not chosen:
            raise ReproError(f"no selected crop belongs to dataset(s) {', '.join(datasets)}")
    return sorted(chosen, key=lambda c: c.crop_id)


def verify_local(data_root: Path) -> list[str]:
    """Relative paths whose local copy no longer matches the fetch record (no network)."""
    record = Record(data_root)
    if not record.entries:
        raise ReproError(f"nothing recorded in {record.path}: fetch something first")
    return [relative for relative in sorted(record.entries) if not record.matches(relative, data_root / relative)]


def run(args: argparse.Namespace) -> int:
    data = settings.data_root(args.data)
    if args.verify:
        bad = verify_local(data)
        if bad:
            for relative in bad[:20]:
                print(f"corrupt or missing: {data / relative}")
            print(f"{len(bad)} object(s) do not match {data / RECORD_NAME}; `cellmap-repro fetch` again repairs them")
            return 1
        print(f"all {len(Record(data).entries)} recorded objects match")
        return 0
    result = fetch(
        data,
        manifest=args.manifest,
        crops=args.crops,
        datasets=args.datasets,
        classes=args.classes,
        endpoint=args.endpoint_url,
        bucket=args.bucket,
        raw_padding=args.raw_padding,
        all_em_levels=args.fetch_all_em_resolutions,
        workers=args.workers,
        dry_run=args.dry_run,
    )
    if not args.dry_run:
        print(
            f"fetched {result['crops']} crop(s) into {data}: {result['transferred']} objects transferred "
            f"({result['bytes'] / 1e6:.1f} MB), {result['skipped']} already complete, {result['absent']} absent chunks"
        )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("fetch", help="download CellMap crops from S3 (resumable, verified)", description=__doc__.split("\n\n")[0])
    settings.add_data_argument(parser)
    parser.add_argument("--manifest", default=os.environ.get("CELLMAP_REPRO_CROP_MANIFEST", DEFAULT_MANIFEST), help="crop manifest: path, https:// or s3:// URL (default: the toolbox's manifest.csv)")
    parser.add_argument("--crops", default="all", help="'all' (default) or crop ids like 111,112")
    parser.add_argument("--datasets", nargs="+", default=None, help="only crops of these datasets")
    parser.add_argument("--classes", nargs="+", default=None, help="only crops annotating any of these classes")
    parser.add_argument("--endpoint-url", default=os.environ.get("CELLMAP_REPRO_S3_ENDPOINT") or None, help="S3 endpoint (default AWS; env CELLMAP_REPRO_S3_ENDPOINT)")
    parser.add_argument("--bucket", default=os.environ.get("CELLMAP_REPRO_S3_BUCKET") or None, help=f"bucket (default: the manifest's, {DEFAULT_BUCKET}; env CELLMAP_REPRO_S3_BUCKET)")
    parser.add_argument("--raw-padding", type=int, default=0, help="EM voxels (of each level) fetched around the crop (default 0)")
    parser.add_argument("--fetch-all-em-resolutions", action="store_true", help="fetch EM chunks at every scale level")
    parser.add_argument("--workers", type=int, default=8, help="parallel transfers (default 8)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched; write nothing")
    parser.add_argument("--verify", action="store_true", help="re-check the local copy against the fetch record, offline")
    parser.set_defaults(func=run)
