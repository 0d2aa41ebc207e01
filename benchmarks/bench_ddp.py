"""Several training processes against one: agreement, repeatability, the loss definition.

Usage (repository root; writes the tiny crop into a scratch folder):

    .venv/bin/python benchmarks/bench_ddp.py [--nproc 2] [--epochs 2] [--iterations 3]
        [--batch-size 2] [--loss-steps 16]

1. **Loss definition** (in this process, no DDP): for the first ``--loss-steps`` global
   batches of the fast test experiment, each split into ``--nproc`` shards the way the
   ranks take them, the mean of the shards' masked means (what plain DDP gradient
   averaging of per-rank losses trains) against the global batch's masked mean (what
   cellmap-repro trains, as one process does): relative difference of the loss and of
   its gradient, and how unequal the shards' known-voxel counts are.
2. **Runs** of the fast experiment (CPU, gloo, 1 thread per process): once with one
   process, twice with ``--nproc`` processes (``cellmap-repro train --nproc``, i.e.
   torchrun). Prints whether the two multi-process runs have the same checkpoint
   sha256, the max abs parameter difference and the validation difference against the
   one-process run, and wall times (a sanity figure on a small shared CPU, not a speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST = REPO / "tests" / "experiments" / "fast"


def scratch_experiment(root: Path, container: Path) -> None:
    from cellmap_repro import tiny_crop
    from cellmap_repro.datasplit import write_datasplit
    from cellmap_repro.experiment import load_experiment

    target = root / "fast"
    shutil.copytree(FAST, target, ignore=shutil.ignore_patterns("logs", "checkpoints", "__pycache__", "datasplit.csv"))
    classes = load_experiment("fast", root, parts=("data",)).classes
    write_datasplit(target / "datasplit.csv", tiny_crop.datasplit_rows(container, classes))


def loss_definition(root: Path, nproc: int, steps: int, batch: int) -> dict:
    import torch

    from cellmap_repro import data, train
    from cellmap_repro.experiment import load_experiment, run_seed

    seed = run_seed(root / "fast")
    experiment = load_experiment("fast", root, parts=("train_config",), seed=seed)
    config = experiment.train
    training = data.build(experiment)
    criterion = train.make_criterion(config, training.class_weights())
    samples = data.RunSamples(training.train, seed, steps * batch, steps * batch, training.crop_weights())
    params = [p for p in config.model.parameters() if p.requires_grad]
    loss_gaps, grad_gaps, count_ratios = [], [], []
    for step in range(steps):
        sums, counts = [], []
        for rank in range(nproc):
            shard = [samples[step * batch + rank + k * nproc] for k in range(batch // nproc)]
            inputs = torch.stack([s[data.INPUT_KEY] for s in shard])
            target = torch.stack([s[data.TARGET_KEY] for s in shard])
            known = ~torch.isnan(target)
            per_voxel = criterion(config.model(inputs), torch.nan_to_num(target, nan=0.0))
            sums.append((per_voxel * known).sum())
            counts.append(known.sum())
        global_mean = sum(sums) / sum(counts).clamp(min=1)
        mean_of_means = sum(s / c.clamp(min=1) for s, c in zip(sums, counts)) / nproc
        g_global = torch.cat([g.flatten() for g in torch.autograd.grad(global_mean, params, retain_graph=True)])
        g_naive = torch.cat([g.flatten() for g in torch.autograd.grad(mean_of_means, params)])
        loss_gaps.append(float((abs(mean_of_means - global_mean) / global_mean).detach()))
        grad_gaps.append(float((g_naive - g_global).norm() / g_global.norm()))
        count_ratios.append(float(min(counts)) / max(float(max(counts)), 1.0))
    return {
        "loss_relative_difference": {"mean": statistics.mean(loss_gaps), "max": max(loss_gaps)},
        "gradient_relative_difference": {"mean": statistics.mean(grad_gaps), "max": max(grad_gaps)},
        "known_voxels_min_over_max": {"mean": statistics.mean(count_ratios), "min": min(count_ratios)},
        "steps_with_unequal_counts": sum(r < 1.0 for r in count_ratios),
        "steps": steps,
    }


def train_run(root: Path, data_root: Path, nproc: int, args) -> dict:
    command = [sys.executable, "-m", "cellmap_repro", "train", "-e", "fast", "--overwrite", "--epochs", str(args.epochs)]
    command += ["--iterations-per-epoch", str(args.iterations), "--batch-size", str(args.batch_size), "--validation-batches", "1"]
    command += ["--nproc", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "CELLMAP_REPRO_EXPERIMENTS": str(root), "CELLMAP_REPRO_DATA": str(data_root), "CELLMAP_REPRO_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"training with {nproc} process(es) failed:\n{result.stderr[-3000:]}")
    checkpoints = root / "fast" / "checkpoints"
    return {"wall_s": wall, "manifest": json.loads((checkpoints / "manifest.json").read_text()), "dir": checkpoints}


def parameter_difference(one: Path, many: Path) -> float:
    from cellmap_repro import checkpoint

    a, b = checkpoint.load(one)["model"], checkpoint.load(many)["model"]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--loss-steps", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("CELLMAP_REPRO_THREADS", "1")

    from cellmap_repro import tiny_crop

    scratch = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        container = tiny_crop.write_dataset(scratch / "data", seed=0)
        roots = {name: scratch / name for name in ("loss", "one", "many", "again")}
        for root in roots.values():
            root.mkdir()
            scratch_experiment(root, container)
        import torch

        torch.set_num_threads(1)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.nproc} processes, global batch {args.batch_size}")
        print("loss definition:", json.dumps(loss_definition(roots["loss"], args.nproc, args.loss_steps, args.batch_size), indent=1))
        one = train_run(roots["one"], scratch / "data", 1, args)
        many = train_run(roots["many"], scratch / "data", args.nproc, args)
        again = train_run(roots["again"], scratch / "data", args.nproc, args)
        for epoch, entry in many["manifest"]["checkpoints"].items():
            same = entry["sha256"] == again["manifest"]["checkpoints"][epoch]["sha256"]
            name = entry["file"]
            difference = parameter_difference(one["dir"] / name, many["dir"] / name)
            validation = abs(entry["validation"] - one["manifest"]["checkpoints"][epoch]["validation"])
            print(f"epoch {epoch}: {args.nproc}-process runs same sha256: {same}; max |param 1 - param {args.nproc}| = {difference:.3g}; |validation difference| = {validation:.3g}")
        print(f"wall: 1 process {one['wall_s']:.1f} s; {args.nproc} processes {many['wall_s']:.1f} s and {again['wall_s']:.1f} s (start-up included)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
