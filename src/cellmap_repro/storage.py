"""Atomic file output, hashing, and OME-NGFF 0.4 multiscale metadata on zarr v2.

Every stage writes through these helpers so that an interrupted or failed write never
leaves a file or a zarr array that looks complete: files go to a temporary name in the
same directory and are renamed into place; zarr outputs are built in a ``*.partial``
directory and renamed when finished. Paths that come from data (S3 keys, manifest
fields, zarr level paths) are joined to their folder through :func:`confined`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _umask_mode())
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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
            levels.append(ScaleLevel(entry["path"], scale, translation))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ReproError(f"{label}: malformed OME-NGFF multiscales attributes in {attrs_file} ({exc})") from None
    for level in levels:
        confined(group_path, level.path, f"{label}: level path in {attrs_file}")
    return sorted(levels, key=lambda level: max(level.scale))


def find_level(levels: Sequence[ScaleLevel], scale: Sequence[float], where: str) -> ScaleLevel:
    """The level whose voxel size equals ``scale`` (within 1 %), or a clear error."""
    for level in levels:
        if all(abs(a - b) <= 0.01 * b for a, b in zip(level.scale, scale)):
            return level
    available = ", ".join(f"{l.path}={list(l.scale)}" for l in levels) or "none"
    raise ReproError(
        f"{where}: no scale level with voxel size {list(scale)} nm (available: {available})"
    )
