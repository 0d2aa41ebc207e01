"""Where things live: every location has a default, an environment variable and a flag.

Relative paths are resolved against the directory the command runs from (the
repository root, natively and in the container), so a committed ``datasplit.csv``
with ``data/...`` paths works on every machine.

| setting         | env variable                | default              |
|-----------------|-----------------------------|----------------------|
| data root       | ``CELLMAP_REPRO_DATA``      | ``data``             |
| experiments     | ``CELLMAP_REPRO_EXPERIMENTS`` | ``experiments``    |
| weights cache   | ``CELLMAP_REPRO_WEIGHTS``   | ``<data>/weights``   |
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_EXPERIMENT = "setup_04_all"


def data_root(value: str | os.PathLike | None = None) -> Path:
    return Path(value or os.environ.get("CELLMAP_REPRO_DATA") or "data").absolute()


def experiments_root(value: str | os.PathLike | None = None) -> Path:
    return Path(value or os.environ.get("CELLMAP_REPRO_EXPERIMENTS") or "experiments").absolute()


def weights_root(value: str | os.PathLike | None = None, data: Path | None = None) -> Path:
    explicit = value or os.environ.get("CELLMAP_REPRO_WEIGHTS")
    if explicit:
        return Path(explicit).absolute()
    return data_root(data) / "weights"


def predictions_root(data: Path, experiment: str) -> Path:
    """Model outputs (float logits) per experiment: ``<data>/predictions/<exp>/``."""
    return data / "predictions" / experiment


def processed_root(data: Path, experiment: str) -> Path:
    """Thresholded / instance-labelled masks per experiment: ``<data>/processed/<exp>/``."""
    return data / "processed" / experiment


def dataset_container(data: Path, dataset: str) -> Path:
    """A dataset's zarr container in the data root layout: ``<data>/<dataset>/<dataset>.zarr``."""
    return data / dataset / f"{dataset}.zarr"


def volume_dir(stage_root: Path, dataset: str, roi_name: str) -> Path:
    """A whole-volume (blockwise) output beside the crops: ``<stage root>/<dataset>.zarr/<roi name>``."""
    return stage_root / f"{dataset}.zarr" / roi_name


def resolve(path: str | os.PathLike) -> Path:
    """A path from a config or datasplit file, relative to the working directory."""
    return Path(path).expanduser().absolute()


def add_experiment_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-e",
        "--experiment",
        default=os.environ.get("EXP", DEFAULT_EXPERIMENT),
        help="experiment folder name under the experiments root (default: $EXP or %(default)s)",
    )
    parser.add_argument(
        "--experiments-root",
        default=None,
        help="folder holding experiment folders (default: $CELLMAP_REPRO_EXPERIMENTS or ./experiments)",
    )


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="data root (default: $CELLMAP_REPRO_DATA or ./data)",
    )
