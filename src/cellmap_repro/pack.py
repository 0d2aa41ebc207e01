"""`cellmap-repro pack`: the challenge submission zip from processed test-crop predictions.

Reads the test-crop manifest (``crop_name,dataset,class_label,voxel_size,translation,
shape``; one row per scored class of a crop), resamples each processed volume to that
row's voxel size, translation and shape (nearest for instance ids, linear then > 0.5 for
masks), checks every row first (a missing crop or class, or a prediction that does not
cover the crop, is an error naming it; with ``--allow-missing`` a missing one is left out
with a warning, as the toolbox's packer does, and scored as not submitted), then writes one zarr v2 hierarchy
``crop<id>/<class>`` with ``voxel_size``, ``translation`` and ``shape`` attributes and zips
it with the zarr's contents at the zip root. Semantic masks are uint8 as the toolbox
writes them; instance ids use the smallest unsigned type that holds them (the toolbox's
uint8 cast wraps ids above 255).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellmap_repro import metrics, settings
from cellmap_repro.classes import class_table
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_output_path, confined, read_levels


@dataclass(frozen=True)
class TestCropRow:
    crop_id: int
    dataset: str
    class_name: str
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]


def _vector(text: str, kind=float) -> tuple:
    return tuple(kind(float(v)) for v in text.strip().strip("[]").split(";"))


def read_manifest(path: Path) -> list[TestCropRow]:
    if not Path(path).exists():
        raise ReproError(f"test crop manifest not found: {path}")
    rows = []
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                rows.append(
                    TestCropRow(
                        int(str(row["crop_name"]).removeprefix("crop")),
                        row["dataset"],
                        row["class_label"],
                        _vector(row["voxel_size"]),
                        _vector(row["translation"]),
                        _vector(row["shape"], int),
                    )
                )
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise ReproError(f"{path}:{line}: malformed test-crop row ({exc})") from None
    if not rows:
        raise ReproError(f"{path}: no rows")
    return rows


def _smallest_uint(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype)
    return array.astype(np.uint64)


def missing_rows(rows: list[TestCropRow], processed_root: Path) -> list[TestCropRow]:
    return [row for row in rows if not _prediction_group(processed_root, row).exists()]


def _check_names(rows: list[TestCropRow], processed_root: Path, manifest: Path) -> None:
    """A row's dataset and class label name one folder each under the processed root
    (and the class one member folder of the zip): refuse anything else before reading."""
    for row in rows:
        confined(processed_root, row.dataset, f"{manifest}: crop {row.crop_id} dataset", plain=True)
        confined(processed_root, row.class_name, f"{manifest}: crop {row.crop_id} class_label", plain=True)


def _prediction_group(processed_root: Path, row: TestCropRow) -> Path:
    return processed_root / f"{row.dataset}.zarr" / f"crop{row.crop_id}" / row.class_name


def prepare(rows: list[TestCropRow], processed_root: Path) -> list[tuple[TestCropRow, np.ndarray]]:
    """Resample every row's prediction; fail on the first missing or non-covering one."""
    import zarr

    table = class_table()
    prepared = []
    for row in rows:
        group = _prediction_group(processed_root, row)
        if not group.exists():
            raise ReproError(f"no processed prediction for crop {row.crop_id} class '{row.class_name}' ({group}; --allow-missing packs the rest)")
        level = read_levels(group)[0]
        data = zarr.open_array(str(group / level.path), mode="r")[:]
        if not metrics.covers(level.scale, level.translation, data.shape, row.voxel_size, row.translation, row.shape):
            have = [v.tolist() for v in metrics.extent(level.scale, level.translation, data.shape)]
            want = [v.tolist() for v in metrics.extent(row.voxel_size, row.translation, row.shape)]
            raise ReproError(f"prediction for crop {row.crop_id} class '{row.class_name}' covers {have[0]}-{have[1]} nm, not the crop's {want[0]}-{want[1]} nm ({group})")
        instance = table[row.class_name].instance if row.class_name in table else False
        resampled = metrics.resample_to(data, level.scale, level.translation, row.shape, row.voxel_size, row.translation, instance)
        prepared.append((row, _smallest_uint(resampled) if instance else (resampled > 0).astype(np.uint8)))
    return prepared


def write_submission(prepared, out_zip: Path) -> Path:
    import zarr

    with tempfile.TemporaryDirectory(dir=out_zip.parent) as scratch:
        store_path = Path(scratch) / "submission.zarr"
        root = zarr.open_group(str(store_path), mode="w")
        for row, data in prepared:
            crop = root.require_group(f"crop{row.crop_id}")
            array = crop.create_dataset(row.class_name, data=data, chunks=tuple(min(64, s) for s in data.shape))
            array.attrs.update({"voxel_size": list(row.voxel_size), "translation": list(row.translation), "shape": list(row.shape)})
        with atomic_output_path(out_zip) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(store_path.rglob("*")):
                    if path.is_file():
                        archive.write(path, path.relative_to(store_path).as_posix())
    return out_zip


def validate_submission(zip_path: Path, rows: list[TestCropRow]) -> None:
    """Reopen a submission zip and check every manifest row against it."""
    import zarr

    store = zarr.ZipStore(str(zip_path), mode="r")
    try:
        root = zarr.open_group(store, mode="r")
        for row in rows:
            key = f"crop{row.crop_id}/{row.class_name}"
            if key not in root:
                raise ReproError(f"{zip_path}: missing {key}")
            array = root[key]
            if tuple(array.shape) != tuple(row.shape):
                raise ReproError(f"{zip_path}: {key} has shape {array.shape}, manifest says {row.shape}")
            if tuple(array.attrs["voxel_size"]) != tuple(row.voxel_size) or tuple(array.attrs["translation"]) != tuple(row.translation):
                raise ReproError(f"{zip_path}: {key} voxel size/translation differ from the manifest")
            if array.dtype.kind != "u":
                raise ReproError(f"{zip_path}: {key} has dtype {array.dtype}, expected unsigned integers")
    finally:
        store.close()


def pack(experiment: str, manifest: Path, data_root=None, out: Path | None = None, allow_missing: bool = False) -> tuple[Path, list[str]]:
    """Write and validate the submission zip; returns it and one warning per item left out."""
    data = settings.data_root(data_root)
    rows = read_manifest(Path(manifest))
    processed_root = settings.processed_root(data, experiment)
    _check_names(rows, processed_root, manifest)
    out_zip = Path(out) if out else data / "submissions" / f"{experiment}.zip"
    warnings = []
    if allow_missing:
        missing = missing_rows(rows, processed_root)
        if len(missing) == len(rows):
            raise ReproError(f"no processed prediction under {processed_root} for any row of {manifest}; nothing to pack")
        warnings = [f"crop {row.crop_id} class '{row.class_name}': no processed prediction ({_prediction_group(processed_root, row)}); left out, scored as not submitted" for row in missing]
        rows = [row for row in rows if row not in missing]
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    prepared = prepare(rows, processed_root)
    write_submission(prepared, out_zip)
    validate_submission(out_zip, rows)
    return out_zip, warnings


def run(args: argparse.Namespace) -> int:
    out, warnings = pack(args.experiment, Path(args.manifest), args.data, Path(args.out) if args.out else None, args.allow_missing)
    for warning in warnings:
        print(f"warning: {warning}")
    partial = f"; {len(warnings)} item(s) left out" if warnings else ""
    print(f"submission: {out} (validated against {args.manifest}{partial})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("pack", help="write and validate a submission zip from processed test crops", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--manifest", required=True, help="the challenge's test_crop_manifest.csv")
    parser.add_argument("--out", default=None, help="output zip (default <data>/submissions/<experiment>.zip)")
    parser.add_argument("--allow-missing", action="store_true", help="pack a partial submission: leave out (with a warning each) crops and classes without a processed prediction")
    parser.set_defaults(func=run)
