"""Training throughput of an experiment with deterministic settings on and off.

Usage (from the repository root, after `make smoke` so the tiny crop exists):

    .venv/bin/python benchmarks/bench_train.py [--experiment setup_04_all] [--iterations 4]

Each variant trains a scratch copy of the experiment (batch 1, one epoch, no
validation) and reports iterations/s measured between the first and last logged
training step, so model building and data set-up are excluded. Prints a Markdown
table row per variant, with the hardware, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path


def steps_per_second(tensorboard_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    events = accumulator.Scalars("loss")
    if len(events) < 2:
        raise SystemExit("need at least 2 iterations to measure a rate")
    return (len(events) - 1) / (events[-1].wall_time - events[0].wall_time)


def run_variant(experiment: str, deterministic: bool, iterations: int) -> float:
    from cellmap_repro import train

    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        target = scratch / experiment
        shutil.copytree(Path("experiments") / experiment, target, ignore=shutil.ignore_patterns("logs", "checkpoints", "__pycache__"))
        with open(target / "train_config.py", "a") as handle:
            handle.write(f"\ndeterministic = {deterministic}\n")
        overrides = train.Overrides(epochs=1, iterations_per_epoch=iterations, batch_size=1, validation_batches=0)
        result = train.train(experiment, scratch, overrides, progress=False)
        return steps_per_second(result.tensorboard_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    from cellmap_repro.manifest import _cpu_model

    return f"{_cpu_model()}, {torch.get_num_threads()} threads ({platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="setup_04_all")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    figures = {}
    for deterministic in (True, False):
        figures["deterministic" if deterministic else "default"] = run_variant(args.experiment, deterministic, args.iterations)
    where = hardware()
    print("| experiment | hardware | settings | iterations/s | s/iteration |")
    print("|---|---|---|---|---|")
    for name, rate in figures.items():
        print(f"| {args.experiment} | {where} | {name} | {rate:.4f} | {1 / rate:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": where, "iterations_per_second": figures}, indent=2))


if __name__ == "__main__":
    main()
