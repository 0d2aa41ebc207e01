"""`cellmap-repro process`: turn per-class logits into masks, as ``process_config.py`` says.

Semantic classes: ``logit > threshold`` as uint8 0/1. Instance classes: the same mask,
then connected components (cc3d, 26-connected by default; components smaller than
``min_instance_size`` voxels removed) as uint64 ids. Output mirrors the predictions:
``<data>/processed/<exp>/<dataset>.zarr/crop<id>/<class>/s0``. Each crop is written in a
``.partial`` folder and renamed when complete; a rerun skips crops already processed
from the same predictions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.classes import check_classes, class_table
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_directory, exclusive, multiscale_attrs, read_levels, read_region

ATTRS_KEY = "cellmap_repro"
LOCK_NAME = ".lock"


def process_volume(logits: np.ndarray, threshold: float, instance: bool, connectivity: int = 26, min_size: int = 0) -> np.ndarray:
    mask = logits > threshold
    if not instance:
        return mask.astype(np.uint8)
    import cc3d

    if min_size > 0:
        mask = cc3d.dust(mask, threshold=min_size, connectivity=connectivity, in_place=False)
    return cc3d.connected_components(mask, connectivity=connectivity, out_dtype=np.uint64)


def class_threshold(config, class_name: str) -> float:
    if isinstance(config.threshold, dict):
        return float(config.threshold.get(class_name, config.threshold.get("default", 0.0)))
    return float(config.threshold)


def instance_class_names(experiment) -> set[str]:
    """The classes labelled as instances: process_config's ``instance_classes``, else the class table's."""
    config = experiment.process
    if config.instance_classes is not None:
        return set(check_classes(config.instance_classes, f"{experiment.directory / 'process_config.py'}: instance_classes"))
    return {c.name for c in class_table().values() if c.instance}


def chosen_classes(config, predicted: list[str], where) -> list[str]:
    """process_config's ``classes`` (each must be predicted), else every predicted class."""
    if config.classes is None:
        return sorted(predicted)
    missing = [c for c in config.classes if c not in predicted]
    if missing:
        raise ReproError(f"{where}: no prediction for class(es) {', '.join(missing)} named in process_config.classes")
    return list(config.classes)


def process(experiment_name: str, experiments_root=None, data_root=None, overwrite: bool = False, progress: bool = True) -> Path:
    from cellmap_repro.experiment import load_experiment

    data = settings.data_root(data_root)
    experiment = load_experiment(experiment_name, experiments_root, parts=("process_config",))
    config = experiment.process
    instance_names = instance_class_names(experiment)
    source_root = settings.predictions_root(data, experiment_name)
    out_root = settings.processed_root(data, experiment_name)
    crops = sorted(p for p in source_root.glob("*.zarr/crop*") if p.is_dir() and not p.name.endswith((".partial", ".old")))
    if not crops:
        raise ReproError(f"no predictions under {source_root} (run `cellmap-repro predict -e {experiment_name}` first)")
    with exclusive(out_root / LOCK_NAME, f"the processed masks of {experiment_name} ({out_root})"):
        _process_crops(crops, config, instance_names, out_root, overwrite, progress)
    return out_root


def _process_crops(crops: list[Path], config, instance_names: set[str], out_root: Path, overwrite: bool, progress: bool) -> None:
    import zarr
    from tqdm import tqdm

    for crop in crops:
        source = zarr.open_group(str(crop), mode="r")
        record = dict(source.attrs.get(ATTRS_KEY, {}))
        classes = chosen_classes(config, list(source.group_keys()), crop)
        target = out_root / crop.parent.name / crop.name
        wanted = {"source": record, "threshold": {c: class_threshold(config, c) for c in classes}, "connectivity": config.connectivity, "min_instance_size": config.min_instance_size}
        if target.exists() and not overwrite and zarr.open_group(str(target), mode="r").attrs.get(ATTRS_KEY) == wanted:
            print(f"{crop.parent.name}/{crop.name}: up to date, skipped")
            continue
        zarr.open_group(str(target.parent), mode="a")
        with atomic_directory(target) as partial:
            out = zarr.open_group(str(partial), mode="w")
            for class_name in tqdm(classes, desc=f"process {crop.parent.name}/{crop.name}", unit="class", disable=not progress):
                levels = read_levels(crop / class_name)
                logits = read_region(zarr.open_array(str(crop / class_name / levels[0].path), mode="r"), (slice(None),) * len(levels[0].scale))
                is_instance = class_name in instance_names
                result = process_volume(logits, class_threshold(config, class_name), is_instance, config.connectivity, config.min_instance_size)
                group = out.create_group(class_name)
                group.attrs.update(multiscale_attrs([levels[0]], name=class_name))
                group.create_dataset("s0", data=result, chunks=tuple(min(64, s) for s in result.shape), dimension_separator="/")
            out.attrs[ATTRS_KEY] = wanted


def run(args: argparse.Namespace) -> int:
    from cellmap_repro import volume

    if volume.volume_requested(args):
        out = volume.process_volume(args.experiment, args.experiments_root, args.data, args.roi, args.dataset, args.workers, volume.launcher_words(args.launcher), args.overwrite)
        print(f"processed: {out}")
        return 0
    out = process(args.experiment, args.experiments_root, args.data, args.overwrite)
    print(f"processed: {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("process", help="threshold / instance-label predictions per process_config.py", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="process again even where up-to-date output exists")
    from cellmap_repro.volume import add_region_arguments

    add_region_arguments(parser, predicting=False)
    parser.set_defaults(func=run)
