"""`cellmap-repro fetch`: download what training and prediction read, resumable and verified.

Reads the challenge's crop manifest (``crop_number,collection,alignment,crop_url,em_url``)
and, for test crops, its test-crop manifest (``crop_name,dataset,class_label,voxel_size,
translation,shape``); selects crops (all, test, by id, by dataset, by class) and copies
into the layout cellmap-data reads, ``<data>/<dataset>/<dataset>.zarr/...``:

* every object of a crop's ground-truth group (test crops have none) and the group
  metadata above it, and the metadata of every EM scale level;
* raw EM chunks within ``--raw-context-nm`` of the crop's box, only at the scale levels
  the experiments read (``--fetch-all-em-resolutions`` for all). The default context is
  the reach of the widest input window of the experiments present (half its diagonal
  when the experiment rotates its samples, plus one voxel), so every window the model
  reads around the crop is real data, not zeros.

Planning lists the bucket (LIST gives each object's size and ETag, so ``--dry-run`` knows
the bytes and a chunk the bucket never wrote is known absent without a request per chunk).
Objects are streamed to a temporary file, checked (size, and the MD5 that S3 reports as
ETag for single-part uploads), renamed into place and recorded (see ``fetch_record``). A
rerun skips objects whose size and mtime match the record, and reports objects whose ETag
changed upstream (``--refresh`` fetches them). ``--verify`` re-hashes the local copy
offline. Anonymous access; endpoint and bucket are settings, so a local S3 server works.
A key becomes a local path only through :func:`local_path`: one that would land outside
the data root stops the fetch (see ``UnsafeKey``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.datasplit import crop_ids
from cellmap_repro.errors import ReproError
from cellmap_repro.fetch_record import (
    DISK_FULL,
    RECORD_NAME,
    Record,
    level_read_for,
    load_entries,
    local_state,
    md5_file,
    rebuild,
    remove_temporaries,
    voxel_box,
    window_reach_nm,
)
from cellmap_repro.storage import confined

DEFAULT_BUCKET = "janelia-cosem-datasets"
_TOOLBOX_UTILS = "https://raw.githubusercontent.com/janelia-cellmap/cellmap-segmentation-challenge/main/src/cellmap_segmentation_challenge/utils"
DEFAULT_MANIFEST = f"{_TOOLBOX_UTILS}/manifest.csv"
DEFAULT_TEST_MANIFEST = f"{_TOOLBOX_UTILS}/test_crop_manifest.csv"
RAW_PATH = "recon-1/em/fibsem-uint8"
BLOCK = 256 * 1024  # bytes held per object in flight
DEFAULT_WORKERS = 32


@dataclass(frozen=True)
class Crop:
    crop_id: int
    dataset: str
    em_key: str  # bucket key of the EM multiscale group
    crop_key: str | None = None  # ground-truth group; None for a test crop
    test_box: tuple | None = None  # a test crop's world box (low, high) in nm
    test_classes: tuple[str, ...] = ()

    @property
    def is_test(self) -> bool:
        return self.crop_key is None


@dataclass(frozen=True)
class Window:
    """The input window one experiment reads (from its model.py and data.py)."""

    source: str
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    rotates: bool

    @property
    def reach_nm(self) -> float:
        return window_reach_nm(self.shape, self.scale, self.rotates)


# setup04's window, rotated: the default when no experiment folder is found.
FALLBACK_WINDOW = Window("setup04 (no experiment found)", (216, 216, 216), (8.0, 8.0, 8.0), True)


class ObjectMissing(ReproError):
    pass


class ServerLost(ReproError):
    pass


class UnsafeKey(ReproError):
    """An object key that would land outside the data root (``..``, absolute): a rerun
    meets it again, so the fetch stops instead of suggesting one."""


class _StreamBroken(Exception):
    pass


class _Stopped(Exception):
    pass


def local_path(data_root: Path, key: str, what: str = "S3 object key") -> Path:
    """Where object ``key`` lives under the data root; every key goes through here before
    it becomes a path (listed, read back from the record, or built from metadata)."""
    try:
        return confined(data_root, key, what)
    except ReproError as error:
        raise UnsafeKey(str(error)) from None


# --- manifests and crop selection ---------------------------------------------------------


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
            crops.append(Crop(int(row["crop_number"]), row["collection"], em_key, crop_key))
        except (KeyError, ValueError, TypeError) as exc:
            raise ReproError(f"{where}:{line}: malformed crop manifest row ({exc}); a test-crop manifest goes to --test-manifest") from None
        buckets.add(crop_bucket)
    if not crops:
        raise ReproError(f"{where}: crop manifest has no rows")
    if len(buckets) > 1:
        raise ReproError(f"{where}: crops from several buckets ({', '.join(sorted(buckets))}); pass --bucket")
    return buckets.pop(), crops


def read_test_crops(text: str, where: str, em_keys: dict[str, str]) -> list[Crop]:
    """Test crops from the test-crop manifest: one box per crop (the union of its rows)."""
    from cellmap_repro.pack import read_manifest

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / Path(where).name
        path.write_text(text)
        try:
            rows = read_manifest(path)
        except ReproError as error:
            raise ReproError(str(error).replace(str(path), where)) from None
    boxes: dict[int, list] = {}
    for row in rows:
        low = np.array(row.translation) - np.array(row.voxel_size) / 2
        high = low + np.array(row.voxel_size) * np.array(row.shape)
        crop = boxes.setdefault(row.crop_id, [row.dataset, low, high, []])
        crop[1], crop[2] = np.minimum(crop[1], low), np.maximum(crop[2], high)
        crop[3].append(row.class_name)
    return [
        Crop(crop_id, dataset, em_keys.get(dataset, f"{dataset}/{dataset}.zarr/{RAW_PATH}"), None, (tuple(low), tuple(high)), tuple(names))
        for crop_id, (dataset, low, high, names) in sorted(boxes.items())
    ]


def select_crops(crops: list[Crop], which: str, datasets: list[str] | None, test_crops) -> list[Crop]:
    """``which``: 'all' (every crop and test crop), 'test', or ids; ``test_crops()`` reads the test manifest."""
    if which == "all":
        chosen = crops + test_crops()
    elif which == "test":
        chosen = test_crops()
    else:
        wanted = crop_ids(which, "--crops", "'all', 'test'")
        chosen = [c for c in crops if c.crop_id in wanted]
        unknown = wanted - {c.crop_id for c in chosen}
        if unknown:
            try:
                tests = test_crops()
            except ReproError as error:
                examples = ", ".join(str(c.crop_id) for c in sorted(crops, key=lambda c: c.crop_id)[:8])
                raise ReproError(f"unknown crop id(s) {', '.join(map(str, sorted(unknown)))} (the crop manifest has e.g. {examples}; the test-crop manifest could not be read: {error})") from None
            chosen += [c for c in tests if c.crop_id in unknown]
            unknown -= {c.crop_id for c in tests}
        if unknown:
            examples = ", ".join(str(c.crop_id) for c in sorted(crops, key=lambda c: c.crop_id)[:8])
            raise ReproError(f"unknown crop id(s) {', '.join(map(str, sorted(unknown)))} (the manifests have e.g. {examples})")
    if datasets:
        chosen = [c for c in chosen if c.dataset in set(datasets)]
        if not chosen:
            raise ReproError(f"no selected crop belongs to dataset(s) {', '.join(datasets)}")
    return sorted(chosen, key=lambda c: c.crop_id)


def _read_source(source: str, endpoint: str | None, what: str, flag: str) -> str:
    if source.startswith("s3://"):
        bucket, key = _split_url(source, None)
        return remote_for(bucket, endpoint).get_bytes(key).decode()
    if source.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                return response.read().decode()
        except (urllib.error.URLError, TimeoutError) as exc:
            raise ReproError(f"cannot download the {what} {source} ({getattr(exc, 'reason', exc)}); pass {flag} with a local copy") from None
    path = Path(source)
    if not path.exists():
        raise ReproError(f"{what} not found: {path}")
    return path.read_text()


# --- what the experiments read ------------------------------------------------------------


def _literal(path: Path, name: str):
    """The literal value assigned to ``name`` at the top of a config file (never imported:
    importing a model.py may build and download a large network)."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(name)


def experiment_windows(root: Path) -> list[Window]:
    windows = []
    for model_file in sorted(Path(root).glob("*/model.py")):
        try:
            info = _literal(model_file, "input_array_info")
            shape, scale = tuple(int(v) for v in info["shape"]), tuple(float(v) for v in info["scale"])
        except (KeyError, ValueError, TypeError, SyntaxError):
            print(f"note: {model_file}: input_array_info is not a literal dict; pass --raw-context-nm if its window is the widest", file=sys.stderr)
            continue
        try:
            rotates = "rotate" in (_literal(model_file.with_name("data.py"), "spatial_transforms") or {})
        except (KeyError, FileNotFoundError):
            rotates = False
        except (ValueError, TypeError, SyntaxError):
            rotates = True  # not a literal: assume the widest reach
        windows.append(Window(model_file.parent.name, shape, scale, rotates))
    return windows


# --- S3 -----------------------------------------------------------------------------------


def _etag(value) -> str | None:
    return str(value).strip('"') if value else None


def _md5_of(etag: str | None) -> str | None:
    """The object's MD5 where the ETag is one (single-part uploads)."""
    return etag if etag and len(etag) == 32 and "-" not in etag else None


class Remote:
    """Anonymous S3: botocore lists and composes object URLs; urllib3 streams the GETs.

    A GET of a public object is a plain HTTP GET. Sending it through urllib3 directly costs a
    third of botocore's CPU per request (endpoint rules, event hooks), which on a busy
    machine decides whether fetch is faster than a plain copy (benchmarks/bench_fetch.py).
    Every failure becomes one clear line; few retries and short timeouts make a lost
    server stop the fetch within seconds.
    """

    _PLACEHOLDER = "cellmap-repro-object-key"

    def __init__(self, bucket: str, endpoint: str | None, workers: int = DEFAULT_WORKERS):
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        self.bucket = bucket
        self.endpoint = endpoint
        config = Config(signature_version=UNSIGNED, max_pool_connections=max(10, workers), retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=10)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name=region, config=config)
        template = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": self._PLACEHOLDER})
        self._url_parts = template.split(self._PLACEHOLDER, 1)
        self.workers = workers
        self._http = None
        self._http_lock = threading.Lock()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def http(self):
        with self._http_lock:
            if self._http is None:
                import urllib.parse
                import urllib.request

                import urllib3
                from botocore.httpsession import get_cert_path

                retries = urllib3.Retry(total=2, connect=2, read=1, status=2, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504), allowed_methods=["GET"], raise_on_status=False)
                options = {"maxsize": max(10, self.workers), "retries": retries, "timeout": urllib3.Timeout(connect=5, read=10), "ca_certs": get_cert_path(True)}
                host = urllib.parse.urlsplit(self._url_parts[0])
                proxy = urllib.request.getproxies().get(host.scheme)
                if proxy and not urllib.request.proxy_bypass(host.hostname or ""):
                    self._http = urllib3.ProxyManager(proxy, **options)
                else:
                    self._http = urllib3.PoolManager(**options)
            return self._http

    def _error(self, exc: Exception, what: str, key: str) -> ReproError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") == "NoSuchBucket":
                return ReproError(f"bucket not found: s3://{self.bucket} ({self.endpoint or 'AWS'})")
            return self._status_error(status, error.get("Code"), what, key)
        return ServerLost(f"cannot reach S3 {self.endpoint or 'AWS'} for {what} {self.url(key)} ({type(exc).__name__}: {str(exc)[:160]})")

    def _status_error(self, status, code, what: str, key: str) -> ReproError:
        if status == 404 or code in ("NoSuchKey", "NotFound"):
            return ObjectMissing(f"object missing: {self.url(key)}")
        if status == 403 or code == "AccessDenied":
            return ReproError(f"access denied: {self.url(key)}")
        return ServerLost(f"S3 {self.endpoint or 'AWS'} answered {code or status} for {what} {self.url(key)}")

    def object_url(self, key: str) -> str:
        import urllib.parse

        return self._url_parts[0] + urllib.parse.quote(key, safe="/~") + self._url_parts[1]

    def get_small(self, key: str) -> tuple[bytes, str | None] | None:
        """A small object whole (metadata, manifests) with its ETag; None if it does not exist."""
        import urllib3

        try:
            response = self.http().request("GET", self.object_url(key), decode_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(exc, "reading", key) from None
        if response.status == 404:
            return None
        if response.status != 200:
            raise self._status_error(response.status, None, "reading", key)
        return response.data, _etag(response.headers.get("ETag"))

    def get_bytes(self, key: str) -> bytes:
        found = self.get_small(key)
        if found is None:
            raise ObjectMissing(f"object missing: {self.url(key)}")
        return found[0]

    def list(self, prefix: str) -> dict[str, tuple[int, str | None]]:
        """Key -> (size, ETag) of every object under ``prefix`` (one request per 1000)."""
        found = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found[item["Key"]] = (int(item["Size"]), _etag(item.get("ETag")))
        except Exception as exc:
            raise self._error(exc, "listing", prefix) from None
        return found

    def download(self, key: str, target: Path, stop: threading.Event) -> tuple[int, str, str | None]:
        """Stream one object into ``target``, BLOCK bytes at a time: (size, MD5, ETag)."""
        import urllib3

        try:
            response = self.http().request("GET", self.object_url(key), preload_content=False, decode_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(exc, "reading", key) from None
        digest, size, complete = hashlib.md5(), 0, False
        try:
            if response.status != 200:
                raise self._status_error(response.status, None, "reading", key)
            with open(target, "wb") as out:
                while True:
                    if stop.is_set():
                        raise _Stopped()
                    try:
                        block = response.read(BLOCK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, OSError) as exc:  # connection cut mid-body
                        raise _StreamBroken(f"{type(exc).__name__}: {str(exc)[:120]}") from None
                    if not block:
                        break
                    digest.update(block)
                    out.write(block)
                    size += len(block)
            complete = True
        finally:
            if not complete:
                response.close()  # never hand a half-read connection back to the pool
            response.release_conn()
        expected = int(response.headers.get("Content-Length", size))
        if size != expected:
            raise _StreamBroken(f"truncated: {size} of {expected} bytes")
        return size, digest.hexdigest(), _etag(response.headers.get("ETag"))


@functools.lru_cache(maxsize=4)
def remote_for(bucket: str, endpoint: str | None, workers: int = DEFAULT_WORKERS) -> "Remote":
    """One client per bucket and endpoint: creating one costs a few tenths of a second."""
    return Remote(bucket, endpoint, workers)


# --- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmLevel:
    key: str
    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    separator: str


@dataclass
class Plan:
    crops: list[Crop]
    objects: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # key -> (size, ETag)
    inline: dict[str, tuple[bytes, str | None]] = field(default_factory=dict)  # metadata read while planning
    absent: set[str] = field(default_factory=set)  # raw chunks the bucket never wrote
    raw_levels: dict[str, str] = field(default_factory=dict)  # level key -> "s0 (8 nm)"
    failed: dict[int, str] = field(default_factory=dict)  # crop id -> why

    def sizes(self) -> dict[str, tuple[int, str | None]]:
        return {**self.objects, **{key: (len(body), etag) for key, (body, etag) in self.inline.items()}}


def _levels(attrs: dict, where: str) -> list[tuple[str, tuple, tuple]]:
    try:
        levels = []
        for dataset in attrs["multiscales"][0]["datasets"]:
            transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
            scale = tuple(float(s) for s in transforms["scale"]["scale"])
            translation = tuple(float(t) for t in transforms.get("translation", {"translation": [0.0] * len(scale)})["translation"])
            levels.append((dataset["path"], scale, translation))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReproError(f"{where}: malformed OME-NGFF multiscales attributes ({exc})") from None
    return sorted(levels, key=lambda level: max(level[1]))


def _groups_above(key: str) -> list[str]:
    """Group keys from the container down to the parent of ``key``, e.g. ds.zarr, ds.zarr/recon-1."""
    container, _, inner = key.partition(".zarr/")
    groups, current = [container + ".zarr"], container + ".zarr"
    for part in inner.split("/")[:-1]:
        current = f"{current}/{part}"
        groups.append(current)
    return groups


def _list_prefixes(level: EmLevel, wanted: set[tuple[int, int, int]]) -> list[str]:
    """The LIST prefixes that find the wanted chunks of a level in the fewest requests:
    the whole level, one z slab each, or one (z, y) row each (1000 keys per request)."""
    counts = [math.ceil(s / c) for s, c in zip(level.shape, level.chunks)]
    sep = level.separator
    zs = sorted({z for z, _, _ in wanted})
    rows = sorted({(z, y) for z, y, _ in wanted})
    options = [
        (math.ceil(counts[0] * counts[1] * counts[2] / 1000), [f"{level.key}/"]),
        (len(zs) * math.ceil(counts[1] * counts[2] / 1000), [f"{level.key}/{z}{sep}" for z in zs]),
        (len(rows) * math.ceil(counts[2] / 1000), [f"{level.key}/{z}{sep}{y}{sep}" for z, y in rows]),
    ]
    return min(options, key=lambda option: option[0])[1]


class Planner:
    def __init__(self, remote: Remote, context_nm: float, scales: list[tuple], all_levels: bool, workers: int, feed=None):
        self.remote = remote
        self.context_nm = context_nm
        self.scales = scales
        self.all_levels = all_levels
        self.workers = workers
        self.inline: dict[str, tuple[bytes, str | None]] = {}
        # feed(objects, absent) gets each part of the plan as soon as it is known, so that
        # transfers start while the rest is still being listed.
        self.feed = feed or (lambda objects, absent: None)

    def _json(self, key: str) -> dict:
        found = self.remote.get_small(key)
        if found is None:
            raise ObjectMissing(f"object missing: {self.remote.url(key)}")
        self.inline[key] = found
        try:
            return json.loads(found[0])
        except ValueError as exc:
            raise ReproError(f"{self.remote.url(key)} is not valid JSON ({exc})") from None

    def _optional(self, key: str) -> None:
        found = self.remote.get_small(key)
        if found is not None:
            self.inline[key] = found

    def em_levels(self, em_key: str) -> list[EmLevel]:
        levels = []
        for path, scale, translation in _levels(self._json(f"{em_key}/.zattrs"), self.remote.url(em_key)):
            zarray = self._json(f"{em_key}/{path}/.zarray")
            separator = zarray.get("dimension_separator") or "."
            levels.append(EmLevel(f"{em_key}/{path}", path, scale, translation, tuple(zarray["shape"]), tuple(zarray["chunks"]), separator))
        return levels

    def wanted(self, levels: list[EmLevel]) -> list[EmLevel]:
        if self.all_levels:
            return levels
        return sorted({level_read_for(levels, scale) for scale in self.scales}, key=lambda level: max(level.scale))

    def crop_labels(self, crop: Crop) -> tuple[dict, tuple]:
        """Every object of the crop's ground truth, and the crop's world box."""
        objects = self.remote.list(crop.crop_key + "/")
        if not objects:
            raise ObjectMissing(f"object missing: {self.remote.url(crop.crop_key)} (nothing under that prefix)")
        depth = crop.crop_key.count("/") + 2
        for key in sorted(k for k in objects if k.endswith("/.zattrs") and k.count("/") == depth):
            attrs = self._json(key)
            if "multiscales" in attrs:
                group = key.rsplit("/", 1)[0]
                path, scale, translation = _levels(attrs, self.remote.url(group))[0]
                shape = np.array(self._json(f"{group}/{path}/.zarray")["shape"])
                low = np.array(translation) - np.array(scale) / 2
                return objects, (tuple(low), tuple(low + np.array(scale) * shape))
        raise ReproError(f"crop {crop.crop_id}: no labelled class with multiscale metadata under {self.remote.url(crop.crop_key)}")

    def plan(self, crops: list[Crop], classes: list[str] | None, progress: bool = False) -> Plan:
        plan = Plan(crops=[])
        pool = ThreadPoolExecutor(self.workers)
        try:
            wanted = self._plan_crops(pool, crops, classes, progress, plan)
            self._plan_raw(pool, wanted, plan)
        finally:  # on a failure (lost server, Ctrl-C) the queued requests are dropped
            pool.shutdown(wait=True, cancel_futures=True)
        # Metadata read while planning is written from memory; labels only for crops kept.
        crop_prefixes = tuple(c.crop_key + "/" for c in crops if c.crop_key)
        plan.inline = {key: found for key, found in self.inline.items() if key in plan.objects or not key.startswith(crop_prefixes)}
        for key in plan.inline:
            plan.objects.pop(key, None)
        if classes and not plan.crops and not plan.failed:
            raise ReproError(f"no selected crop annotates any of: {', '.join(classes)}")
        return plan

    def _plan_crops(self, pool, crops: list[Crop], classes, progress: bool, plan: Plan) -> dict:
        """Labels and metadata of every crop; returns the raw chunks each EM level must give."""
        from tqdm import tqdm

        em_jobs = {key: pool.submit(self.em_levels, key) for key in sorted({c.em_key for c in crops})}
        label_jobs = {c.crop_id: pool.submit(self.crop_labels, c) for c in crops if not c.is_test}
        groups = sorted({g for c in crops for key in (c.em_key, c.crop_key) if key for g in _groups_above(key)} | set(em_jobs))
        metadata = [pool.submit(self._optional, f"{g}/{name}") for g in groups for name in (".zgroup", ".zattrs")]
        em = {}
        for key, job in em_jobs.items():
            try:
                em[key] = job.result()
                metadata += [pool.submit(self._optional, f"{level.key}/.zattrs") for level in em[key]]
            except ObjectMissing as error:
                em[key] = error
        wanted: dict[EmLevel, set[tuple[int, int, int]]] = defaultdict(set)
        for crop in tqdm(crops, desc="planning", unit="crop", disable=not progress or len(crops) < 2):
            try:
                if isinstance(em[crop.em_key], ReproError):
                    raise em[crop.em_key]
                box = crop.test_box
                if not crop.is_test:
                    labels, box = label_jobs[crop.crop_id].result()
                    if classes and not any(f"{crop.crop_key}/{name}/.zattrs" in labels for name in classes):
                        continue
                    plan.objects.update(labels)
                    self.feed(labels, set())
                elif classes and not set(classes) & set(crop.test_classes):
                    continue
                self._wanted_chunks(box, em[crop.em_key], wanted)
                plan.crops.append(crop)
            except ObjectMissing as error:
                plan.failed[crop.crop_id] = str(error)
        for job in metadata:
            job.result()
        crop_prefixes = tuple(c.crop_key + "/" for c in crops if c.crop_key)
        self.feed({key: (len(body), etag) for key, (body, etag) in self.inline.items() if not key.startswith(crop_prefixes)}, set())
        return wanted

    def _plan_raw(self, pool, wanted: dict, plan: Plan) -> None:
        """Size and ETag of every wanted raw chunk, or absent: LISTs, no request per chunk."""
        listings = {level: [pool.submit(self.remote.list, prefix) for prefix in _list_prefixes(level, chunks)] for level, chunks in wanted.items()}
        for level, jobs in listings.items():
            listed = {}
            for job in jobs:
                listed.update(job.result())
            plan.raw_levels[level.key] = f"{level.path} ({'x'.join(f'{s:g}' for s in level.scale)} nm)"
            keys = {f"{level.key}/{level.separator.join(map(str, index))}" for index in wanted[level]}
            found = {key: listed[key] for key in keys if key in listed}
            plan.objects.update(found)
            plan.absent |= keys - set(found)
            self.feed(found, keys - set(found))

    def _wanted_chunks(self, box, levels: list[EmLevel], wanted: dict) -> None:
        low, high = np.array(box[0]) - self.context_nm, np.array(box[1]) + self.context_nm
        for level in self.wanted(levels):
            if len(level.shape) != 3:
                raise ReproError(f"{self.remote.url(level.key)}: raw has {len(level.shape)} axes; expected z, y, x")
            start, stop = voxel_box(low, high, level.translation, level.scale)
            start, stop = np.clip(start, 0, level.shape), np.clip(stop, 0, level.shape)
            if np.any(stop <= start):
                continue
            chunks = np.array(level.chunks)
            first, last = start // chunks, (stop - 1) // chunks
            wanted[level].update(tuple(int(i) for i in first + np.array(offset)) for offset in np.ndindex(*(last - first + 1)))


# --- transfer -----------------------------------------------------------------------------


@dataclass
class Decision:
    fetch: list[tuple[str, int]] = field(default_factory=list)  # (key, size) to transfer
    complete: int = 0
    changed: list[str] = field(default_factory=list)  # ETag differs upstream; kept (no --refresh)
    new_absent: list[str] = field(default_factory=list)


def decide(objects: dict, absent: set, entries: dict[str, dict], data_root: Path, refresh: bool) -> tuple[Decision, dict[str, dict]]:
    """What to transfer of ``objects`` (key -> size, ETag) and which of ``absent`` to record;
    checks size and mtime only (hashes a file only if it was touched).

    Returns the decision and record updates (entries whose mtime changed but content did not).
    """
    decision, updates = Decision(), {}
    for key, (size, etag) in sorted(objects.items()):
        entry = entries.get(key)
        local = local_path(data_root, key)
        state = local_state(entry, local)
        if state == "touched":
            state = "ok" if md5_file(local) == entry.get("md5") else "differs"
            if state == "ok":
                updates[key] = {**entry, "mtime_ns": local.stat().st_mtime_ns}
        recorded = entry and (_etag(entry.get("etag")) or entry.get("md5"))  # records before issue 12 kept the quotes
        if state == "ok" and not entry.get("absent") and etag and recorded and recorded != etag:
            if not refresh:
                decision.changed.append(key)
                decision.complete += 1
                continue
            state = "changed"
        if state == "ok" and not entry.get("absent"):
            decision.complete += 1
        else:
            decision.fetch.append((key, size))
    for key in sorted(absent):
        entry = entries.get(key)
        if entry and entry.get("absent"):
            continue
        if not local_path(data_root, key).exists():  # a local copy from before the chunk vanished upstream stays
            decision.new_absent.append(key)
    return decision, updates


class Transfer:
    """Stream objects into place from a pool of threads while the plan is still being made.

    ``submit`` blocks while 4 x workers objects are queued (bounded memory at any plan
    size); the first failure or a Ctrl-C stops everything: queued objects are dropped and
    running ones drop their temporary file at their next block.
    """

    def __init__(self, remote: Remote, data_root: Path, record: Record, workers: int, inline: dict, progress: bool, desc: str):
        from tqdm import tqdm

        self.remote = remote
        self.inline = inline
        self.data_root = data_root
        self.record = record
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.done = self.bytes = self.queued = 0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(4 * max(1, workers))
        self._pool = ThreadPoolExecutor(max(1, workers))
        self._bar = tqdm(total=0, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)

    def __enter__(self) -> "Transfer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._bar.close()

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def submit(self, key: str, size: int) -> None:
        while not self._slots.acquire(timeout=0.2):  # the timeout keeps Ctrl-C responsive
            self._check()
        self._check()
        with self._lock:
            self.queued += 1
            self._bar.total += size
        self._pool.submit(self.one, key).add_done_callback(self._finished)

    def _finished(self, job) -> None:
        self._slots.release()
        error = None if job.cancelled() else job.exception()
        with self._lock:
            self.queued -= 1
            if job.cancelled() or isinstance(error, _Stopped):
                return
            if error is not None:
                if self.failure is None:
                    self.failure = error
                    self.stop.set()
                return
            self.done += 1
            self.bytes += job.result()
        self._bar.update(job.result())

    def finish(self) -> None:
        """Wait for every submitted object; raise the first failure."""
        while self.queued and self.failure is None:
            time.sleep(0.05)
        self._check()

    def one(self, key: str) -> int:
        if self.stop.is_set():
            raise _Stopped()
        from cellmap_repro.storage import atomic_output_path

        local = local_path(self.data_root, key)
        for attempt in (1, 2, 3):
            try:
                with atomic_output_path(local) as tmp:
                    # caught here, before atomic_output_path turns a nameless OSError into its own line
                    with self._disk_full_names(local, key):
                        if key in self.inline:
                            body, etag = self.inline[key]
                            tmp.write_bytes(body)
                            size, md5 = len(body), hashlib.md5(body).hexdigest()
                        else:
                            size, md5, etag = self.remote.download(key, tmp, self.stop)
                    if _md5_of(etag) and md5 != etag:
                        raise _StreamBroken(f"MD5 {md5} != ETag {etag}")
                break
            except _StreamBroken as problem:
                if attempt == 3 or self.stop.is_set():
                    raise ServerLost(f"download of {self.remote.url(key)} failed three times ({problem})") from None
            except OSError as exc:
                with self._disk_full_names(local, key):
                    raise exc
        self.record.add(key, {"size": size, "md5": md5, "etag": etag or md5, "mtime_ns": local.stat().st_mtime_ns})
        return size

    @contextlib.contextmanager
    def _disk_full_names(self, local: Path, key: str):
        try:
            yield
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise ReproError(f"disk full while writing {local} (from {self.remote.url(key)}); nothing partial was kept, free space") from None
            raise


def describe_context(windows: list[Window], context_nm: float | None) -> tuple[float, list[tuple], str]:
    """Raw context (nm), the input voxel sizes to fetch, and how they were chosen."""
    used = windows or [FALLBACK_WINDOW]
    scales = sorted({w.scale for w in used})
    if context_nm is not None:
        return float(context_nm), scales, f"{context_nm:g} nm (--raw-context-nm)"
    widest = max(used, key=lambda w: w.reach_nm)
    how = f"{'x'.join(map(str, widest.shape))} x {'x'.join(f'{s:g}' for s in widest.scale)} nm window of {widest.source}{', rotated' if widest.rotates else ''}"
    return widest.reach_nm, scales, f"{widest.reach_nm:.0f} nm (reach of the {how})"


def fetch(
    data_root: Path,
    manifest: str = DEFAULT_MANIFEST,
    test_manifest: str = DEFAULT_TEST_MANIFEST,
    crops: str = "all",
    datasets: list[str] | None = None,
    classes: list[str] | None = None,
    endpoint: str | None = None,
    bucket: str | None = None,
    raw_context_nm: float | None = None,
    experiments_root: Path | None = None,
    all_em_levels: bool = False,
    workers: int = DEFAULT_WORKERS,
    dry_run: bool = False,
    refresh: bool = False,
    progress: bool = True,
) -> dict:
    if raw_context_nm is not None and raw_context_nm < 0:
        raise ReproError(f"--raw-context-nm must be >= 0, got {raw_context_nm}")
    data_root = Path(data_root)
    bucket_name, manifest_crops = read_crop_manifest(_read_source(manifest, endpoint, "crop manifest", "--manifest"), manifest, bucket)
    em_keys = {c.dataset: c.em_key for c in manifest_crops}

    def test_crops() -> list[Crop]:
        return read_test_crops(_read_source(test_manifest, endpoint, "test-crop manifest", "--test-manifest"), test_manifest, em_keys)

    selected = select_crops(manifest_crops, crops, datasets, test_crops)
    context, scales, how = describe_context(experiment_windows(settings.experiments_root(experiments_root)), raw_context_nm)
    remote = remote_for(bucket_name, endpoint, max(1, workers))
    if dry_run:
        plan = Planner(remote, context, scales, all_em_levels, max(1, workers)).plan(selected, classes, progress)
        decision, _ = decide(plan.sizes(), plan.absent, load_entries(data_root), data_root, refresh)
        return {**_summary(plan), "context": how, "complete": decision.complete, "changed": decision.changed, "to_transfer": len(decision.fetch), "bytes_to_transfer": sum(s for _, s in decision.fetch), "raw": _raw_bytes(plan)}
    planner = Planner(remote, context, scales, all_em_levels, max(1, workers))
    return {**_fetch_into(data_root, planner, selected, classes, refresh, workers, progress), "context": how}


def _fetch_into(data_root: Path, planner: Planner, selected: list[Crop], classes, refresh: bool, workers: int, progress: bool) -> dict:
    """Plan and transfer together: each part of the plan is decided and queued as it is known."""
    started, totals = time.monotonic(), Decision()
    with Record(data_root) as record:
        with Transfer(planner.remote, data_root, record, workers, planner.inline, progress, f"fetch {len(selected)} crop(s)") as transfer:

            def feed(objects: dict, absent: set) -> None:
                decision, updates = decide(objects, absent, record.entries, data_root, refresh)
                for key, entry in [*updates.items(), *((key, {"absent": True}) for key in decision.new_absent)]:
                    record.add(key, entry)
                totals.complete += decision.complete
                totals.changed += decision.changed
                for key, size in decision.fetch:
                    transfer.submit(key, size)

            planner.feed = feed
            try:
                plan = planner.plan(selected, classes)
                transfer.finish()
            except KeyboardInterrupt:
                print(f"interrupted: {transfer.done} objects fetched and recorded; run the same command again to continue", file=sys.stderr)
                raise
            except UnsafeKey as error:
                raise UnsafeKey(f"{error}; fetch stopped, {transfer.done} objects fetched so far are recorded") from None
            except ReproError as error:
                raise type(error)(f"{error}; {transfer.done} objects fetched so far are recorded, run the same command again to continue") from None
        # Left by a killed run; removed only while no other fetch (which may be writing) runs.
        record.when_alone = functools.partial(remove_temporaries, {local_path(data_root, key).parent for key in plan.sizes()})
    return {**_summary(plan), "transferred": transfer.done, "transferred_bytes": transfer.bytes, "seconds": time.monotonic() - started, "complete": totals.complete, "changed": totals.changed}


def _summary(plan: Plan) -> dict:
    return {
        "crops": len(plan.crops),
        "failed": plan.failed,
        "objects": len(plan.sizes()),
        "bytes": sum(size for size, _ in plan.sizes().values()),
        "absent": len(plan.absent),
        "levels": sorted(set(plan.raw_levels.values())),
    }


def _raw_bytes(plan: Plan) -> dict[str, tuple[int, int, int]]:
    """Per raw level: (chunks, bytes, absent chunks)."""
    out = {}
    for level_key, label in sorted(plan.raw_levels.items()):
        prefix = level_key + "/"
        sizes = [size for key, (size, _) in plan.objects.items() if key.startswith(prefix)]
        absent = sum(1 for key in plan.absent if key.startswith(prefix))
        chunks, total, missing = out.get(label, (0, 0, 0))
        out[label] = (chunks + len(sizes), total + sum(sizes), missing + absent)
    return out


def verify_local(data_root: Path) -> tuple[list[str], int]:
    """Recorded objects whose local copy no longer matches (re-hashed; no network), and the count."""
    entries = load_entries(data_root)
    if not entries:
        raise ReproError(f"nothing recorded in {data_root / RECORD_NAME}: fetch something first")
    where = f"object key in the fetch record {data_root / RECORD_NAME}"
    bad = [key for key in sorted(entries) if local_state(entries[key], local_path(data_root, key, where), deep=True) != "ok"]
    return bad, len(entries)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 1e10 else f"{size / 1e9:,.1f} GB"


def _report_failures(result: dict) -> None:
    failed = result["failed"]
    if failed:
        shown = "; ".join(f"crop {crop}: {why}" for crop, why in sorted(failed.items())[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise ReproError(f"{len(failed)} crop(s) could not be fetched ({shown}{more}); the other {result['crops']} are {'planned' if 'to_transfer' in result else 'complete'}")


def run(args: argparse.Namespace) -> int:
    data = settings.data_root(args.data)
    if args.rebuild_record:
        count = rebuild(data)
        print(f"rebuilt {data / RECORD_NAME} from {count} files (chunks absent in the bucket are recorded again by the next fetch)")
        return 0
    if args.verify:
        bad, total = verify_local(data)
        for key in bad[:20]:
            print(f"corrupt or missing: {data / key}")
        if bad:
            print(f"{len(bad)} of {total} recorded objects do not match the record; `cellmap-repro fetch` again repairs them")
            return 1
        print(f"all {total} recorded objects match")
        return 0
    result = fetch(
        data,
        manifest=args.manifest,
        test_manifest=args.test_manifest,
        crops=args.crops,
        datasets=args.datasets,
        classes=args.classes,
        endpoint=args.endpoint_url,
        bucket=args.bucket,
        raw_context_nm=args.raw_context_nm,
        experiments_root=args.experiments_root,
        all_em_levels=args.fetch_all_em_resolutions,
        workers=args.workers,
        dry_run=args.dry_run,
        refresh=args.refresh,
    )
    levels = ", ".join(result["levels"]) or "none"
    if args.dry_run:
        print(f"would fetch {result['crops']} crop(s): raw within {result['context']} of each crop, EM levels {levels}")
        raw_bytes = 0
        for label, (chunks, size, absent) in result["raw"].items():
            raw_bytes += size
            print(f"  raw {label}: {chunks} chunks, {_mb(size)}" + (f"; {absent} chunks do not exist in the bucket" if absent else ""))
        print(f"  labels and metadata: {_mb(result['bytes'] - raw_bytes)}")
        print(f"  total {_mb(result['bytes'])} in {result['objects']} objects; already here {result['complete']}; to transfer {_mb(result['bytes_to_transfer'])} in {result['to_transfer']} objects")
    else:
        rate = result["transferred_bytes"] / 1e6 / max(result["seconds"], 1e-6)
        print(
            f"fetched {result['crops']} crop(s) into {data}: {result['transferred']} objects transferred "
            f"({_mb(result['transferred_bytes'])}, {rate:.1f} MB/s), {result['complete']} already complete, {result['absent']} absent in the bucket; "
            f"raw within {result['context']}, EM levels {levels}"
        )
    if result["changed"]:
        print(f"warning: {len(result['changed'])} object(s) changed upstream since they were fetched (e.g. {result['changed'][0]}); the local copies are kept, `--refresh` fetches the new versions")
    _report_failures(result)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("fetch", help="download CellMap crops and the raw around them from S3 (resumable, verified)", description=__doc__.split("\n\n")[0])
    settings.add_data_argument(parser)
    parser.add_argument("--manifest", default=os.environ.get("CELLMAP_REPRO_CROP_MANIFEST", DEFAULT_MANIFEST), help="crop manifest: path, https:// or s3:// URL (default: the toolbox's manifest.csv; env CELLMAP_REPRO_CROP_MANIFEST)")
    parser.add_argument("--test-manifest", default=os.environ.get("CELLMAP_REPRO_TEST_MANIFEST", DEFAULT_TEST_MANIFEST), help="test-crop manifest, read for --crops all/test or test crop ids (default: the toolbox's test_crop_manifest.csv; env CELLMAP_REPRO_TEST_MANIFEST)")
    parser.add_argument("--crops", default="all", help="'all' (default: every crop and test crop), 'test', or crop ids like 111,112 (test crop ids too)")
    parser.add_argument("--datasets", nargs="+", default=None, help="only crops of these datasets")
    parser.add_argument("--classes", nargs="+", default=None, help="only crops annotating (test crops: scored for) any of these classes")
    parser.add_argument("--endpoint-url", default=os.environ.get("CELLMAP_REPRO_S3_ENDPOINT") or None, help="S3 endpoint (default AWS; env CELLMAP_REPRO_S3_ENDPOINT)")
    parser.add_argument("--bucket", default=os.environ.get("CELLMAP_REPRO_S3_BUCKET") or None, help=f"bucket (default: the manifest's, {DEFAULT_BUCKET}; env CELLMAP_REPRO_S3_BUCKET)")
    parser.add_argument("--raw-context-nm", type=settings.number_flag(0, real=True), default=None, help=f"raw fetched beyond each crop's box, in nm (default: the reach of the widest input window of the experiments, rotated where they rotate; {FALLBACK_WINDOW.reach_nm:.0f} nm for setup04)")
    parser.add_argument("--experiments-root", default=None, help="experiments whose input windows set the default context and EM levels (default: $CELLMAP_REPRO_EXPERIMENTS or ./experiments)")
    parser.add_argument("--fetch-all-em-resolutions", action="store_true", help="fetch raw chunks at every EM scale level, not only those the experiments read")
    parser.add_argument("--workers", type=settings.number_flag(1), default=DEFAULT_WORKERS, help=f"requests in flight (default {DEFAULT_WORKERS})")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and its size; write nothing")
    parser.add_argument("--refresh", action="store_true", help="fetch again objects whose ETag changed upstream (default: keep the local copy and warn)")
    parser.add_argument("--verify", action="store_true", help="re-hash the local copy against the fetch record, offline")
    parser.add_argument("--rebuild-record", action="store_true", help="rebuild a damaged fetch record from the files on disk (hashes them)")
    parser.set_defaults(func=run)
