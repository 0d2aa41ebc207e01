"""`cellmap-repro predict`: tile crops through a trained model, write per-class logits.

For each crop (the datasplit's validation crops by default, or test crops from a test
manifest) the output grid is the raw level at the model's input voxel size, clipped to
the crop's box. Tiles are the model's training input (216³ -> 30³ for setup04), read and
normalised exactly as validation reads them (:func:`tile_input`), and batched
(``--batch-size``); ``--max-input`` grows them (in the model's valid input steps) for
speed. Logits are written per class as OME-NGFF multiscale groups:
``<data>/predictions/<exp>/<dataset>.zarr/crop<id>/<class>/s0``.

Resumable: a crop is built in ``crop<id>.partial`` with a record of finished tiles and
renamed when complete; a rerun skips complete crops made with the same checkpoint and
continues a partial crop where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cellmap_repro import checkpoint, settings
from cellmap_repro.errors import ReproError
from cellmap_repro.fetch_record import require_tiles_fetched
from cellmap_repro.storage import (
    PARTIAL_SUFFIX,
    ScaleLevel,
    atomic_write_json,
    check_array,
    confined,
    exclusive,
    find_level,
    multiscale_attrs,
    read_levels,
    read_region,
    writing,
)

PROGRESS_FILE = ".cellmap-repro-progress.json"
ATTRS_KEY = "cellmap_repro"
LOCK_NAME = ".lock"


@dataclass
class CropTarget:
    dataset: str
    crop_id: int
    raw_group: Path
    box_low: tuple[float, float, float]  # world nm, lower edge
    box_high: tuple[float, float, float]  # world nm, upper edge (exclusive)


def crop_box(levels: list[ScaleLevel], shape) -> tuple[tuple, tuple]:
    s0 = levels[0]
    low = tuple(t - s / 2 for t, s in zip(s0.translation, s0.scale))
    high = tuple(lo + s * n for lo, s, n in zip(low, s0.scale, shape))
    return low, high


def targets_from_datasplit(rows, which: str) -> list[CropTarget]:
    import zarr

    from cellmap_repro.datasplit import select_rows

    chosen = select_rows(rows, which)
    targets = []
    for row in chosen:
        group = row.label_group(row.classes[0])
        levels = read_levels(group, where=f"crop {row.crop_id} label {row.classes[0]}")
        shape = zarr.open_array(str(group / levels[0].path), mode="r").shape
        low, high = crop_box(levels, shape)
        targets.append(CropTarget(row.dataset, row.crop_id, row.raw_group, low, high))
    return targets


def targets_from_manifest(path: Path, data: Path, raw_path: str = "recon-1/em/fibsem-uint8") -> list[CropTarget]:
    """Test crops from a toolbox test-crop manifest (one row per scored class of a crop)."""
    from cellmap_repro.pack import read_manifest

    crops: dict[int, CropTarget] = {}
    for row in read_manifest(path):
        where = f"{path}: crop {row.crop_id} class {row.class_name}:"
        # The dataset names a folder of the data root and, below, one of the predictions.
        dataset = confined(data, row.dataset, f"{path}: crop {row.crop_id} dataset", plain=True).name
        for name, values, kind in (("voxel size", row.voxel_size, float), ("shape", row.shape, int), ("translation", row.translation, None)):
            if len(values) != 3 or not all(math.isfinite(v) for v in values) or (kind is not None and not all(v > 0 for v in values)):
                raise ReproError(f"{where} {name} must be 3 {'positive ' if kind else ''}numbers (z;y;x), got {list(values)}")
        low = tuple(t - s / 2 for t, s in zip(row.translation, row.voxel_size))
        high = tuple(lo + s * n for lo, s, n in zip(low, row.voxel_size, row.shape))
        raw_group = settings.dataset_container(data, dataset) / raw_path
        crops.setdefault(row.crop_id, CropTarget(dataset, row.crop_id, raw_group, low, high))
    return [crops[k] for k in sorted(crops)]


def output_grid(box_low, box_high, raw_level: ScaleLevel) -> tuple[np.ndarray, np.ndarray]:
    """First raw-grid index and voxel count per axis of the raw voxels centred in a box (nm)."""
    start = np.array([math.ceil((lo - t) / s - 1e-6) for lo, t, s in zip(box_low, raw_level.translation, raw_level.scale)])
    stop = np.array([math.ceil((hi - t) / s - 1e-6) for hi, t, s in zip(box_high, raw_level.translation, raw_level.scale)])
    return start, np.maximum(stop - start, 1)


def read_padded(array, start, size) -> np.ndarray:
    """``array[start:start+size]`` with zeros where the box leaves the array."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(np.array(start) + size, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = read_region(array, tuple(slice(a, b) for a, b in zip(src_lo, src_hi)))
    return out


def tile_input(raw, start, shape, transform):
    """One tile's network input (1, *shape): the raw block through the engine's one
    normalisation and the experiment's validation transforms, as validation sees it."""
    import torch

    from cellmap_repro.augment import unit
    from cellmap_repro.data import normalised_raw

    block = torch.from_numpy(read_padded(raw, start, np.asarray(shape)).astype(np.float32))
    return normalised_raw(block * (1.0 / unit(raw.dtype)), transform)[None]


def tile_starts(extent: int, tile: int) -> list[int]:
    return list(range(0, extent, tile))


@dataclass
class Predictor:
    """A checkpoint loaded into its experiment's model, ready to predict tiles.

    Shared by crop prediction and the blockwise whole-volume driver (volume.py), so both
    put the same tiles through the same network in the same way."""

    experiment: Any
    model: Any
    device: Any
    checkpoint: Path
    checkpoint_sha256: str

    @property
    def config(self):
        return self.experiment.train

    def tile_shapes(self, grid_shape, max_input: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input, output) tile shape: the training input by default, or grown up to ``max_input``."""
        from cellmap_repro.model import output_size_for

        config = self.config
        context = np.array(config.input_array_info.shape) - np.array(config.target_array_info.shape)
        # By default a tile is the training input: a per-patch normalisation (setup_04_all's
        # min-max) then sees windows of the size it was trained on.
        needed = np.asarray(config.target_array_info.shape) if max_input is None else np.minimum(grid_shape, max(1, max_input - int(context.max())))
        return output_size_for(config.input_array_info.shape, config.target_array_info.shape, self.experiment.input_step(), needed)

    def batch_size(self, requested: int | None = None) -> int:
        return requested or (self.config.batch_size if self.device.type == "cuda" else 1)

    def tile_logits(self, raw, grid_start, tiles, in_shape, out_shape, batch_size) -> Iterator[tuple[list, np.ndarray]]:
        """Per batch of ``tiles`` (output-grid starts), the tiles and their logits (batch, classes, *out_shape)."""
        import torch

        context_low = (np.array(in_shape) - np.array(out_shape)) // 2
        for first in range(0, len(tiles), batch_size):
            batch = tiles[first : first + batch_size]
            inputs = torch.stack([tile_input(raw, grid_start + np.array(tile) - context_low, in_shape, self.config.val_raw_value_transforms) for tile in batch])
            with torch.no_grad():
                yield batch, self.model(inputs.to(self.device)).cpu().numpy()


def load_predictor(experiment_name: str, experiments_root=None, which_checkpoint: str | None = None, threads: int | None = None) -> Predictor:
    """Build the experiment's model as training built it and load a checkpoint into it.

    CPU results depend on the thread count: ``threads``, else ``$CELLMAP_REPRO_THREADS``,
    else torch's default."""
    import os

    import torch

    from cellmap_repro import determinism
    from cellmap_repro.experiment import load_experiment

    # Resolved before the model config is loaded: loading builds the model, which may download weights.
    process_only = load_experiment(experiment_name, experiments_root, parts=("process_config",))
    ckpt_path = checkpoint.resolve(process_only.checkpoints_dir, which_checkpoint or process_only.process.checkpoint)
    state, ckpt_digest = checkpoint.read(ckpt_path)
    # Built as training built it: seeded with the run's seed before model.py runs.
    experiment = load_experiment(experiment_name, experiments_root, parts=("train_config",), seed=state["seed"])
    config = experiment.train
    model = config.model
    checkpoint.load_into(model, state, ckpt_path, checkpoint.identity(model, config.classes))
    device = determinism.device()
    model.to(device).eval()
    threads = threads or int(os.environ.get("CELLMAP_REPRO_THREADS") or 0) or torch.get_num_threads()
    determinism.configure(state["seed"], threads, config.deterministic, config.allow_tf32)
    # (input and output voxel sizes are equal: checked when the experiment is loaded)
    return Predictor(experiment, model, device, ckpt_path, ckpt_digest)


def predict(
    experiment_name: str,
    experiments_root=None,
    data_root: Path | None = None,
    which_checkpoint: str | None = None,
    crops: str = "validate",
    test_manifest: Path | None = None,
    max_input: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
) -> Path:
    data = settings.data_root(data_root)
    out_root = settings.predictions_root(data, experiment_name)
    with exclusive(out_root / LOCK_NAME, f"the predictions of {experiment_name} ({out_root})"):
        return _predict(load_predictor(experiment_name, experiments_root, which_checkpoint), data, out_root, crops, test_manifest, max_input, overwrite, progress, batch_size)


def _predict(predictor: Predictor, data: Path, out_root: Path, crops, test_manifest, max_input, overwrite, progress, batch_size) -> Path:
    import zarr

    from cellmap_repro.datasplit import read_datasplit

    config = predictor.config
    in_scale, out_scale = config.input_array_info.scale, config.target_array_info.scale
    if test_manifest is not None:
        targets = targets_from_manifest(Path(test_manifest), data)
    else:
        targets = targets_from_datasplit(read_datasplit(predictor.experiment.datasplit_path), crops)

    for target in targets:
        where = f"raw of {target.dataset} crop {target.crop_id}"
        if not target.raw_group.exists():
            raise ReproError(f"{where} does not exist: {target.raw_group}")
        raw_level = find_level(read_levels(target.raw_group, where=where), in_scale, where)
        check_array(target.raw_group, raw_level)
        raw = zarr.open_array(str(target.raw_group / raw_level.path), mode="r")
        grid_start, grid_shape = output_grid(target.box_low, target.box_high, raw_level)
        in_shape, out_shape = predictor.tile_shapes(grid_shape, max_input)
        require_tiles_fetched(target.raw_group / raw_level.path, grid_start, grid_shape, in_shape, out_shape, raw_level.scale, target.crop_id, where)
        crop_dir = out_root / f"{target.dataset}.zarr" / f"crop{target.crop_id}"
        translation = tuple(t + s * k for t, s, k in zip(raw_level.translation, raw_level.scale, grid_start))
        level = ScaleLevel("s0", tuple(out_scale), translation)
        record = {"checkpoint": str(predictor.checkpoint), "checkpoint_sha256": predictor.checkpoint_sha256, "grid_start": grid_start.tolist(), "shape": grid_shape.tolist(), "tile": list(out_shape), "classes": list(config.classes)}
        if crop_dir.exists() and not overwrite:
            done = zarr.open_group(str(crop_dir), mode="r").attrs.get(ATTRS_KEY, {})
            if done.get("checkpoint_sha256") == predictor.checkpoint_sha256 and done.get("shape") == record["shape"]:
                print(f"crop{target.crop_id}: up to date, skipped ({crop_dir})")
                continue
        with writing(crop_dir):
            _predict_crop(predictor, raw, crop_dir, grid_start, grid_shape, in_shape, out_shape, level, record, progress, f"predict crop{target.crop_id}", predictor.batch_size(batch_size))
    return out_root


def _predict_crop(predictor, raw, crop_dir: Path, grid_start, grid_shape, in_shape, out_shape, level, record, progress, desc, batch_size):
    import zarr
    from tqdm import tqdm

    classes = predictor.config.classes
    (crop_dir.parent).mkdir(parents=True, exist_ok=True)
    zarr.open_group(str(crop_dir.parent), mode="a")  # the <dataset>.zarr container
    partial = crop_dir.with_name(crop_dir.name + PARTIAL_SUFFIX)
    progress_file = partial / PROGRESS_FILE
    finished: set[tuple[int, int, int]] = set()
    if partial.exists():
        try:
            saved = json.loads(progress_file.read_text())
            if saved.get("record") == record:
                finished = {tuple(t) for t in saved["finished"]}
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        if not finished:
            shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="a")
    arrays = {}
    chunks = tuple(int(min(64, s)) for s in grid_shape)
    for class_name in classes:
        sub = group.require_group(class_name)
        sub.attrs.update(multiscale_attrs([level], name=class_name))
        arrays[class_name] = sub.require_dataset("s0", shape=tuple(int(s) for s in grid_shape), chunks=chunks, dtype="f4", fill_value=0.0, dimension_separator="/")
    tiles = [(z, y, x) for z in tile_starts(grid_shape[0], out_shape[0]) for y in tile_starts(grid_shape[1], out_shape[1]) for x in tile_starts(grid_shape[2], out_shape[2])]
    pending = [tile for tile in tiles if tile not in finished]
    with tqdm(total=len(tiles), initial=len(finished), desc=desc, unit="tile", disable=not progress) as bar:
        for batch, logits in predictor.tile_logits(raw, grid_start, pending, in_shape, out_shape, batch_size):
            for tile, tile_logits in zip(batch, logits):
                write = np.minimum(np.array(out_shape), grid_shape - np.array(tile))
                region = tuple(slice(t, t + w) for t, w in zip(tile, write))
                for channel, class_name in enumerate(classes):
                    arrays[class_name][region] = tile_logits[channel][tuple(slice(0, w) for w in write)]
                finished.add(tile)
            atomic_write_json(progress_file, {"record": record, "finished": sorted(finished)})
            bar.update(len(batch))
    group.attrs[ATTRS_KEY] = record
    progress_file.unlink()
    if crop_dir.exists():
        shutil.rmtree(crop_dir)
    partial.rename(crop_dir)


def run(args: argparse.Namespace) -> int:
    from cellmap_repro import volume

    if volume.volume_requested(args):
        if args.crops != "validate" or args.test_manifest or args.max_input:
            raise ReproError("--roi/--dataset predict a region; they cannot be combined with --crops, --test-manifest or --max-input")
        out = volume.predict_volume(
            args.experiment, args.experiments_root, args.data, args.checkpoint, args.roi, args.dataset, args.raw_path,
            args.workers, args.threads, args.block_tiles, args.batch_size, volume.launcher_words(args.launcher), args.overwrite,
        )
        print(f"predictions: {out}")
        return 0
    out = predict(
        args.experiment,
        args.experiments_root,
        args.data,
        args.checkpoint,
        args.crops,
        Path(args.test_manifest) if args.test_manifest else None,
        args.max_input,
        args.overwrite,
        batch_size=args.batch_size,
    )
    print(f"predictions: {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="predict per-class logits on crops (resumable)", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--checkpoint", default=None, help="best, latest, an epoch number or a path (default: process_config's, best)")
    parser.add_argument("--crops", default="validate", help="validate (default), train, all, or crop ids like 1,2 from the datasplit")
    parser.add_argument("--test-manifest", default=None, help="predict the test crops of this test_crop_manifest.csv instead")
    parser.add_argument("--max-input", type=settings.number_flag(1), default=None, help="grow tiles up to this input edge in voxels (fewer, larger tiles: faster, but a per-patch normalisation then sees larger windows than in training; default: tiles of the training input size)")
    parser.add_argument("--batch-size", type=settings.number_flag(1), default=None, help="tiles per forward pass (default: the experiment's batch_size on a GPU, 1 on the CPU)")
    parser.add_argument("--overwrite", action="store_true", help="predict again even where up-to-date output exists")
    from cellmap_repro.volume import add_region_arguments

    add_region_arguments(parser, predicting=True)
    parser.set_defaults(func=run)
