"""Atomic file output, hashing, locks, confined paths and OME-NGFF 0.4 metadata on zarr v2.

Every stage writes through these helpers so that an interrupted or failed write never
leaves a file or a zarr array that looks complete: files go to a temporary name in the
same directory and are renamed into place; zarr outputs are built in a ``*.partial``
directory and renamed when finished. A failed write names the file it was writing (the
OS names none when a write or fsync fails, e.g. on a full disk).

Paths that come from data (S3 keys, manifest fields, datasplits, zarr level paths) are
joined to their folder through :func:`confined`; a run that writes a folder holds its
:func:`exclusive` lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from cellmap_repro.errors import ReproError

AXES = ("z", "y", "x")
PARTIAL_SUFFIX = ".partial"


def _umask_mode() -> int:
    # mkstemp creates 0600 files; outputs should get the permissions any new file gets.
    # Read the umask where the kernel reports it: setting it to read it races with
    # other threads creating files (fetch writes from many threads).
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("Umask:"))
        return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name ``path`` when writing it fails without the OS naming a file (a failed write,
    fsync or close on a full disk or quota names none)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        advice = " (the disk is full: free space and run again; finished work is kept)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise ReproError(f"cannot write {path}: {exc.strerror or exc}{advice}") from exc


def write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a new file beside ``path``, flushed to disk; the caller renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with writing(path):
            os.chmod(tmp, _umask_mode())
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = write_temporary(path, data)
    try:
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_output_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _umask_mode())
    try:
        with writing(path):
            yield Path(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Build a directory at ``path + '.partial'`` and rename it to ``path`` on success.

    A stale ``.partial`` from an earlier interrupted run is removed first; an existing
    complete ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with writing(path):
            yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, path)


def confined(base: Path, relative: str, what: str, plain: bool = False) -> Path:
    """``base / relative`` for a path read from data, or one clear error naming ``what``.

    Refused: an empty or absolute path, any ``..`` part (``\\`` counts as a separator, as
    in a manifest written on Windows), a NUL byte; with ``plain``, anything but one name.
    Judged on the text alone: data can only choose the text, and a folder the user linked
    into ``base`` on purpose (a dataset on other storage) keeps working.
    """
    text = str(relative)
    parts = text.replace("\\", "/").split("/")  # str.split: fetch checks every object key
    if not text.strip() or text.startswith(("/", "\\")) or ".." in parts or "\0" in text:
        raise ReproError(f"{what} {text!r} is not a path inside {base}; refused")
    if plain and (len(parts) != 1 or text == "."):
        raise ReproError(f"{what} {text!r} is not a plain name inside {base}; refused")
    return (base if isinstance(base, Path) else Path(base)) / text


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while one run writes ``what``.

    flock: released by the kernel when the holder exits, however it exits, so a crashed
    run never leaves a stale lock; the file records the holder's pid and host.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().split()
        handle.close()
        who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 and holder[1] != socket.gethostname() else "") if holder else "pid unknown"
        raise ReproError(f"{what} is in use by another run ({who}; lock {lock_file}): wait for it to finish or stop it") from None
    except OSError as exc:
        handle.close()
        raise ReproError(f"cannot lock {lock_file} ({exc.strerror}): the file system must support flock") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ScaleLevel:
    """One level of an OME-NGFF multiscale group: array path, voxel size and offset (nm, zyx)."""

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


def multiscale_attrs(levels: Sequence[ScaleLevel], name: str | None = None) -> dict:
    """OME-NGFF 0.4 ``multiscales`` attributes for a group holding ``levels``."""
    # Imported here: pydantic-ome-ngff takes most of a second, which every CLI start paid.
    from pydantic_ome_ngff.v04.axis import Axis
    from pydantic_ome_ngff.v04.multiscale import Dataset, MultiscaleMetadata
    from pydantic_ome_ngff.v04.transform import VectorScale, VectorTranslation

    metadata = MultiscaleMetadata(
        version="0.4",
        name=name,
        axes=[Axis(name=a, type="space", unit="nanometer") for a in AXES],
        datasets=[
            Dataset(
                path=level.path,
                coordinateTransformations=(
                    VectorScale(type="scale", scale=[float(s) for s in level.scale]),
                    VectorTranslation(
                        type="translation", translation=[float(t) for t in level.translation]
                    ),
                ),
            )
            for level in levels
        ],
    )
    return {"multiscales": [metadata.model_dump(mode="json", exclude_none=True)]}


def read_levels(group_path: Path | str, where: str | None = None) -> list[ScaleLevel]:
    """Scale levels of an OME-NGFF multiscale group on disk, finest first."""
    group_path = Path(group_path)
    attrs_file = group_path / ".zattrs"
    label = where or str(group_path)
    if not attrs_file.exists():
        raise ReproError(f"{label}: not a multiscale zarr group (no .zattrs at {group_path})")
    try:
        attrs = json.loads(attrs_file.read_text())
        datasets = attrs["multiscales"][0]["datasets"]
        levels = []
        for entry in datasets:
            transforms = {t["type"]: t for t in entry["coordinateTransformations"]}
            scale = tuple(float(s) for s in transforms["scale"]["scale"])
            translation = tuple(
                float(t) for t in transforms.get("translation", {"translation": [0.0] * len(scale)})["translation"]
            )
            if len(translation) != len(scale) or not all(math.isfinite(s) and s > 0 for s in scale) or not all(map(math.isfinite, translation)):
                raise ValueError(f"level {entry['path']!r}: scale {list(scale)} must be positive and translation {list(translation)} finite, one per axis")
            levels.append(ScaleLevel(str(entry["path"]), scale, translation))
    except (KeyError, IndexError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ReproError(f"{label}: malformed OME-NGFF multiscales attributes in {attrs_file} ({exc})") from None
    for level in levels:
        confined(group_path, level.path, f"{label}: level path in {attrs_file}")
    return sorted(levels, key=lambda level: max(level.scale))


def level_for(levels: Sequence[ScaleLevel], scale: Sequence[float]) -> ScaleLevel:
    """The level a reader at voxel size ``scale`` uses: the coarsest no coarser than ``scale``
    on any axis, else the finest (cellmap-data's rule)."""
    chosen = levels[0]
    for level in levels:
        if any(s > t for s, t in zip(level.scale, scale)):
            break
        chosen = level
    return chosen


def check_array(group_path: Path, level: ScaleLevel) -> dict:
    """The ``.zarray`` metadata of one level, or one clear error naming the array."""
    array_path = Path(group_path) / level.path
    zarray = array_path / ".zarray"
    if not zarray.is_file():
        raise ReproError(f"{array_path}: not a zarr array (no .zarray; a partial download? fetch the crop again)")
    try:
        meta = json.loads(zarray.read_text())
        shape = [int(n) for n in meta["shape"]]
        chunks = [int(n) for n in meta["chunks"]]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ReproError(f"{zarray}: malformed zarr array metadata ({exc})") from None
    if len(shape) != len(level.scale) or len(chunks) != len(shape):
        raise ReproError(f"{array_path}: {len(shape)}-d array, but its multiscales metadata has {len(level.scale)} axes")
    return meta


def read_region(array, selection: tuple):
    """``array[selection]`` of a zarr v2 array; a chunk that does not decode (truncated,
    corrupt) is one clear error naming its file."""
    try:
        return array[selection]
    except Exception as exc:  # codecs raise zlib.error, RuntimeError, ValueError, ...
        chunk = _undecodable_chunk(array, selection)
        where = chunk or f"{getattr(array.store, 'path', array.store)}/{array.path}"
        raise ReproError(f"{where}: corrupt or truncated chunk ({type(exc).__name__}: {str(exc)[:120]}); fetch it again (`cellmap-repro fetch --verify` finds and repairs fetched crops)") from exc


def _undecodable_chunk(array, selection: tuple) -> str | None:
    import itertools

    ranges = []
    for axis, part in enumerate(selection):
        start, stop, _ = part.indices(array.shape[axis]) if isinstance(part, slice) else (int(part), int(part) + 1, 1)
        ranges.append(range(start // array.chunks[axis], max(start, stop - 1) // array.chunks[axis] + 1))
    for coords in itertools.product(*ranges):
        key = array._chunk_key(coords)
        try:
            data = array.chunk_store[key]
            if _blosc_length_wrong(array, data):
                raise ValueError("shorter or longer than its header says")
            array._decode_chunk(data)
        except KeyError:
            continue  # absent chunk: fill value
        except Exception:  # noqa: BLE001 - this is the broken one
            return f"{getattr(array.chunk_store, 'path', '')}/{key}"
    return None


def _blosc_length_wrong(array, data) -> bool:
    """A Blosc chunk whose header disagrees with its length: c-blosc reads past the end of
    a truncated buffer, so decoding it may fail or not, but its header tells."""
    from numcodecs import Blosc
    from numcodecs.blosc import cbuffer_sizes

    if not isinstance(array.compressor, Blosc) or array.filters:
        return False
    try:
        return cbuffer_sizes(bytes(data))[1] != len(data)
    except Exception:  # noqa: BLE001 - not even a header
        return True


def find_level(levels: Sequence[ScaleLevel], scale: Sequence[float], where: str) -> ScaleLevel:
    """The level whose voxel size equals ``scale`` (within 1 %), or a clear error."""
    for level in levels:
        if all(abs(a - b) <= 0.01 * b for a, b in zip(level.scale, scale)):
            return level
    available = ", ".join(f"{l.path}={list(l.scale)}" for l in levels) or "none"
    raise ReproError(
        f"{where}: no scale level with voxel size {list(scale)} nm (available: {available})"
    )
