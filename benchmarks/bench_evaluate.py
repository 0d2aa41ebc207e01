"""Time the current scoring of one 4 nm crop of 400^3 voxels with 10 instance classes.

Usage: .venv/bin/python benchmarks/bench_evaluate.py [--size 400] [--classes 10] [--objects 25]
       [--scoring current|legacy] [--end-to-end | --submission]

Truth: per class, ``objects`` random spheres; prediction: the same spheres shifted by
one voxel, one dropped and one spurious sphere added (so matching, Hausdorff and the
false positive/negative paths all run). Prints seconds per class and in total.

By default only the metric is timed. ``--end-to-end`` writes the crop as the pipeline
lays it out (truth at 4 nm, processed predictions at 8 nm, as setup_04_all predicts) in a
scratch folder and times ``evaluate_experiment``: zarr reads, resampling to the 4 nm
grid, scoring and the JSON/Markdown/PNG outputs. ``--submission`` writes the truth as a
zarr and the predictions (at 8 nm) as a submission zip and times ``evaluate --submission``
in the default exact mode and with ``--leaderboard``, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cellmap_repro import metrics

# instance classes of the challenge, so evaluate scores them as instances
INSTANCE_CLASSES = ["nuc", "ves", "endo", "lyso", "ld", "perox", "mito", "np", "mt", "cell"]


def spheres(shape, centres, radii) -> np.ndarray:
    volume = np.zeros(shape, np.uint32)
    for label, (centre, radius) in enumerate(zip(centres, radii), start=1):
        lo = np.maximum(centre - radius, 0)
        hi = np.minimum(centre + radius + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        axes = np.ogrid[box]
        local = sum((axis - c) ** 2 for axis, c in zip(axes, centre)) <= radius**2
        volume[box][local] = label
    return volume


def class_volumes(rng, size: int, objects: int):
    shape = (size,) * 3
    centres = rng.integers(20, size - 20, size=(objects, 3))
    radii = rng.integers(5, 18, size=objects)
    truth = spheres(shape, centres, radii)
    shifted = centres + 1
    pred = spheres(shape, np.vstack([shifted[1:], rng.integers(20, size - 20, size=(1, 3))]), np.append(radii[1:], 9))
    return truth, pred


def metric_only(args) -> None:
    rng = np.random.default_rng(0)
    total = 0.0
    for index in range(args.classes):
        truth, pred = class_volumes(rng, args.size, args.objects)
        start = time.perf_counter()
        if args.scoring == "legacy":
            scores = metrics.legacy_instance(truth, pred, (4.0, 4.0, 4.0))
            summary = f"accuracy {scores['accuracy']:.4f}, combined {scores['combined_score']:.3f}"
        else:
            counts = metrics.instance_counts(truth, pred, (4.0, 4.0, 4.0))
            summary = f"tp {counts.tp}, fp {counts.fp}, fn {counts.fn}, combined {counts.combined:.3f}"
        elapsed = time.perf_counter() - start
        total += elapsed
        print(f"class {index}: {elapsed:.1f} s ({summary})")
    print(f"total: {total:.1f} s for {args.classes} instance classes on {args.size}^3 voxels ({args.scoring} scoring)")


def write_level(group_path: Path, data: np.ndarray, scale, translation, name: str) -> None:
    import zarr

    from cellmap_repro.storage import ScaleLevel, multiscale_attrs

    group = zarr.open_group(str(group_path), mode="a")
    group.attrs.update(multiscale_attrs([ScaleLevel("s0", list(scale), list(translation))], name=name))
    group.create_dataset("s0", data=data, chunks=(64, 64, 64), overwrite=True)


def end_to_end(args) -> None:
    from cellmap_repro.datasplit import DatasplitRow, write_datasplit
    from cellmap_repro.evaluate import evaluate_experiment

    rng = np.random.default_rng(0)
    classes = INSTANCE_CLASSES[: args.classes]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        container = root / "data" / "jrc_bench-1" / "jrc_bench-1.zarr"
        crop = container / "recon-1/labels/groundtruth/crop1"
        processed = root / "data" / "processed" / "bench" / "jrc_bench-1.zarr" / "crop1"
        for name in classes:
            truth, pred = class_volumes(rng, args.size, args.objects)
            write_level(crop / name, truth, (4.0,) * 3, (2.0,) * 3, name)
            # predictions at 8 nm: every other voxel of the 4 nm spheres, on the 8 nm grid
            # whose voxels each hold two 4 nm voxels per axis
            write_level(processed / name, pred[::2, ::2, ::2], (8.0,) * 3, (4.0,) * 3, name)
        experiment = root / "experiments" / "bench"
        experiment.mkdir(parents=True)
        # evaluate reads the datasplit that data.py names: a minimal experiment folder
        (experiment / "__init__.py").write_text("")
        (experiment / "data.py").write_text(f"classes = {classes!r}\n")
        write_datasplit(experiment / "datasplit.csv", [DatasplitRow("validate", str(container), "recon-1/em/fibsem-uint8", str(container), "recon-1/labels/groundtruth/crop1", classes)])
        start = time.perf_counter()
        result = evaluate_experiment(experiment, root / "data", scoring=args.scoring, progress=False)
        elapsed = time.perf_counter() - start
    print(f"end to end: {elapsed:.1f} s for {len(classes)} instance classes on {args.size}^3 voxels ({args.scoring} scoring; overall instance score {result['overall_instance_score']:.3f})")


def submission(args) -> None:
    """Exact and --leaderboard scoring of one submission zip side by side (same crop, same run)."""
    import zipfile

    import zarr

    from cellmap_repro.evaluate import evaluate_submission

    rng = np.random.default_rng(0)
    classes = INSTANCE_CLASSES[: args.classes]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        truth_root = zarr.open_group(str(root / "truth.zarr"), mode="w")
        made = root / "made"
        for name in classes:
            truth, pred = class_volumes(rng, args.size, args.objects)
            truth_root.require_group("crop1").create_dataset(name, data=truth, chunks=(64, 64, 64)).attrs.update({"voxel_size": [4.0] * 3, "translation": [2.0] * 3})
            # submitted at 8 nm, so both modes resample (the toolbox with its rescale)
            array = zarr.open_array(str(made / "crop1" / name), mode="w", shape=pred[::2, ::2, ::2].shape, dtype=pred.dtype, chunks=(64, 64, 64))
            array[:] = pred[::2, ::2, ::2]
            array.attrs.update({"voxel_size": [8.0] * 3, "translation": [4.0] * 3})
        with zipfile.ZipFile(root / "sub.zip", "w") as archive:
            for file in sorted(made.rglob("*")):
                if file.is_file():
                    archive.write(file, file.relative_to(made).as_posix())
        times = {}
        # a first run pays for imports (matplotlib, OR-Tools) and cold caches: not counted
        evaluate_submission(root / "sub.zip", root / "truth.zarr", root / "warm-up", progress=False)
        for leaderboard in (False, True):
            start = time.perf_counter()
            result = evaluate_submission(root / "sub.zip", root / "truth.zarr", root / f"out-{leaderboard}", leaderboard=leaderboard, progress=False)
            times[leaderboard] = time.perf_counter() - start
            print(f"{'leaderboard' if leaderboard else 'exact'}: {times[leaderboard]:.1f} s, overall instance score {result['overall_instance_score']:.4f} ({result['matching']})")
    print(f"leaderboard / exact time: {times[True] / times[False]:.2f} for {len(classes)} instance classes on {args.size}^3 voxels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--objects", type=int, default=25)
    parser.add_argument("--scoring", choices=["current", "legacy"], default="current")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--submission", action="store_true", help="time evaluate --submission, exact and --leaderboard, on one zip")
    args = parser.parse_args()
    if args.submission:
        submission(args)
    else:
        end_to_end(args) if args.end_to_end else metric_only(args)


if __name__ == "__main__":
    main()
