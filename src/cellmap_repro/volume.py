"""Whole-volume `predict` and `process`: a region of a dataset, block by block, on daisy.

``cellmap-repro predict --roi Z0:Z1,Y0:Y1,X0:X1 --workers N`` (and ``process`` with the same
region flags) covers a region of any size with bounded memory. The region is world nm,
``start:stop`` per axis (zyx), meaning the raw voxels whose centres lie inside it, as crop
prediction reads a crop's box; ``--dataset`` alone means the dataset's whole raw array.

Blocks: the output grid is cut into blocks of ``--block-tiles`` prediction tiles per axis
(tiles are the training output, exactly crop prediction's tile grid, so the same tiles go
through the same network the same way: the result equals crop prediction bit for bit at
the same thread count). Output arrays are chunked by block, so no two workers ever write
the same chunk; a worker holds one block's logits at a time.

Engine: daisy 2 schedules the blocks; each worker is its own process (or, with
``--launcher``, a command such as ``srun ...`` that starts one on a cluster node) that
loads the model once and asks daisy's server for blocks until none are left. daisy's
done markers make every pass resumable block by block. Outputs are built in
``<name>.partial`` and renamed when every block is done; scratch (done markers, worker
logs, labelling tables) lives in a hidden folder inside the ``.partial`` one.

Instance labelling across block borders (``process``), exact, in four passes:
1. per block: threshold; label components (cc3d) with ids unique to the block
   (``block index * block voxels + local id``); record each fragment's size and first voxel;
2. per block: every pair of different fragments that touch (under the connectivity) across
   the block's lower faces, read with a one-voxel halo;
3. once, in the driver: union-find over the pairs (scipy's connected components on the
   fragment graph); components smaller than ``min_instance_size`` dropped; the rest
   numbered in raster order of their first voxel, as cc3d numbers a whole array;
4. per block: fragments relabelled to those ids.
So the masks and ids equal what crop ``process`` writes for the same logits.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import PARTIAL_SUFFIX, ScaleLevel, atomic_write_bytes, atomic_write_json, confined, find_level, multiscale_attrs, read_levels

ATTRS_KEY = "cellmap_repro"
SPEC_FILE = ".cellmap-repro-volume.json"
SCRATCH = ".cellmap-repro-blockwise"
DEFAULT_BLOCK_EDGE = 64  # voxels: the block is the fewest whole tiles per axis that reach it


# --- the region -------------------------------------------------------------------------


def parse_roi(text: str) -> tuple[tuple[float, float], ...]:
    """``z0:z1,y0:y1,x0:x1`` (world nm, stop exclusive) to ((z0, z1), (y0, y1), (x0, x1))."""
    usage = f"--roi must be z0:z1,y0:y1,x0:x1 in nm (start:stop per axis, zyx), got {text!r}"
    parts = text.split(",")
    if len(parts) != 3:
        raise ReproError(usage)
    try:
        roi = tuple((float(a), float(b)) for a, b in (p.split(":") for p in parts))
    except ValueError:
        raise ReproError(usage) from None
    if any(not (math.isfinite(a) and math.isfinite(b) and b > a) for a, b in roi):
        raise ReproError(f"{usage}: each stop must be greater than its start")
    return roi


def _nm(value: float) -> str:
    return f"{value:g}".replace("-", "m")


def roi_name(roi) -> str:
    """Folder name of a region's outputs: ``roi_<z0>-<z1>_<y0>-<y1>_<x0>-<x1>`` (nm), ``roi_all`` for a whole dataset."""
    if roi is None:
        return "roi_all"
    return "roi_" + "_".join(f"{_nm(a)}-{_nm(b)}" for a, b in roi)


def format_roi(low, high) -> str:
    return ",".join(f"{a:g}:{b:g}" for a, b in zip(low, high))


@dataclass
class Region:
    dataset: str
    roi: tuple | None  # ((start, stop) nm per axis), None: the whole raw
    raw_group: Path | None = None

    @property
    def name(self) -> str:
        return roi_name(self.roi)


def datasplit_raw_groups(experiment) -> dict[str, Path]:
    """Each dataset the experiment's datasplit names, with its raw group."""
    from cellmap_repro.datasplit import read_datasplit

    groups: dict[str, Path] = {}
    if experiment.datasplit_path.exists():
        for row in read_datasplit(experiment.datasplit_path):
            groups.setdefault(row.dataset, row.raw_group)
    return groups


def resolve_region(experiment, data: Path, dataset: str | None, roi_text: str | None, raw_path: str | None = None, needs_raw: bool = True) -> Region:
    """Which raw to read: ``--dataset`` (default: the datasplit's one dataset), its raw group
    from the datasplit, else ``<data>/<dataset>/<dataset>.zarr/<raw path>``."""
    from cellmap_repro.datasplit import RAW_ARRAY

    roi = parse_roi(roi_text) if roi_text else None
    split_raw = datasplit_raw_groups(experiment) if dataset is None or (needs_raw and raw_path is None) else {}
    if dataset is None:
        if len(split_raw) != 1:
            named = ", ".join(sorted(split_raw)) or "none"
            raise ReproError(f"--dataset is needed: the datasplit {experiment.datasplit_path} names {len(split_raw)} datasets ({named})")
        dataset = next(iter(split_raw))
    confined(data, dataset, "--dataset", plain=True)  # a folder of <data> and of the outputs
    if not needs_raw:
        return Region(dataset, roi)
    if raw_path is None and dataset in split_raw:
        return Region(dataset, roi, split_raw[dataset])
    return Region(dataset, roi, settings.dataset_container(data, dataset) / (raw_path or RAW_ARRAY))


def open_raw(region: Region, data: Path, scale):
    """The raw level at the model's voxel size, or one clear line saying why not."""
    import zarr

    if not region.raw_group.exists():
        available = sorted(p.parent.name for p in data.glob("*/*.zarr") if p.name == f"{p.parent.name}.zarr")
        raise ReproError(f"dataset '{region.dataset}': no raw array at {region.raw_group} (datasets under {data}: {', '.join(available) or 'none'})")
    where = f"raw of {region.dataset}"
    level = find_level(read_levels(region.raw_group, where=where), scale, where)
    return level, zarr.open_array(str(region.raw_group / level.path), mode="r")


def region_grid(region: Region, level: ScaleLevel, raw_shape) -> tuple[np.ndarray, np.ndarray]:
    """First raw voxel and voxel count per axis of the region; it must lie inside the raw."""
    from cellmap_repro.predict import output_grid

    if region.roi is None:
        return np.zeros(3, dtype=int), np.array(raw_shape)
    start, shape = output_grid([a for a, _ in region.roi], [b for _, b in region.roi], level)
    if np.any(start < 0) or np.any(start + shape > np.array(raw_shape)):
        low = [t - s / 2 for t, s in zip(level.translation, level.scale)]
        high = [lo + s * n for lo, s, n in zip(low, level.scale, raw_shape)]
        given = format_roi([a for a, _ in region.roi], [b for _, b in region.roi])
        raise ReproError(f"--roi {given} reaches outside the raw of {region.dataset}, which covers {format_roi(low, high)} nm (zyx)")
    return start, shape


# --- blocks and workers -----------------------------------------------------------------


def block_index(begin, block_shape, grid_shape) -> int:
    """Linear index (C order) of the block starting at ``begin`` in the block grid."""
    counts = [math.ceil(g / b) for g, b in zip(grid_shape, block_shape)]
    return int(np.ravel_multi_index(tuple(int(a) // int(b) for a, b in zip(begin, block_shape)), counts))


def all_block_indices(block_shape, grid_shape) -> range:
    return range(int(np.prod([math.ceil(g / b) for g, b in zip(grid_shape, block_shape)])))


def block_slices(block) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    begin = np.array(list(block.write_roi.begin))
    end = np.array(list(block.write_roi.end))
    return begin, end, tuple(slice(int(a), int(b)) for a, b in zip(begin, end))


@dataclass
class Worker:
    """One daisy worker slot: serves blocks of one pass until daisy has none left.

    With a launcher the slot runs ``<launcher> <python> -m cellmap_repro.volume <pass> <spec>``
    (e.g. ``srun --ntasks=1 ...``); that process connects back to daisy's server using the
    ``DAISY_CONTEXT`` variable the launcher passes on."""

    kind: str
    spec: str
    launcher: tuple[str, ...] = ()

    def __call__(self):
        if self.launcher:
            subprocess.run([*self.launcher, sys.executable, "-m", "cellmap_repro.volume", self.kind, self.spec], check=True)
        else:
            serve(self.kind, self.spec)


def serve(kind: str, spec_path: str) -> None:
    import daisy
    from numcodecs import blosc

    blosc.use_threads = False  # workers share the cores; each compresses its own chunks
    spec = json.loads(Path(spec_path).read_text())
    client = daisy.Client()
    handler = HANDLERS[kind](spec, client.worker_id)
    while True:
        with client.acquire_block() as block:
            if block is None:
                return
            try:
                handler(block)
            except Exception:
                # The worker keeps serving; daisy retries the block, then reports it failed.
                traceback.print_exc()
                block.status = daisy.BlockStatus.FAILED


def run_pass(kind: str, spec_path: Path, scratch: Path, grid_shape, block_shape, workers: int, launcher: tuple[str, ...], progress: bool) -> None:
    """Run one blockwise pass on daisy; blocks done in an earlier run are skipped."""
    import daisy
    from daisy.logging import set_log_basedir

    logs = scratch / "logs"
    set_log_basedir(str(logs))
    whole = daisy.Roi((0, 0, 0), tuple(int(s) for s in grid_shape))
    block = daisy.Roi((0, 0, 0), tuple(int(s) for s in block_shape))
    task = daisy.Task(
        kind,
        total_roi=whole,
        read_roi=block,
        write_roi=block,
        process_function=Worker(kind, str(spec_path), tuple(launcher)),
        read_write_conflict=False,
        fit="shrink",
        max_workers=workers,
        max_retries=1,
        timeout=None,
        tracking_path=str(scratch / "done" / kind),
    )
    # Local workers talk to a server on loopback only; cluster workers need daisy's detected address.
    host = None if launcher else "127.0.0.1"
    try:
        states = daisy.run_blockwise([task], progress=progress, host=host, summary=False, return_states=True)
    except RuntimeError as exc:
        raise ReproError(f"{kind}: the workers failed ({str(exc).splitlines()[0]}); worker logs: {logs}") from None
    state = states[kind]
    if state.completed_count != state.total_block_count:
        missing = state.total_block_count - state.completed_count
        raise ReproError(f"{kind}: {missing} of {state.total_block_count} blocks failed (worker logs: {logs}); run the same command again to retry them, finished blocks are kept")


def prepare_partial(final: Path, record: dict, overwrite: bool) -> tuple[Path, bool]:
    """The ``.partial`` folder to build ``final`` in, kept when it was started with the same
    ``record`` (resume), else emptied. True when ``final`` is (now) up to date."""
    import zarr

    if final.exists() and not overwrite and zarr.open_group(str(final), mode="r").attrs.get(ATTRS_KEY) == record:
        return final, True
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if partial.exists():
        if not overwrite and zarr.open_group(str(partial), mode="r").attrs.get(ATTRS_KEY) == record:
            finish(partial, final, record)  # every block was done: only the rename was missing
            return final, True
        try:
            same = json.loads((partial / SPEC_FILE).read_text())["record"] == record
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            same = False
        if overwrite or not same:
            shutil.rmtree(partial)
    final.parent.mkdir(parents=True, exist_ok=True)
    zarr.open_group(str(final.parent), mode="a")  # the <dataset>.zarr container
    return partial, False


def finish(partial: Path, final: Path, record: dict) -> None:
    """Mark the output complete (the record attribute, written after every block), clear
    the scratch, move it into place."""
    import zarr

    zarr.open_group(str(partial), mode="a").attrs[ATTRS_KEY] = record
    shutil.rmtree(partial / SCRATCH, ignore_errors=True)
    (partial / SPEC_FILE).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def write_spec(partial: Path, spec: dict) -> Path:
    path = partial / SPEC_FILE
    atomic_write_json(path, spec)
    return path


def save_arrays(path: Path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:  # read now: thousands of blocks would exhaust file handles
        return dict(stored)


# --- predict ----------------------------------------------------------------------------


def default_threads() -> int:
    import os

    return int(os.environ.get("CELLMAP_REPRO_THREADS") or 1)


def predict_volume(
    experiment_name: str,
    experiments_root=None,
    data_root=None,
    which_checkpoint: str | None = None,
    roi: str | None = None,
    dataset: str | None = None,
    raw_path: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    block_tiles: int | None = None,
    batch_size: int | None = None,
    launcher: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Predict a region blockwise; returns the output folder (one ``<class>/s0`` per class)."""
    from cellmap_repro.fetch_record import require_tiles_fetched
    from cellmap_repro.predict import load_predictor

    for flag, value in (("--workers", workers), ("--threads", threads), ("--block-tiles", block_tiles), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ReproError(f"{flag} must be at least 1, got {value}")
    data = settings.data_root(data_root)
    threads = threads or default_threads()
    # The driver loads the checkpoint too: every input error surfaces here, before any worker starts.
    predictor = load_predictor(experiment_name, experiments_root, which_checkpoint, threads=threads)
    config = predictor.config
    region = resolve_region(predictor.experiment, data, dataset, roi, raw_path)
    level, raw = open_raw(region, data, config.input_array_info.scale)
    grid_start, grid_shape = region_grid(region, level, raw.shape)
    in_shape, out_shape = predictor.tile_shapes(grid_shape)
    # A data root filled by `fetch` holds crops and their context only: the rest would read as zeros.
    require_tiles_fetched(region.raw_group / level.path, grid_start, grid_shape, in_shape, out_shape, level.scale, None, f"raw of {region.dataset}", around=f"{region.name}")
    tiles = block_tiles or math.ceil(DEFAULT_BLOCK_EDGE / max(out_shape))
    block_shape = [int(t * tiles) for t in out_shape]
    final = settings.volume_dir(settings.predictions_root(data, experiment_name), region.dataset, region.name)
    record = {
        "checkpoint": str(predictor.checkpoint),
        "checkpoint_sha256": predictor.checkpoint_sha256,
        "dataset": region.dataset,
        "raw": str(region.raw_group / level.path),
        "roi_nm": [list(r) for r in region.roi] if region.roi else None,
        "grid_start": grid_start.tolist(),
        "shape": grid_shape.tolist(),
        "tile": list(out_shape),
        "block": block_shape,
        "classes": list(config.classes),
        "threads": threads,
        "batch_size": predictor.batch_size(batch_size),
    }
    partial, up_to_date = prepare_partial(final, record, overwrite)
    if up_to_date:
        print(f"{region.dataset} {region.name}: up to date, skipped ({final})")
        return final
    import zarr

    group = zarr.open_group(str(partial), mode="a")
    translation = tuple(t + s * k for t, s, k in zip(level.translation, level.scale, grid_start))
    out_level = ScaleLevel("s0", tuple(config.target_array_info.scale), translation)
    for class_name in config.classes:
        sub = group.require_group(class_name)
        sub.attrs.update(multiscale_attrs([out_level], name=class_name))
        sub.require_dataset("s0", shape=tuple(int(s) for s in grid_shape), chunks=tuple(block_shape), dtype="f4", fill_value=0.0, dimension_separator="/")
    spec = {
        "record": record,
        "experiment": experiment_name,
        "experiments_root": str(settings.experiments_root(experiments_root)),
        "data": str(data),
        "output": str(partial),
        "input_shape": list(in_shape),
    }
    spec_path = write_spec(partial, spec)
    started = time.perf_counter()
    run_pass("predict", spec_path, partial / SCRATCH, grid_shape, block_shape, workers, launcher, progress)
    finish(partial, final, record)
    print(f"{region.dataset} {region.name}: {len(all_block_indices(block_shape, grid_shape))} blocks of {block_shape} voxels in {time.perf_counter() - started:.1f} s ({workers} worker(s))")
    return final


class PredictBlocks:
    """A predict worker: the model loaded once, then one block of tiles at a time."""

    def __init__(self, spec: dict, worker_id: int):
        import os

        import torch
        import zarr

        from cellmap_repro.predict import load_predictor

        record = spec["record"]
        os.environ["CELLMAP_REPRO_DATA"] = spec["data"]
        os.environ["CELLMAP_REPRO_EXPERIMENTS"] = spec["experiments_root"]
        if os.environ.get("CELLMAP_REPRO_DEVICE", "auto") == "auto" and torch.cuda.device_count() > 1:
            torch.cuda.set_device(worker_id % torch.cuda.device_count())  # local workers share a node's GPUs
        self.predictor = load_predictor(spec["experiment"], spec["experiments_root"], record["checkpoint"], threads=record["threads"])
        if self.predictor.checkpoint_sha256 != record["checkpoint_sha256"]:
            raise ReproError(f"checkpoint {record['checkpoint']} changed since this prediction started")
        self.raw = zarr.open_array(record["raw"], mode="r")
        self.outputs = [zarr.open_array(str(Path(spec["output"]) / c / "s0"), mode="r+") for c in record["classes"]]
        self.grid_start = np.array(record["grid_start"])
        self.grid_shape = np.array(record["shape"])
        self.in_shape, self.out_shape = tuple(spec["input_shape"]), tuple(record["tile"])
        self.batch_size = record["batch_size"]

    def __call__(self, block) -> None:
        from cellmap_repro.predict import read_padded

        begin, end, region = block_slices(block)
        size = end - begin
        out_shape = np.array(self.out_shape)
        context = np.array(self.in_shape) - out_shape
        tiles = list(itertools.product(*(range(0, int(n), t) for n, t in zip(size, self.out_shape))))  # from the block's first voxel
        # Every tile's input read once, as the crop path reads each (zeros outside the raw);
        # the block's first output voxel sits at window[context // 2].
        window = read_padded(self.raw, self.grid_start + begin - context // 2, -(-size // out_shape) * out_shape + context)
        logits = np.zeros((len(self.outputs), *size), dtype=np.float32)
        for batch, batch_logits in self.predictor.tile_logits(window, context // 2, tiles, self.in_shape, self.out_shape, self.batch_size):
            for tile, tile_logits in zip(batch, batch_logits):
                high = np.minimum(np.array(tile) + out_shape, size)
                logits[(slice(None), *(slice(a, b) for a, b in zip(tile, high)))] = tile_logits[(slice(None), *(slice(0, b - a) for a, b in zip(tile, high)))]
        for channel, array in enumerate(self.outputs):
            array[region] = logits[channel]


# --- process ----------------------------------------------------------------------------


def half_neighbourhood(connectivity: int) -> list[tuple[int, int, int]]:
    """Offsets to the neighbours that come later in raster order (each adjacent pair once)."""
    most = {6: 1, 18: 2, 26: 3}[connectivity]
    offsets = [d for d in itertools.product((-1, 0, 1), repeat=3) if d > (0, 0, 0)]
    return [d for d in offsets if sum(map(abs, d)) <= most]


def touching_pairs(fragments: np.ndarray, connectivity: int) -> np.ndarray:
    """Unique (a, b) pairs of different non-zero ids that are neighbours in ``fragments``."""
    found = []
    for offset in half_neighbourhood(connectivity):
        here = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(offset, fragments.shape))
        there = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(offset, fragments.shape))
        a, b = fragments[here], fragments[there]
        touching = (a != b) & (a > 0) & (b > 0)
        found.append(np.stack([a[touching], b[touching]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.uint64)
    return np.unique(np.sort(pairs, axis=1), axis=0) if len(pairs) else pairs.reshape(0, 2)


class ProcessBlocks:
    """Shared set-up of the process passes: classes, thresholds, arrays, block geometry."""

    def __init__(self, spec: dict, worker_id: int = 0):
        import zarr

        self.spec = spec
        self.record = spec["record"]
        self.source = Path(spec["source"])
        self.output = Path(spec["output"])
        self.scratch = self.output / SCRATCH
        self.block_shape = np.array(self.record["source"]["block"])
        self.grid_shape = np.array(self.record["source"]["shape"])
        self.block_voxels = int(np.prod(self.block_shape))
        self.instance = spec["instance_classes"]
        self.fragments = {c: zarr.open_array(str(self.scratch / "fragments" / c), mode="r+") for c in self.instance}

    def index(self, begin) -> int:
        return block_index(begin, self.block_shape, self.grid_shape)

    def out(self, class_name: str):
        import zarr

        return zarr.open_array(str(self.output / class_name / "s0"), mode="r+")


class LabelBlocks(ProcessBlocks):
    """Pass 1: threshold; instance classes get block-unique fragment ids and per-fragment stats."""

    def __call__(self, block) -> None:
        import cc3d
        import zarr

        begin, end, region = block_slices(block)
        index = self.index(begin)
        stats = {}
        for class_name, threshold in self.record["threshold"].items():
            mask = zarr.open_array(str(self.source / class_name / "s0"), mode="r")[region] > threshold
            if class_name not in self.instance:
                self.out(class_name)[region] = mask.astype(np.uint8)
                continue
            labels = cc3d.connected_components(mask, connectivity=self.record["connectivity"], out_dtype=np.uint64)
            ids, first, counts = np.unique(labels.ravel(), return_index=True, return_counts=True)
            first_voxel = np.stack(np.unravel_index(first, labels.shape)) + begin[:, None]
            keep = ids > 0  # 0 is background; local ids are then 1..n in order
            stats[f"{class_name}/counts"] = counts[keep].astype(np.int64)
            stats[f"{class_name}/first"] = np.ravel_multi_index(tuple(first_voxel[:, keep]), tuple(self.grid_shape)).astype(np.int64)
            self.fragments[class_name][region] = np.where(labels > 0, labels + np.uint64(index * self.block_voxels), np.uint64(0))
        save_arrays(self.scratch / "stats" / f"{index}.npz", **stats)


class PairBlocks(ProcessBlocks):
    """Pass 2: fragment pairs touching across the block's lower faces (one-voxel halo)."""

    def __call__(self, block) -> None:
        begin, end, _ = block_slices(block)
        grown = tuple(slice(int(max(0, a - 1)), int(b)) for a, b in zip(begin, end))
        pairs = {c: touching_pairs(self.fragments[c][grown], self.record["connectivity"]) for c in self.instance}
        save_arrays(self.scratch / "pairs" / f"{self.index(begin)}.npz", **pairs)


class RelabelBlocks(ProcessBlocks):
    """Pass 4: fragment ids to final instance ids (the driver's tables)."""

    def __call__(self, block) -> None:
        begin, end, region = block_slices(block)
        index = self.index(begin)
        tables = load_arrays(self.scratch / "lookup" / f"{index}.npz")
        for class_name in self.instance:
            fragments = self.fragments[class_name][region]
            local = np.where(fragments > 0, fragments - np.uint64(index * self.block_voxels), np.uint64(0))
            self.out(class_name)[region] = tables[class_name][local.astype(np.int64)]


def merge_fragments(scratch: Path, instance: list[str], n_blocks: int, block_voxels: int, min_size: int) -> None:
    """Pass 3: union-find over touching fragments; one table per block, fragment -> final id."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    stats = [load_arrays(scratch / "stats" / f"{b}.npz") for b in range(n_blocks)]
    pairs = [load_arrays(scratch / "pairs" / f"{b}.npz") for b in range(n_blocks)]
    tables: list[dict[str, np.ndarray]] = [{} for _ in range(n_blocks)]
    for class_name in instance:
        counts = [s[f"{class_name}/counts"] for s in stats]
        node_start = np.concatenate([[0], np.cumsum([len(c) for c in counts])])
        nodes = int(node_start[-1])
        if nodes == 0:
            for table in tables:
                table[class_name] = np.zeros(1, dtype=np.uint64)
            continue
        touching = np.concatenate([p[class_name] for p in pairs]).astype(np.int64)
        ends = node_start[touching // block_voxels] + touching % block_voxels - 1  # fragment id -> node
        graph = coo_matrix((np.ones(len(ends)), (ends[:, 0], ends[:, 1])), shape=(nodes, nodes))
        n_components, component = connected_components(graph, directed=False)
        size = np.bincount(component, weights=np.concatenate(counts), minlength=n_components)
        first = np.full(n_components, np.iinfo(np.int64).max)
        np.minimum.at(first, component, np.concatenate([s[f"{class_name}/first"] for s in stats]))
        kept = np.flatnonzero(size >= max(min_size, 1))
        final = np.zeros(n_components, dtype=np.uint64)
        final[kept[np.argsort(first[kept], kind="stable")]] = np.arange(1, len(kept) + 1, dtype=np.uint64)
        for b in range(n_blocks):
            tables[b][class_name] = np.concatenate([[0], final[component[node_start[b] : node_start[b + 1]]]]).astype(np.uint64)
    for b, table in enumerate(tables):
        save_arrays(scratch / "lookup" / f"{b}.npz", **table)


def process_volume(
    experiment_name: str,
    experiments_root=None,
    data_root=None,
    roi: str | None = None,
    dataset: str | None = None,
    workers: int = 1,
    launcher: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Threshold / instance-label a whole-volume prediction blockwise; returns the output folder."""
    import zarr

    from cellmap_repro.experiment import load_experiment
    from cellmap_repro.process import chosen_classes, class_threshold, instance_class_names

    if workers < 1:
        raise ReproError(f"--workers must be at least 1, got {workers}")
    data = settings.data_root(data_root)
    # data.py (slow to import) only when the datasplit must name the dataset
    experiment = load_experiment(experiment_name, experiments_root, parts=("process_config",) if dataset else ("data", "process_config"))
    config = experiment.process
    region = resolve_region(experiment, data, dataset, roi, needs_raw=False)
    source = settings.volume_dir(settings.predictions_root(data, experiment_name), region.dataset, region.name)
    if not source.exists():
        state = "is incomplete (run the same predict command again to finish it)" if source.with_name(source.name + PARTIAL_SUFFIX).exists() else "does not exist"
        raise ReproError(f"the prediction of {region.dataset} {region.name} {state}: {source}")
    predicted = zarr.open_group(str(source), mode="r")
    classes = chosen_classes(config, list(predicted.group_keys()), source)
    instance = sorted(set(classes) & instance_class_names(experiment))
    record = {
        "source": dict(predicted.attrs[ATTRS_KEY]),
        "threshold": {c: class_threshold(config, c) for c in classes},
        "connectivity": config.connectivity,
        "min_instance_size": config.min_instance_size,
    }
    final = settings.volume_dir(settings.processed_root(data, experiment_name), region.dataset, region.name)
    partial, up_to_date = prepare_partial(final, record, overwrite)
    if up_to_date:
        print(f"{region.dataset} {region.name}: up to date, skipped ({final})")
        return final
    grid_shape, block_shape = record["source"]["shape"], record["source"]["block"]
    group = zarr.open_group(str(partial), mode="a")
    for class_name in classes:
        sub = group.require_group(class_name)
        sub.attrs.update(multiscale_attrs([read_levels(source / class_name)[0]], name=class_name))
        dtype = np.uint64 if class_name in instance else np.uint8
        sub.require_dataset("s0", shape=tuple(grid_shape), chunks=tuple(block_shape), dtype=dtype, fill_value=0, dimension_separator="/")
    scratch = partial / SCRATCH
    for class_name in instance:
        zarr.open_array(str(scratch / "fragments" / class_name), mode="a", shape=tuple(grid_shape), chunks=tuple(block_shape), dtype=np.uint64, fill_value=0, dimension_separator="/")
    spec_path = write_spec(partial, {"record": record, "source": str(source), "output": str(partial), "instance_classes": instance})
    started = time.perf_counter()
    for kind in ("label", "pairs", "relabel") if instance else ("label",):
        if kind == "relabel":
            merge_fragments(scratch, instance, len(all_block_indices(block_shape, grid_shape)), int(np.prod(block_shape)), config.min_instance_size)
        run_pass(kind, spec_path, scratch, grid_shape, block_shape, workers, launcher, progress)
    finish(partial, final, record)
    print(f"{region.dataset} {region.name}: {len(classes)} classes ({len(instance)} instance) processed in {time.perf_counter() - started:.1f} s ({workers} worker(s))")
    return final


HANDLERS = {"predict": PredictBlocks, "label": LabelBlocks, "pairs": PairBlocks, "relabel": RelabelBlocks}


# --- command line -----------------------------------------------------------------------


def add_region_arguments(parser, predicting: bool) -> None:
    group = parser.add_argument_group("whole volumes (blockwise on daisy, resumable block by block; README 'Whole volumes')")
    group.add_argument("--roi", default=None, metavar="Z0:Z1,Y0:Y1,X0:X1", help="a region of --dataset in world nm, start:stop per axis (zyx), e.g. 0:2048,0:2048,0:2048: the raw voxels whose centres lie inside; instead of crops")
    group.add_argument("--dataset", default=None, help="the dataset to read (default: the datasplit's dataset, when it names one); without --roi: its whole raw array")
    if predicting:
        group.add_argument("--raw-path", default=None, help="raw multiscale group inside <data>/<dataset>/<dataset>.zarr (default: the datasplit's, else recon-1/em/fibsem-uint8)")
        group.add_argument("--threads", type=settings.number_flag(1), default=None, help="torch CPU threads per worker (default: $CELLMAP_REPRO_THREADS or 1); CPU results depend on it, not on --workers")
        group.add_argument("--block-tiles", type=settings.number_flag(1), default=None, help=f"tiles per block edge; blocks are the output's zarr chunks (default: the fewest reaching {DEFAULT_BLOCK_EDGE} voxels)")
    group.add_argument("--workers", type=settings.number_flag(1), default=1, help="worker processes (default 1)")
    group.add_argument("--launcher", default=None, help="start each worker through this command prefix instead of as a local process, e.g. 'srun --ntasks=1 --cpus-per-task=4 --gres=gpu:1'")


def volume_requested(args) -> bool:
    """Whole-volume mode (--roi/--dataset); the volume-only flags are refused without it."""
    if args.roi or args.dataset:
        return True
    given = [flag for flag, value in (("--workers", args.workers != 1), ("--launcher", args.launcher), ("--threads", getattr(args, "threads", None)), ("--block-tiles", getattr(args, "block_tiles", None)), ("--raw-path", getattr(args, "raw_path", None))) if value]
    if given:
        raise ReproError(f"{', '.join(given)} apply to whole volumes: add --roi and/or --dataset (crops are predicted in one process)")
    return False


def launcher_words(text: str | None) -> tuple[str, ...]:
    import shlex

    return tuple(shlex.split(text)) if text else ()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
