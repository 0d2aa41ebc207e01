"""Read a submission (zip or zarr) or a ground-truth zarr with the toolbox's tolerance, never changing it.

The challenge's evaluator accepts: a zip file; a folder holding exactly one zip; a zarr
folder; in either, the zarr nested in sub-folders (exactly one ``*.zarr`` below the root);
crop folders named ``crop<id>`` or just ``<id>``; groups without ``.zgroup``; arrays without
``voxel_size`` (aliases ``resolution``, ``scale``) or ``translation`` (alias ``offset``); and
OME-NGFF multiscale groups or plain groups of levels, of which it picks one. It unzips and
moves files to get there; here a zip is read member by member where it lies, and nothing
under either root is written. Zip members with absolute paths, ``..`` parts or symbolic
links are refused, as the toolbox refuses to extract them.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellmap_repro.errors import ReproError

VOXEL_SIZE_KEYS = ("voxel_size", "resolution", "scale")
TRANSLATION_KEYS = ("translation", "offset")
METADATA_FILES = (".zarray", ".zgroup", ".zattrs")


@dataclass(frozen=True)
class Level:
    """One readable array and where it sits: voxel size and translation (nm) when known."""

    path: str
    voxel_size: tuple[float, ...] | None
    translation: tuple[float, ...] | None


def _attribute(attrs: dict, keys, where: str) -> tuple[float, ...] | None:
    for key in keys:
        if key in attrs:
            try:
                return tuple(float(v) for v in attrs[key])
            except (TypeError, ValueError):
                raise ReproError(f"{where}: attribute '{key}' must be a list of numbers, got {attrs[key]!r}") from None
    return None


def _safe_member(info: zipfile.ZipInfo, zip_path: Path) -> str:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ReproError(f"{zip_path}: member {name!r} points outside the archive (absolute path or '..'); refusing the zip")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ReproError(f"{zip_path}: member {name!r} is a symbolic link; refusing the zip")
    return name


class Tree:
    """A read-only zarr v2 hierarchy in a folder or in a zip, addressed by '/'-separated paths."""

    def __init__(self, source: Path):
        self.source = Path(source)
        self.prefix = ""
        self._zip: zipfile.ZipFile | None = None
        self._store = None
        if self.source.is_file():
            if not zipfile.is_zipfile(self.source):
                raise ReproError(f"{self.source}: neither a zip file nor a zarr folder")
            try:
                self._zip = zipfile.ZipFile(self.source)
                files = [_safe_member(info, self.source) for info in self._zip.infolist() if not info.is_dir()]
            except zipfile.BadZipFile as exc:
                raise ReproError(f"{self.source}: corrupt zip ({exc})") from None
            self._files = set(files)
            self._dirs = {posixpath.dirname(f) for f in self._files}
            for directory in list(self._dirs):
                while directory:
                    directory = posixpath.dirname(directory)
                    self._dirs.add(directory)
            self._dirs.discard("")
        elif not self.source.is_dir():
            raise ReproError(f"{self.source}: not found")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _full(self, path: str) -> str:
        return posixpath.join(self.prefix, path).strip("/") if path else self.prefix

    # ------------------------------------------------------------ listing

    def all_dirs(self) -> list[str]:
        """Every folder below the root (relative, '/'-separated)."""
        if self._zip is not None:
            return sorted(d for d in self._dirs if d != self.prefix and d.startswith(self.prefix))
        found = []
        for here, dirs, _ in os.walk(self.source):
            for name in dirs:
                found.append(Path(here, name).relative_to(self.source).as_posix())
        return sorted(found)

    def children(self, path: str = "") -> list[str]:
        """Names of the folders directly inside ``path``, sorted."""
        full = self._full(path)
        if self._zip is not None:
            inside = [d[len(full) + 1 :] if full else d for d in self._dirs if not full or d.startswith(full + "/")]
            return sorted({d.split("/")[0] for d in inside})
        folder = self.source / full
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def exists(self, path: str) -> bool:
        full = self._full(path)
        if self._zip is not None:
            return full in self._dirs or full in self._files
        return (self.source / full).exists()

    def read_json(self, path: str) -> dict:
        """A metadata file's JSON, {} when the file is absent."""
        full = self._full(path)
        try:
            if self._zip is not None:
                if full not in self._files:
                    return {}
                text = self._zip.read(full)
            else:
                file = self.source / full
                if not file.is_file():
                    return {}
                text = file.read_bytes()
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReproError(f"{self.where(path)}: malformed JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ReproError(f"{self.where(path)}: expected a JSON object")
        return value

    def is_array(self, path: str) -> bool:
        full = posixpath.join(self._full(path), ".zarray")
        return full in self._files if self._zip is not None else (self.source / full).is_file()

    def attrs(self, path: str) -> dict:
        return self.read_json(posixpath.join(path, ".zattrs"))

    def where(self, path: str) -> str:
        inside = self._full(path)
        return f"{self.source}:{inside}" if self._zip is not None else str(self.source / inside)

    def array(self, path: str):
        """The zarr array at ``path``, opened read-only (data is read on slicing)."""
        import zarr

        if self._zip is not None:
            if self._store is None:
                self._store = zarr.ZipStore(str(self.source), mode="r")
            opened = lambda: zarr.open_array(store=self._store, path=self._full(path), mode="r")  # noqa: E731
        else:
            opened = lambda: zarr.open_array(str(self.source / self._full(path)), mode="r")  # noqa: E731
        try:
            array = opened()
        except Exception as exc:  # zarr raises several types for a broken array
            raise ReproError(f"{self.where(path)}: cannot open the zarr array ({type(exc).__name__}: {exc})") from None
        if array.ndim != 3 or 0 in array.shape:
            raise ReproError(f"{self.where(path)}: array has shape {list(array.shape)}, expected a non-empty 3-d volume")
        return array


def open_submission(path: Path) -> tuple[Tree, list[str]]:
    """The submission's zarr root, and notes on what was tolerated (for the report)."""
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        zips = sorted(p for p in path.iterdir() if p.is_file() and zipfile.is_zipfile(p))
        if len(zips) > 1:
            raise ReproError(f"{path}: holds {len(zips)} zip files; give the one to score")
        if zips:
            notes.append(f"{path} holds one zip, {zips[0].name}: scoring that")
            path = zips[0]
    tree = Tree(path)
    nested = [d for d in tree.all_dirs() if d.endswith(".zarr")]
    if len(nested) > 1:
        tree.close()
        raise ReproError(f"{path}: holds {len(nested)} zarr folders ({', '.join(nested[:3])}); a submission holds one")
    if nested:
        tree.prefix = nested[0]
        notes.append(f"the zarr sits in a sub-folder, {nested[0]}: scoring that")
    return tree, notes


def open_truth(path: Path) -> Tree:
    path = Path(path)
    if not path.is_dir():
        raise ReproError(f"ground truth {path}: not a zarr folder")
    return Tree(path)


def match_crops(submitted: list[str], truth: list[str]) -> tuple[dict[str, str], list[str]]:
    """Truth crop → submitted folder; crops without a prediction.

    As the toolbox does: names are matched as they are; only where none match is the
    "crop" prefix added to every submitted name.
    """
    found = {name: name for name in truth if name in submitted}
    if not found:
        found = {f"crop{name}": name for name in submitted if f"crop{name}" in truth}
        if not found:
            raise ReproError(f"no submitted crop matches the ground truth's ({', '.join(truth[:5])}{', ...' if len(truth) > 5 else ''}); submitted folders: {', '.join(submitted[:5]) or 'none'}")
    return found, [name for name in truth if name not in found]


# ---------------------------------------------------------------- picking a level


def _spatial_axes(multiscale: dict) -> list[str]:
    names = []
    for axis in multiscale.get("axes", []):
        if isinstance(axis, dict):
            if axis.get("type", "space") == "space":
                names.append(axis.get("name"))
        else:
            names.append(str(axis))
    return names or ["z", "y", "x"]


def multiscale_levels(attrs: dict, where: str) -> list[Level]:
    """Levels of an OME-NGFF multiscale group in listed order; voxel size None if no scale."""
    try:
        multiscale = attrs["multiscales"][0]
        levels = []
        for dataset in multiscale["datasets"]:
            transforms = {t.get("type"): t for t in dataset.get("coordinateTransformations", [])}
            scale = transforms.get("scale", {}).get("scale")
            translation = transforms.get("translation", {}).get("translation")
            levels.append(Level(dataset["path"], tuple(float(v) for v in scale) if scale else None, tuple(float(v) for v in translation) if translation else None))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ReproError(f"{where}: malformed OME-NGFF multiscales attributes ({type(exc).__name__}: {exc})") from None
    if not levels:
        raise ReproError(f"{where}: OME-NGFF multiscales list no datasets")
    return levels


def closest_multiscale_level(attrs: dict, target_voxel_size, where: str) -> Level:
    """The level cellmap-data's ``CellMapImage`` picks (the toolbox's OME-NGFF path).

    Smallest sum over z, y, x of |level − target| / target; the first level wins a tie.
    """
    levels = multiscale_levels(attrs, where)
    axes = _spatial_axes(attrs["multiscales"][0])
    target = dict(zip("zyx", (float(v) for v in target_voxel_size)))
    best, best_score = levels[0], math.inf
    for level in levels:
        sizes = dict(zip(axes, level.voxel_size[-len(axes):])) if level.voxel_size else {}
        score = sum(abs(sizes[a] - target[a]) / max(target[a], 1e-9) for a in "zyx" if a in sizes)
        if score < best_score:
            best, best_score = level, score
    return best


def closest_plain_level(tree: Tree, group: str, target_voxel_size) -> Level:
    """The array of a plain (non-OME) group the toolbox picks.

    Smallest Euclidean distance between voxel sizes, plus 10⁶ if coarser than the target on
    any axis; arrays without a voxel size only if nothing else; first in name order on a tie.
    """
    target = np.asarray(target_voxel_size, float)
    best, best_score = None, math.inf
    for name in tree.children(group):
        path = posixpath.join(group, name)
        if not tree.is_array(path):
            continue
        attrs = tree.attrs(path)
        voxel_size = _attribute(attrs, VOXEL_SIZE_KEYS, tree.where(path))
        translation = _attribute(attrs, TRANSLATION_KEYS, tree.where(path))
        if voxel_size is None:
            score = 1e18
        else:
            sizes = np.asarray(voxel_size, float)[-len(target):]
            score = float(np.linalg.norm(sizes - target)) + (0.0 if np.all(sizes <= target) else 1e6)
        if score < best_score:
            best, best_score = Level(path, voxel_size, translation), score
    if best is None:
        raise ReproError(f"{tree.where(group)}: a group without arrays")
    return best


def pick_level(tree: Tree, path: str, target_voxel_size) -> tuple[Level, str]:
    """The array to score for one label, and its kind: "array", "multiscale" or "group"."""
    if tree.is_array(path):
        attrs = tree.attrs(path)
        where = tree.where(path)
        return Level(path, _attribute(attrs, VOXEL_SIZE_KEYS, where), _attribute(attrs, TRANSLATION_KEYS, where)), "array"
    attrs = tree.attrs(path)
    if "multiscales" in attrs:
        level = closest_multiscale_level(attrs, target_voxel_size, tree.where(path))
        return Level(posixpath.join(path, level.path), level.voxel_size, level.translation), "multiscale"
    return closest_plain_level(tree, path, target_voxel_size), "group"


def labels(tree: Tree, crop: str) -> list[str]:
    """Label folders of a crop: arrays and groups (multiscale or plain)."""
    return [name for name in tree.children(crop) if tree.is_array(posixpath.join(crop, name)) or tree.children(posixpath.join(crop, name))]


def truth_grid(tree: Tree, path: str) -> tuple[Level, str]:
    """A ground-truth label's finest array with voxel size and translation, both required."""
    if tree.is_array(path):
        level, kind = pick_level(tree, path, (1.0, 1.0, 1.0))
    else:
        attrs = tree.attrs(path)
        if "multiscales" not in attrs:
            raise ReproError(f"{tree.where(path)}: ground truth must be an array with voxel_size/translation attributes or an OME-NGFF multiscale group")
        levels = multiscale_levels(attrs, tree.where(path))
        finest = min((l for l in levels if l.voxel_size), key=lambda l: max(l.voxel_size), default=levels[0])
        level, kind = Level(posixpath.join(path, finest.path), finest.voxel_size, finest.translation), "multiscale"
    if level.voxel_size is None:
        raise ReproError(f"{tree.where(path)}: ground truth without a voxel size (attribute voxel_size, resolution or scale)")
    if level.translation is None:
        raise ReproError(f"{tree.where(path)}: ground truth without a translation (attribute translation or offset)")
    return level, kind
