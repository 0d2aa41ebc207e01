"""Time the current scoring of one 4 nm crop of 400^3 voxels with 10 instance classes.

Usage: .venv/bin/python benchmarks/bench_evaluate.py [--size 400] [--classes 10] [--objects 25]

Truth: per class, ``objects`` random spheres; prediction: the same spheres shifted by
one voxel, one dropped and one spurious sphere added (so matching, Hausdorff and the
false positive/negative paths all run). Prints seconds per class and in total.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cellmap_repro import metrics


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--objects", type=int, default=25)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size,) * 3
    total = 0.0
    for index in range(args.classes):
        centres = rng.integers(20, args.size - 20, size=(args.objects, 3))
        radii = rng.integers(5, 18, size=args.objects)
        truth = spheres(shape, centres, radii)
        shifted = centres + 1
        pred = spheres(shape, np.vstack([shifted[1:], rng.integers(20, args.size - 20, size=(1, 3))]), np.append(radii[1:], 9))
        start = time.perf_counter()
        counts = metrics.instance_counts(truth, pred, (4.0, 4.0, 4.0))
        elapsed = time.perf_counter() - start
        total += elapsed
        print(f"class {index}: {elapsed:.1f} s (tp {counts.tp}, fp {counts.fp}, fn {counts.fn}, combined {counts.combined:.3f})")
    print(f"total: {total:.1f} s for {args.classes} instance classes on {args.size}^3 voxels")


if __name__ == "__main__":
    main()
