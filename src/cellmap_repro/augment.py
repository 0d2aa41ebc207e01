"""Spatial augmentation and windowed reading: cellmap-data's sampling semantics, fast.

cellmap-data 2026.2.28.30 draws a sample's mirror / transpose / rotation from torch's
RNG and then reads the window through ``xarray.interp`` in float64, which costs seconds
per 216³ window. Here the same draws (same order, same parameter ranges) describe an
affine map from output voxel to source voxel, and the source is read once as a block of
its stored dtype and interpolated in torch:

* raw, rotated: trilinear (``grid_sample``), 0 outside the array's voxel centres, as
  ``interp(method="linear")`` followed by ``NaNtoNum`` gives;
* labels, rotated: nearest voxel, ties to the lower index, NaN outside the centres
  (``interp(method="nearest")``);
* unrotated (mirror / transpose only), raw and labels: nearest per axis with ties to the
  higher index and a tolerance of half the voxel diagonal, fill 0 (raw) or NaN (labels),
  as ``reindex(method="nearest", tolerance=...)`` does.

Transposition permutes the sampled array afterwards, as cellmap-data does.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

AXES = "zyx"


@dataclass(frozen=True)
class Augmentation:
    """One sample's spatial transforms, in cellmap-data's terms."""

    mirror: tuple[str, ...] = ()
    permutation: tuple[int, ...] | None = None
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)  # degrees about z, y, x

    @property
    def rotated(self) -> bool:
        return any(a != 0 for a in self.angles)

    def matrix(self) -> np.ndarray:
        """World-offset map of the output grid: rotation after mirroring (zyx)."""
        from scipy.spatial.transform import Rotation

        signs = np.array([-1.0 if axis in self.mirror else 1.0 for axis in AXES])
        rotation = Rotation.from_rotvec(list(self.angles), degrees=True).as_matrix() if self.rotated else np.eye(3)
        return rotation * signs[None, :]


NO_AUGMENTATION = Augmentation()


def draw(spatial_transforms: Mapping | None) -> Augmentation:
    """Draw a sample's transforms from torch's global RNG, exactly as cellmap-data does."""
    import torch

    if not spatial_transforms:
        return NO_AUGMENTATION
    mirror: tuple[str, ...] = ()
    permutation = None
    angles = {axis: 0.0 for axis in AXES}
    for kind, params in spatial_transforms.items():
        if kind == "mirror":
            mirror = tuple(axis for axis, p in params["axes"].items() if torch.rand(1).item() < p)
        elif kind == "transpose":
            order = {axis: i for i, axis in enumerate(AXES)}
            chosen = [order[a] for a in params["axes"]]
            shuffled = [chosen[i] for i in torch.randperm(len(chosen))]
            order.update({axis: shuffled[i] for i, axis in enumerate(params["axes"])})
            permutation = tuple(order[a] for a in AXES)
        elif kind == "rotate":
            for axis, (low, high) in params["axes"].items():
                angles[axis] = torch.rand(1).item() * (high - low) + low
        else:
            raise ValueError(f"unknown spatial transform {kind!r} (known: mirror, transpose, rotate)")
    return Augmentation(mirror, permutation, tuple(angles[a] for a in AXES))


def unit(dtype) -> float:
    """What 1.0 means for raw data of ``dtype``: integers are scaled by their type's maximum."""
    kind = np.dtype(dtype)
    return float(np.iinfo(kind).max) if kind.kind in "ui" else 1.0


@dataclass(frozen=True)
class ArraySource:
    """One scale level of a multiscale zarr group: where it is and where it sits (nm, zyx)."""

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]
    dtype: str

    @classmethod
    def open(cls, group: Path | str, level: str) -> "ArraySource":
        from cellmap_repro.storage import read_levels

        group = Path(group)
        found = {l.path: l for l in read_levels(group)}[level]
        meta = json.loads((group / level / ".zarray").read_text())
        return cls(str(group / level), tuple(found.scale), tuple(found.translation), tuple(meta["shape"]), np.dtype(meta["dtype"]).str)

    @property
    def unit(self) -> float:
        return unit(self.dtype)

    def read(self, low: Sequence[int], high: Sequence[int]) -> np.ndarray:
        """``array[low:high]``, ``low``/``high`` already within the array."""
        return _zarr_array(self.path, os.getpid())[tuple(slice(int(a), int(b)) for a, b in zip(low, high))]


@functools.lru_cache(maxsize=256)
def _zarr_array(path: str, pid: int):
    # Keyed by pid: a worker process opens its own handles.
    import zarr

    return zarr.open_array(path, mode="r")


@dataclass(frozen=True)
class Window:
    """An output grid: ``shape`` voxels of ``scale`` nm centred at ``center`` (world nm)."""

    center: tuple[float, float, float]
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]

    def offsets(self, axis: int) -> np.ndarray:
        # cellmap-data's linspace, so that ties fall exactly where they fall there
        size = self.shape[axis] * self.scale[axis]
        return np.linspace(-size / 2 + self.scale[axis] / 2, size / 2 - self.scale[axis] / 2, self.shape[axis])

    def index_map(self, source: ArraySource, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with source index = A @ output index + b."""
        inverse_scale = 1.0 / np.asarray(source.scale)
        first = np.array([self.offsets(a)[0] for a in range(3)])
        a = inverse_scale[:, None] * matrix * np.asarray(self.scale)[None, :]
        b = inverse_scale * (np.asarray(self.center) - np.asarray(source.translation) + matrix @ first)
        return a, b


def _corners(shape) -> np.ndarray:
    return np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)


@dataclass
class Lookup:
    """Where a window's voxels come from in one array geometry: the box to read, each
    output voxel's place in it, and which output voxels have a source voxel at all."""

    low: np.ndarray
    high: np.ndarray
    index: tuple  # into the box: three 1-D arrays (unrotated) or three flat arrays (rotated)
    valid: np.ndarray  # window-shaped
    orthogonal: bool

    def take(self, source: ArraySource, fill) -> np.ndarray:
        dtype = np.float64 if isinstance(fill, float) and np.isnan(fill) else np.dtype(source.dtype)
        out = np.full(self.valid.shape, fill, dtype=dtype)
        if self.valid.any():
            block = source.read(self.low, self.high)
            values = block[np.ix_(*self.index)] if self.orthogonal else block[self.index].reshape(self.valid.shape)
            out[self.valid] = values[self.valid]
        return out


def nearest(source: ArraySource, window: Window, augmentation: "Augmentation") -> Lookup:
    """cellmap-data's nearest-voxel read of ``window`` from ``source``'s geometry."""
    if augmentation.rotated:
        return _nearest_rotated(source, window, augmentation.matrix())
    return _nearest_orthogonal(source, window, augmentation.mirror)


def _nearest_orthogonal(source: ArraySource, window: Window, mirror: Sequence[str]) -> Lookup:
    """Unrotated: per-axis nearest, ties up, tolerance half the voxel diagonal (``reindex``)."""
    tolerance = float(np.linalg.norm(source.scale)) / 2 + 1e-6
    indices, valid = [], []
    for axis in range(3):
        wanted = window.offsets(axis) + window.center[axis]
        if AXES[axis] in mirror:
            wanted = wanted[::-1]
        coords = np.arange(source.shape[axis], dtype=float) * source.scale[axis] + source.translation[axis]
        right = np.clip(np.searchsorted(coords, wanted, side="left"), 0, len(coords) - 1)
        left = np.clip(right - 1, 0, len(coords) - 1)
        pick_left = np.abs(wanted - coords[left]) < np.abs(coords[right] - wanted)
        index = np.where(pick_left, left, right)
        indices.append(index)
        valid.append(np.abs(coords[index] - wanted) <= tolerance)
    low = np.array([i[v].min() if v.any() else 0 for i, v in zip(indices, valid)])
    high = np.array([i[v].max() + 1 if v.any() else 1 for i, v in zip(indices, valid)])
    local = tuple(np.where(v, i - lo, 0) for i, v, lo in zip(indices, valid, low))
    mask = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    return Lookup(low, high, local, mask, orthogonal=True)


def _nearest_rotated(source: ArraySource, window: Window, matrix: np.ndarray) -> Lookup:
    """Rotated: nearest voxel centre, ties down, nothing outside the centres (``interp``)."""
    a, b = window.index_map(source, matrix)
    grid = np.indices(window.shape).reshape(3, -1).astype(float)
    position = a @ grid + b[:, None]
    upper = np.asarray(source.shape)[:, None] - 1
    valid = np.all((position >= 0) & (position <= upper), axis=0)
    floor = np.floor(position)
    nearest_index = (floor + (position - floor > 0.5)).astype(np.int64)
    low = nearest_index[:, valid].min(axis=1) if valid.any() else np.zeros(3, int)
    high = nearest_index[:, valid].max(axis=1) + 1 if valid.any() else np.ones(3, int)
    local = np.where(valid, nearest_index - low[:, None], 0)
    return Lookup(low, high, tuple(local), valid.reshape(window.shape), orthogonal=False)


@dataclass
class RawBlock:
    """What the device needs to finish a rotated raw read: the block and the map into it."""

    block: object  # torch uint8/float tensor (D, H, W), the source region read once
    a: np.ndarray
    b: np.ndarray  # source index = a @ output index + b, relative to the block's origin
    array_shape: tuple[int, int, int]  # the source array's shape, for "outside" ...
    origin: tuple[int, int, int]  # ... and the block's place in it
    shape: tuple[int, int, int]
    unit: float


def raw_block(source: ArraySource, window: Window, matrix: np.ndarray) -> RawBlock:
    """The source block a rotated raw window needs (read once, stored dtype)."""
    import torch

    a, b = window.index_map(source, matrix)
    corners = a @ _corners(window.shape) + b[:, None]
    shape = np.asarray(source.shape)
    low = np.clip(np.floor(corners.min(axis=1)).astype(int), 0, shape - 1)
    high = np.clip(np.ceil(corners.max(axis=1)).astype(int) + 1, low + 1, shape)
    # at least two voxels per axis, so that every interpolation has its upper neighbour
    low = np.where(high - low < 2, np.maximum(high - 2, 0), low)
    high = np.where(high - low < 2, np.minimum(low + 2, shape), high)
    block = source.read(low, high)
    if np.any(np.asarray(block.shape) < 2):  # an array one voxel thick
        block = np.pad(block, [(0, 2 - n) if n < 2 else (0, 0) for n in block.shape])
    return RawBlock(torch.from_numpy(np.ascontiguousarray(block)), a, b - low, source.shape, tuple(int(v) for v in low), window.shape, source.unit)


def trilinear(raw: RawBlock):
    """Finish a rotated raw read on the CPU: float32 in [0, 1], 0 outside the centres.

    The arithmetic of ``interp(method="linear")``, in a compiled loop: torch's 3-D
    ``grid_sample`` is not vectorised on the CPU and costs ~6x more here.
    """
    import torch

    out = np.empty(raw.shape, dtype=np.float32)
    upper = np.asarray(raw.array_shape, dtype=np.float64) - 1
    _trilinear_kernel(raw.block.numpy(), raw.a, raw.b, upper, np.asarray(raw.origin, dtype=np.float64), 1.0 / raw.unit, out, 16)
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=1)
def _compiled():
    import numba

    # Cached: compiled once per machine, not once per loader worker (numba keeps the cache
    # beside this file, or in the user's cache folder when the installation is read-only;
    # where neither can be written it compiles in every process).
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(_trilinear_loops)
    except RuntimeError:
        return numba.njit(nogil=True, boundscheck=False)(_trilinear_loops)


def _trilinear_loops(block, a, b, upper, origin, unit, out, tile):
    """Trilinear reads of ``block`` at ``a @ o + b`` for each output voxel ``o``. The output
    is visited in cubes of ``tile``: a rotated row walks diagonally through the source, a
    cube's source footprint stays in cache (4x faster for large angles)."""
    depth, height, width = block.shape
    nz, ny, nx = out.shape
    for ti in range(0, nz, tile):
        for tj in range(0, ny, tile):
            for tk in range(0, nx, tile):
                for i in range(ti, min(ti + tile, nz)):
                    for j in range(tj, min(tj + tile, ny)):
                        row_z = b[0] + a[0, 0] * i + a[0, 1] * j
                        row_y = b[1] + a[1, 0] * i + a[1, 1] * j
                        row_x = b[2] + a[2, 0] * i + a[2, 1] * j
                        for k in range(tk, min(tk + tile, nx)):
                            z = row_z + a[0, 2] * k
                            y = row_y + a[1, 2] * k
                            x = row_x + a[2, 2] * k
                            gz, gy, gx = z + origin[0], y + origin[1], x + origin[2]
                            if gz < 0 or gy < 0 or gx < 0 or gz > upper[0] or gy > upper[1] or gx > upper[2]:
                                out[i, j, k] = 0.0
                                continue
                            z0 = min(int(z), depth - 2)
                            y0 = min(int(y), height - 2)
                            x0 = min(int(x), width - 2)
                            fz, fy, fx = z - z0, y - y0, x - x0
                            c00 = block[z0, y0, x0] * (1 - fx) + block[z0, y0, x0 + 1] * fx
                            c01 = block[z0, y0 + 1, x0] * (1 - fx) + block[z0, y0 + 1, x0 + 1] * fx
                            c10 = block[z0 + 1, y0, x0] * (1 - fx) + block[z0 + 1, y0, x0 + 1] * fx
                            c11 = block[z0 + 1, y0 + 1, x0] * (1 - fx) + block[z0 + 1, y0 + 1, x0 + 1] * fx
                            out[i, j, k] = ((c00 * (1 - fy) + c01 * fy) * (1 - fz) + (c10 * (1 - fy) + c11 * fy) * fz) * unit


def _trilinear_kernel(*args) -> None:
    _compiled()(*args)


def trilinear_on(raw: RawBlock, device):
    """Finish a rotated raw read on ``device`` (a GPU) with ``grid_sample``: the CPU only read the block."""
    import torch
    import torch.nn.functional as F

    block = raw.block.to(device=device, non_blocking=True).to(torch.float32)
    extent = torch.tensor([block.shape[2] - 1, block.shape[1] - 1, block.shape[0] - 1], dtype=torch.float64)
    # grid_sample wants (x, y, z) in [-1, 1] with align_corners=True: k * (A @ o + b) - 1, k = 2 / extent
    k = 2.0 / extent
    a = torch.from_numpy(raw.a[::-1].copy()) * k[:, None]
    b = torch.from_numpy(raw.b[::-1].copy()) * k - 1.0
    steps = [torch.arange(n, dtype=torch.float64) for n in raw.shape]
    grid = b + steps[0][:, None, None, None] * a[:, 0] + steps[1][None, :, None, None] * a[:, 1] + steps[2][None, None, :, None] * a[:, 2]
    index = (grid + 1.0) / k + torch.tensor(raw.origin[::-1], dtype=torch.float64)
    inside = ((index >= 0) & (index <= torch.tensor(raw.array_shape[::-1], dtype=torch.float64) - 1)).all(dim=-1)
    values = F.grid_sample(block[None, None], grid[None].to(device=device, dtype=torch.float32), mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    return values * inside.to(device) * (1.0 / raw.unit)


def read_raw(source: ArraySource, window: Window, augmentation: Augmentation, defer: bool = False):
    """The input window as float32 in [0, 1] (or, ``defer``red and rotated, a RawBlock)."""
    import torch

    if augmentation.rotated:
        block = raw_block(source, window, augmentation.matrix())
        return block if defer else trilinear(block)
    values = nearest(source, window, augmentation).take(source, fill=0)
    return torch.from_numpy(values.astype(np.float32)) * (1.0 / source.unit)


def read_labels(sources: Mapping[str, ArraySource], window: Window, augmentation: Augmentation) -> dict:
    """Label windows as float64, NaN where the crop has no annotation. The classes of a
    crop share their geometry, so where to read is worked out once per geometry."""
    import torch

    lookups: dict[tuple, Lookup] = {}
    out = {}
    for name, source in sources.items():
        geometry = (source.scale, source.translation, source.shape)
        if geometry not in lookups:
            lookups[geometry] = nearest(source, window, augmentation)
        out[name] = torch.from_numpy(lookups[geometry].take(source, fill=np.nan))
    return out


def transpose(tensor, augmentation: Augmentation):
    return tensor.permute(*augmentation.permutation) if augmentation.permutation else tensor
