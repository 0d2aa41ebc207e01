"""`cellmap-repro smoke`: the whole pipeline on the tiny crop, in a few minutes on a CPU.

Writes the tiny synthetic crop and weights, trains ``setup_04_all`` for 2 epochs of 2
iterations (batch 1, one validation batch), predicts the validation crop, processes it,
evaluates it when the evaluate stage is installed, and prints where everything is.
It refuses to replace checkpoints of a run that was not itself a smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from cellmap_repro import manifest, settings
from cellmap_repro.errors import ReproError

SMOKE_OVERRIDES = {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 1, "validation_batches": 1, "checkpoint_every": 1}


def _may_replace(checkpoints_dir: Path) -> bool:
    if not any(checkpoints_dir.glob("*.pth")):
        return True
    path = checkpoints_dir / manifest.MANIFEST_NAME
    if not path.exists():
        return False
    recorded = manifest.read(path).get("overrides", {})
    return all(recorded.get(k) == v for k, v in SMOKE_OVERRIDES.items())


def smoke(experiment: str, experiments_root=None, data_root=None, seed: int = 0) -> dict:
    from cellmap_repro import predict, process, tiny_crop, train
    from cellmap_repro.experiment import experiment_checkpoints_dir, experiment_dir

    data = settings.data_root(data_root)
    timings: dict[str, float] = {}
    started = time.monotonic()

    def lap(name: str) -> None:
        nonlocal started
        now = time.monotonic()
        timings[name] = round(now - started, 1)
        started = now

    checkpoints_dir = experiment_checkpoints_dir(experiment, experiments_root)
    if not _may_replace(checkpoints_dir):
        raise ReproError(f"{checkpoints_dir} holds a real (non-smoke) run; move it away or use another experiment for the smoke run")
    info = tiny_crop.write_tiny_crop(data, seed=seed)
    tiny_crop.write_experiment_datasplit(experiment, experiments_root, Path(info["dataset"]))
    lap("tiny-crop")
    result = train.train(experiment, experiments_root, train.Overrides(**SMOKE_OVERRIDES), overwrite=True)
    lap("train")
    predictions = predict.predict(experiment, experiments_root, data, "best", overwrite=True)
    lap("predict")
    processed = process.process(experiment, experiments_root, data, overwrite=True)
    lap("process")
    outputs = {
        "data": info["dataset"],
        "checkpoints": str(result.checkpoints_dir),
        "manifest": str(result.manifest_path),
        "tensorboard": str(result.tensorboard_dir),
        "predictions": str(predictions),
        "processed": str(processed),
    }
    if importlib.util.find_spec("cellmap_repro.evaluate") is not None:
        from cellmap_repro.evaluate import evaluate_experiment

        scores = evaluate_experiment(experiment_dir(experiment, experiments_root), data)
        outputs["evaluation"] = str(scores.get("output_dir", experiment_dir(experiment, experiments_root) / "logs" / "evaluation"))
        lap("evaluate")
    return {"outputs": outputs, "timings": timings}


def run(args: argparse.Namespace) -> int:
    begin = time.monotonic()
    summary = smoke(args.experiment, args.experiments_root, args.data, args.seed)
    print("\nsmoke run finished:")
    for name, path in summary["outputs"].items():
        print(f"  {name:<12} {path}")
    stages = ", ".join(f"{k} {v}s" for k, v in summary["timings"].items())
    print(f"  time         {time.monotonic() - begin:.0f} s ({stages})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("smoke", help="run the whole pipeline on the tiny synthetic crop", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--seed", type=settings.SEED_FLAG, default=0, help="seed of the tiny crop (default 0)")
    parser.set_defaults(func=run)
