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
import math
import os
import re
from pathlib import Path

from cellmap_repro.errors import ReproError

DEFAULT_EXPERIMENT = "setup_04_all"
SEED_RANGE = (0, 2**63 - 1)


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


# ---------------------------------------------------------------- numbers from flags and environment
#
# Every numeric setting a user types (a flag, an environment variable) is read here:
# one rule for what counts as a number, one wording for the error.


def _bounds(minimum: float | None, maximum: float | None, above: bool = False) -> str:
    if maximum is None:
        return f"> {minimum}" if above else f">= {minimum}"
    return f"from {minimum} to {maximum}"


def whole_number(text, minimum: int | None = 0, maximum: int | None = None, name: str | None = None) -> int:
    """``text`` as a whole number within [minimum, maximum], or one clear error naming ``name``."""
    value = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", value):
        number = int(value)
        if (minimum is None or number >= minimum) and (maximum is None or number <= maximum):
            return number
    raise ReproError(f"{name + ' ' if name else ''}must be a whole number {_bounds(minimum, maximum)}, got {str(text)!r}")


def real_number(text, minimum: float, maximum: float | None = None, above: bool = False, name: str | None = None) -> float:
    """``text`` as a finite number within the bounds (``above``: strictly above ``minimum``)."""
    try:
        number = float(str(text).strip())
    except ValueError:
        number = math.nan
    low_ok = number > minimum if above else number >= minimum
    if math.isfinite(number) and low_ok and (maximum is None or number <= maximum):
        return number
    raise ReproError(f"{name + ' ' if name else ''}must be a number {_bounds(minimum, maximum, above)}, got {str(text)!r}")


def from_environment(variable: str, minimum: int = 0, maximum: int | None = None) -> int | None:
    """A whole-number environment variable; None when unset or empty."""
    text = os.environ.get(variable, "").strip()
    return whole_number(text, minimum, maximum, name=variable) if text else None


def number_flag(minimum: float = 0, maximum: float | None = None, real: bool = False, above: bool = False):
    """An argparse ``type=`` for a numeric flag: a bad value is one line naming the flag."""

    def parse(text: str):
        try:
            return real_number(text, minimum, maximum, above) if real else whole_number(text, minimum, maximum)
        except ReproError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


SEED_FLAG = number_flag(*SEED_RANGE)
