"""Whole-volume prediction throughput on daisy: blocks/s for 1 and 2 workers, side by side.

Usage (repository root):

    .venv/bin/python benchmarks/bench_volume.py [--workers 1 2] [--block-tiles 2]
        [--threads 1] [--roi Z0:Z1,Y0:Y1,X0:X1] [--device cpu|cuda]

A scratch copy of the test experiment ``tests/experiments/fast`` (four 3x3x3 convolutions,
40³ -> 32³ tiles) is trained for one iteration on the tiny crop, then the tiny dataset's
whole raw (256³ voxels at 8 nm: 512 tiles in 64 blocks of 2³ tiles by default) is
predicted from nothing once per worker count, each into its own scratch data root:

* blocks/s over the whole run (``predict_volume``: the driver's checks, daisy, worker
  start-up including each worker's model load, every block, the final rename);
* worker start-up: the same run over one block per worker (same worker count: every worker
  starts, as in the whole run);
* blocks/s after start-up: (blocks - workers) / (whole run - start-up run);
* worker CPU seconds per block after start-up (the same difference, in CPU time of the
  worker processes): independent of how busy the machine is.

All worker counts must give bitwise equal outputs (checked). The machine is named in the
output; absolute figures mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    from cellmap_repro.determinism import available_cores
    from cellmap_repro.manifest import _cpu_model

    return f"{_cpu_model()}, {available_cores()} cores ({platform.machine()})"


def prepare(work: Path) -> Path:
    """Tiny dataset plus a trained scratch copy of the fast experiment; returns the raw's data root."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import FAST_EXPERIMENT, copy_experiment

    from cellmap_repro import tiny_crop, train

    container = tiny_crop.write_dataset(work / "raw", seed=0)
    (work / "experiments").mkdir()
    os.environ["CELLMAP_REPRO_EXPERIMENTS"] = str(work / "experiments")
    os.environ["CELLMAP_REPRO_DATA"] = str(work / "raw")
    copy_experiment(FAST_EXPERIMENT, work / "experiments", container)
    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    return work / "raw"


def timed_run(data: Path, roi: str | None, workers: int, args) -> tuple[float, float, Path]:
    """Wall seconds, CPU seconds of the workers (children, waited for), output folder."""
    from cellmap_repro import volume

    shutil.rmtree(data, ignore_errors=True)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = volume.predict_volume("fast", data_root=data, roi=roi, dataset="jrc_tiny-1", workers=workers, threads=args.threads, block_tiles=args.block_tiles, progress=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, out


def main() -> None:
    import numpy as np
    import zarr

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare (default: 1 2)")
    parser.add_argument("--block-tiles", type=int, default=2, help="tiles per block edge (default 2: 64³-voxel blocks)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--roi", default=None, help="region in nm (default: the whole tiny raw, 0:2048 per axis)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    os.environ["CELLMAP_REPRO_DEVICE"] = args.device
    tile_nm = 32 * 8.0 * args.block_tiles
    rows, outputs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-volume-") as scratch:
        work = Path(scratch)
        prepare(work)
        for workers in args.workers:
            whole, whole_cpu, out = timed_run(work / f"data-{workers}", args.roi, workers, args)
            record = zarr.open_group(str(out), mode="r").attrs["cellmap_repro"]
            blocks = int(np.prod([-(-s // b) for s, b in zip(record["shape"], record["block"])]))
            outputs.append({name: zarr.open_array(str(out / name / "s0"), mode="r")[:] for name in record["classes"]})
            # one block per worker, in a row along x
            one_each = f"0:{tile_nm:g},0:{tile_nm:g},0:{tile_nm * workers:g}"
            startup, startup_cpu, _ = timed_run(work / f"one-{workers}", one_each, workers, args)
            rows.append((workers, blocks, record["block"], whole, startup, (whole_cpu - startup_cpu) / (blocks - workers)))
    equal = all(all(np.array_equal(o[k], outputs[0][k]) for k in o) for o in outputs[1:])
    print(f"machine: {machine(args.device)}; fast experiment, {args.threads} torch thread(s) per worker, load average {os.getloadavg()[0]:.1f}")
    print("| workers | blocks (voxels each) | whole run | blocks/s | start-up (a block per worker) | blocks/s after start-up | worker CPU per block |")
    print("|---|---|---|---|---|---|---|")
    for workers, blocks, block, whole, startup, cpu in rows:
        steady = (blocks - workers) / max(whole - startup, 1e-9)
        print(f"| {workers} | {blocks} ({'x'.join(map(str, block))}) | {whole:.1f} s | {blocks / whole:.2f} | {startup:.1f} s | {steady:.2f} | {cpu:.2f} s |")
    base = rows[0]
    for workers, blocks, _, whole, startup, cpu in rows[1:]:
        print(f"{workers} workers vs {base[0]}: {(blocks / whole) / (base[1] / base[3]):.2f}x blocks/s overall, {((blocks - workers) / (whole - startup)) / ((base[1] - base[0]) / (base[3] - base[4])):.2f}x after start-up, {base[5] / cpu:.2f}x worker CPU per block")
    print(f"outputs of every worker count bitwise equal: {equal}")
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
