"""What `cellmap-repro fetch` wrote into a data root, and whether a model window was fetched.

The record is ``<data>/.cellmap-repro-fetch.json`` (a snapshot: object key -> entry) plus
append-only journals ``<data>/.cellmap-repro-fetch.<host>-<pid>-<ns>.journal``, one JSON
line per object, written by each running fetch after the object's file is in place. A
save therefore costs one small ``write`` per object, whatever the size of the record; a
fetch folds the journals into the snapshot when it starts or ends while no other fetch
holds the lock file ``<data>/.cellmap-repro-fetch.lock`` (``flock``: fetches share it,
folding takes it alone). A crash can cut a journal's last line short: that line is
dropped and its object is fetched again.

Entries: ``{"size", "md5", "etag", "mtime_ns"}`` for a fetched object (a rerun skips it
when size and mtime still match, without reading it), ``{"absent": true}`` for a raw chunk
that the bucket itself never wrote (it reads as the fill value).

:func:`require_fetched` lets training and prediction stop with one line when a model
window falls on raw chunks that were never fetched, using only this record, the array's
``.zarray`` and ``stat`` (no chunk data is read).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cellmap_repro.errors import ReproError

RECORD_NAME = ".cellmap-repro-fetch.json"
LOCK_NAME = ".cellmap-repro-fetch.lock"
JOURNAL_PREFIX = ".cellmap-repro-fetch."
JOURNAL_SUFFIX = ".journal"
FORMAT = "cellmap-repro fetch record 2"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def rebuild_hint(data_root: Path) -> str:
    return f"`cellmap-repro fetch --data {data_root} --rebuild-record` rebuilds it from the files"


def journals(data_root: Path) -> list[Path]:
    """Journal files, oldest first (their names end in the creation time)."""
    found = [p for p in data_root.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}")]
    return sorted(found, key=lambda p: (p.name.rsplit("-", 1)[-1].removesuffix(JOURNAL_SUFFIX).zfill(24), p.name))


def load_entries(data_root: Path) -> dict[str, dict]:
    """Snapshot plus journals; a damaged record is one clear error."""
    data_root = Path(data_root)
    snapshot = data_root / RECORD_NAME
    entries: dict[str, dict] = {}
    if snapshot.exists():
        try:
            loaded = json.loads(snapshot.read_text())
            entries = loaded["entries"] if loaded.get("format") == FORMAT else loaded  # version 1: a flat dict
            if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
                raise ValueError("not a mapping of object keys to entries")
        except (ValueError, AttributeError, KeyError, UnicodeDecodeError) as exc:
            raise ReproError(f"fetch record {snapshot} is damaged ({type(exc).__name__}: {str(exc)[:80]}); {rebuild_hint(data_root)}") from None
    for journal in journals(data_root):
        _replay(journal, entries, data_root)
    return entries


def _replay(journal: Path, entries: dict, data_root: Path) -> None:
    # A crash mid-write leaves at most the last line short (no newline after it): drop it.
    complete = journal.read_bytes().split(b"\n")[:-1]
    for number, line in enumerate(complete, start=1):
        try:
            item = json.loads(line)
            entries[item.pop("key")] = item
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReproError(f"fetch record journal {journal} is damaged at line {number}; {rebuild_hint(data_root)}") from None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def write_snapshot(data_root: Path, entries: dict) -> None:
    from cellmap_repro.storage import atomic_write_bytes

    payload = json.dumps({"format": FORMAT, "entries": entries}, separators=(",", ":"), sort_keys=True)
    atomic_write_bytes(data_root / RECORD_NAME, payload.encode())


def fold(data_root: Path) -> dict[str, dict]:
    """Journals into the snapshot; call with the lock held alone."""
    found = journals(data_root)
    entries = load_entries(data_root)
    if found:
        write_snapshot(data_root, entries)
        for journal in found:
            journal.unlink()
    return entries


class Record:
    """The record of one running fetch: shared lock, own journal, fold when alone.

    ``with Record(data) as record:`` loads every entry; ``record.add`` appends one line.
    """

    def __init__(self, data_root: Path, when_alone=None):
        self.data_root = Path(data_root)
        self.when_alone = when_alone  # called at the end if no other fetch runs then (e.g. tidying)
        self.entries: dict[str, dict] = {}
        self.added = 0
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self.journal: Path | None = None

    def __enter__(self) -> "Record":
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.data_root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if _try_lock(self._lock_fd, fcntl.LOCK_EX):
                self.entries = fold(self.data_root)
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            else:  # another fetch runs: share the root with it
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
                self.entries = load_entries(self.data_root)
            name = f"{JOURNAL_PREFIX}{socket.gethostname()}-{os.getpid()}-{time.time_ns()}{JOURNAL_SUFFIX}"
            self.journal = self.data_root / name
            self._journal_fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except BaseException:
            self._release()
            raise
        return self

    def add(self, key: str, entry: dict) -> None:
        line = (json.dumps({"key": key, **entry}, separators=(",", ":")) + "\n").encode()
        with self._mutex:
            if self._journal_fd is None:
                return  # closed after an interruption: the object is fetched again next time
            try:
                if os.write(self._journal_fd, line) != len(line):  # a full disk can cut a write short
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                # Nothing may follow a cut line (it would read as damage): this journal is done.
                os.close(self._journal_fd)
                self._journal_fd = None
                if exc.errno in DISK_FULL:
                    raise ReproError(f"disk full while writing the fetch record {self.journal} (after {self.data_root / key}); free space") from None
                raise
            self.entries[key] = entry
            self.added += 1

    def __exit__(self, *exc_info) -> None:
        with self._mutex:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
        try:
            if _try_lock(self._lock_fd, fcntl.LOCK_EX):
                with contextlib.suppress(OSError, ReproError):
                    # A full disk keeps the journals, which are the record until the next fold.
                    fold(self.data_root)
                if self.when_alone is not None:
                    self.when_alone()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


@contextlib.contextmanager
def exclusive(data_root: Path):
    """Hold the record alone (verify, rebuild); one line if a fetch is running."""
    fd = os.open(Path(data_root) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd, fcntl.LOCK_EX):
            raise ReproError(f"a fetch into {data_root} is running; wait for it to finish")
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def md5_file(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def local_state(entry: dict | None, local: Path, deep: bool = False) -> str:
    """'ok', 'touched' (size matches, mtime does not: hash to decide) or 'missing'/'differs'."""
    if entry is None:
        return "missing"
    try:
        stat = local.stat()
    except FileNotFoundError:
        return "ok" if entry.get("absent") else "missing"
    if entry.get("absent"):
        return "differs"  # the bucket had nothing there; this file came from elsewhere
    if stat.st_size != entry["size"]:
        return "differs"
    if deep:
        return "ok" if md5_file(local) == entry["md5"] else "differs"
    return "ok" if stat.st_mtime_ns == entry.get("mtime_ns") else "touched"


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_temporaries(folders: Iterable[Path]) -> int:
    """Delete the temporary files a killed fetch left (call only while no fetch runs)."""
    removed = 0
    for folder in folders:
        for path in Path(folder).glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def rebuild(data_root: Path, progress: bool = True) -> int:
    """A new record from the files under ``<data>/<dataset>/<dataset>.zarr`` (hashes every file)."""
    from tqdm import tqdm

    data_root = Path(data_root)
    with exclusive(data_root):
        files = [p for container in sorted(data_root.glob("*/*.zarr")) for p in sorted(container.rglob("*")) if p.is_file() and not is_temporary(p)]
        entries = {}
        for path in tqdm(files, desc="hashing", unit="file", disable=not progress):
            stat = path.stat()
            md5 = md5_file(path)
            entries[path.relative_to(data_root).as_posix()] = {"size": stat.st_size, "md5": md5, "etag": md5, "mtime_ns": stat.st_mtime_ns}
        for old in [data_root / RECORD_NAME, *journals(data_root)]:
            if old.exists():
                os.replace(old, old.with_name(old.name + ".damaged"))
        write_snapshot(data_root, entries)
    return len(entries)


# --- geometry shared by fetch (what to download) and train/predict (what was downloaded) ---


def window_reach_nm(shape: Sequence[int], scale: Sequence[float], rotates: bool) -> float:
    """How far beyond a sample's centre a model input window reads, in nm.

    Rotated windows (cellmap-data's ``rotate`` augmentation) reach half their diagonal;
    one voxel more covers the interpolation at the edge.
    """
    extent = np.asarray(shape, float) * np.asarray(scale, float)
    half = 0.5 * float(np.linalg.norm(extent)) if rotates else 0.5 * float(extent.max())
    return half + float(max(scale))


def level_read_for(levels, target_scale: Sequence[float]):
    """The scale level cellmap-data reads for ``target_scale``: the coarsest not coarser than it."""
    chosen = levels[0]
    for level in levels:
        if any(s > t * (1 + 1e-6) for s, t in zip(level.scale, target_scale)):
            break
        chosen = level
    return chosen


def voxel_box(low_nm, high_nm, translation, scale) -> tuple[np.ndarray, np.ndarray]:
    """Index range [start, stop) of every voxel of a level touching the world box [low, high)."""
    low, high = np.asarray(low_nm, float), np.asarray(high_nm, float)
    translation, scale = np.asarray(translation, float), np.asarray(scale, float)
    start = np.floor((low - translation) / scale + 0.5 + 1e-9).astype(int)
    stop = np.ceil((high - translation) / scale - 0.5 - 1e-9).astype(int)
    return start, np.maximum(stop, start)


def chunk_key(array_key: str, index: Iterable[int], separator: str) -> str:
    return f"{array_key}/{separator.join(str(int(i)) for i in index)}"


# --- coverage check -------------------------------------------------------------------------


class _Index:
    def __init__(self, entries: dict[str, dict]):
        self.present = {k for k, v in entries.items() if not v.get("absent")}
        self.absent = {k for k, v in entries.items() if v.get("absent")}


_index_cache: dict[Path, tuple[tuple, _Index]] = {}


def _record_root(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if (parent / RECORD_NAME).exists() or (parent / LOCK_NAME).exists():
            return parent
    return None


def _index_for(root: Path) -> _Index:
    files = [root / RECORD_NAME, *journals(root)]
    signature = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())
    cached = _index_cache.get(root)
    if cached is None or cached[0] != signature:
        cached = (signature, _Index(load_entries(root)))
        _index_cache[root] = cached
    return cached[1]


def require_fetched(array_dir: Path, boxes, crop_id: int | None, context_nm: float, where: str, around: str | None = None) -> None:
    """Stop with one line if a voxel box of ``array_dir`` lies on never-fetched chunks.

    ``boxes``: (start, stop) voxel index ranges the model reads. Arrays that no fetch
    recorded (e.g. the generated tiny crop) are taken as complete. Where the bucket itself
    has no chunk (recorded absent), one warning gives the fraction that reads as fill value.
    ``around`` names what is read instead of ``crop <crop_id>`` (a whole-volume region,
    which fetch cannot bring: the error then says so instead of naming a fetch command).
    """
    array_dir = Path(array_dir).absolute()
    root = _record_root(array_dir)
    if root is None:
        return
    index = _index_for(root)
    array_key = array_dir.relative_to(root).as_posix()
    if f"{array_key}/.zarray" not in index.present:
        return
    meta = json.loads((array_dir / ".zarray").read_text())
    shape, chunks = np.array(meta["shape"]), np.array(meta["chunks"])
    separator = meta.get("dimension_separator") or "."
    total = absent = missing = 0
    for start, stop in boxes:
        low, high = np.clip(np.asarray(start), 0, shape), np.clip(np.asarray(stop), 0, shape)
        if np.any(high <= low):
            continue
        first, last = low // chunks, (high - 1) // chunks
        for offset in np.ndindex(*(last - first + 1)):
            chunk = first + np.array(offset)
            overlap = int(np.prod(np.minimum(high, (chunk + 1) * chunks) - np.maximum(low, chunk * chunks)))
            key = chunk_key(array_key, chunk, separator)
            total += overlap
            if key in index.present:
                continue
            if key in index.absent:
                absent += overlap
            elif not (root / key).exists():
                missing += overlap
    subject = around or f"crop {crop_id}"
    if missing:
        if around is not None:
            raise ReproError(f"{where}: {100 * missing / total:.0f}% of the raw that the model reads around {subject} was never fetched ({array_dir}); `cellmap-repro fetch` brings crops and their context only: copy the dataset's raw level into the data root first")
        hint = f"cellmap-repro fetch --crops {crop_id} --raw-context-nm {math.ceil(context_nm)}"
        level_prefix = array_key + "/"
        if not any(k.startswith(level_prefix) and not k.rsplit("/", 1)[-1].startswith(".") for k in index.present | index.absent):
            hint += " --fetch-all-em-resolutions"
        raise ReproError(f"{where}: {100 * missing / total:.0f}% of the raw that the model reads around {subject} was never fetched ({array_dir}); run `{hint}`")
    if absent:
        print(f"warning: {where}: {100 * absent / total:.1f}% of the raw that the model reads around {subject} does not exist in the bucket (reads as the fill value; {array_dir})")


def label_box_nm(label_group: Path) -> tuple[np.ndarray, np.ndarray]:
    """World box (nm) of a crop's label array: s0 voxel edges."""
    from cellmap_repro.storage import read_levels

    level = read_levels(label_group)[0]
    shape = np.array(json.loads((Path(label_group) / level.path / ".zarray").read_text())["shape"])
    low = np.array(level.translation) - np.array(level.scale) / 2
    return low, low + np.array(level.scale) * shape


def require_window_fetched(raw_group: Path, label_group: Path, crop_id: int, input_shape, input_scale, rotates: bool, where: str) -> None:
    """Training: every window centred in the crop (rotated or not) lies on fetched raw."""
    from cellmap_repro.storage import read_levels

    level = level_read_for(read_levels(raw_group), input_scale)
    reach = window_reach_nm(input_shape, input_scale, rotates)
    low, high = label_box_nm(label_group)
    start, stop = voxel_box(low - reach, high + reach, level.translation, level.scale)
    require_fetched(Path(raw_group) / level.path, [(start, stop)], crop_id, reach, where)


def require_tiles_fetched(array_dir: Path, grid_start, grid_shape, in_shape, out_shape, scale, crop_id: int | None, where: str, around: str | None = None) -> None:
    """Prediction: the raw every output voxel of the crop (or region) depends on lies on fetched raw."""
    context = np.asarray(in_shape) - np.asarray(out_shape)
    start = np.asarray(grid_start) - context // 2
    stop = np.asarray(grid_start) + np.asarray(grid_shape) + context - context // 2
    reach = float(np.max((context - context // 2) * np.asarray(scale))) + float(max(scale))
    require_fetched(array_dir, [(start, stop)], crop_id, reach, where, around)
