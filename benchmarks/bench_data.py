"""CPU cost of one setup_04_all training sample: this checkout against an earlier commit, side by side.

Usage (repository root):

    .venv/bin/python benchmarks/bench_data.py [--against 604a76f] [--samples 6] [--threads 1]

A sample has setup_04_all's shape and augmentation: 216³ raw in, 30³ x 48 classes out,
mirror / transpose / rotation as in its data.py, true-negative masking. Both sides read
the same tiny crop (written once into a scratch folder) through their own
``experiments/setup_04_all/data.py``, with a stand-in network of the same window sizes
(building setup04 is beside the point here). The other commit is checked out with
``git worktree`` into a scratch folder; each side runs in its own process, and the
samples alternate between the two (old, new, old, new, ...) so that both see the same
machine load. Reported: CPU seconds (``time.process_time``: every thread of the process)
and wall seconds per sample, medians, and the ratio old / new.

Works against any commit whose ``cellmap_repro.data`` has ``build`` (and either
``SeededSamples``, as up to 604a76f, or ``RunSamples``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAND_IN_MODEL = '''
import torch
from .data import classes as _classes
model_name = "bench"
pretrained_checkpoint = None
class CentreCrop(torch.nn.Module):
    """Output of setup04's window sizes (216 -> 30) without its cost."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv3d(1, len(_classes), 1)

    def forward(self, x):
        return self.head(x)[:, :, 93:123, 93:123, 93:123]

model = CentreCrop()
input_array_info = {"shape": (216, 216, 216), "scale": (8.0, 8.0, 8.0)}
target_array_info = {"shape": (30, 30, 30), "scale": (8.0, 8.0, 8.0)}
'''


def child(source: Path, data: Path, work: Path, threads: int) -> None:
    """Serve samples: read a position on stdin, answer with its CPU and wall seconds."""
    import os
    import time

    sys.path.insert(0, str(source / "src"))
    import torch

    # Only torch's threads: cellmap-data's reader pool keeps its default size, since at
    # 604a76f a pool of one (CELLMAP_MAX_WORKERS=1) deadlocks on its nested reads.
    torch.set_num_threads(threads)
    from cellmap_repro import data as data_module
    from cellmap_repro import tiny_crop
    from cellmap_repro.datasplit import write_datasplit
    from cellmap_repro.experiment import load_experiment

    experiments = work / "experiments"
    target = experiments / "setup_04_all"
    shutil.copytree(source / "experiments" / "setup_04_all", target, ignore=shutil.ignore_patterns("checkpoints", "logs", "__pycache__"))
    (target / "model.py").write_text(STAND_IN_MODEL)
    classes = load_experiment("setup_04_all", experiments, parts=("data",)).classes
    write_datasplit(target / "datasplit.csv", tiny_crop.datasplit_rows(data / tiny_crop.DATASET / f"{tiny_crop.DATASET}.zarr", classes))
    training = data_module.build(load_experiment("setup_04_all", experiments))
    seed, count = 13, 10_000
    if hasattr(data_module, "RunSamples"):
        samples = data_module.RunSamples(training.train, seed, count, count, training.crop_weights())
    else:
        indices = data_module.epoch_indices(seed, 0, count, training.sample_weights(), len(training.train))
        samples = data_module.SeededSamples(training.train, indices, seed, first_position=0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        position = int(line)
        cpu, wall = time.process_time(), time.perf_counter()
        sample = samples[position]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        raw = sample["input"]
        print(json.dumps({"cpu": cpu, "wall": wall, "input_max": float(raw.max()), "shape": list(raw.shape), "target": list(sample["output"].shape)}), flush=True)


def start(source: Path, data: Path, work: Path, threads: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", str(source), "--data", str(data), "--work", str(work), "--threads", str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=source,
    )
    if not answer(process).get("ready"):
        raise SystemExit(f"the benchmark process for {source} failed to start")
    return process


def answer(process: subprocess.Popen) -> dict:
    """The child's next JSON line (libraries may print other lines)."""
    for line in process.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("a benchmark process ended early (see its error above)")


def ask(process: subprocess.Popen, position: int) -> dict:
    process.stdin.write(f"{position}\n")
    process.stdin.flush()
    return answer(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="604a76f", help="earlier commit to compare with (default %(default)s)")
    parser.add_argument("--samples", type=int, default=6, help="samples per side (the first one, warm-up, is not counted)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1: one core's cost)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), Path(args.data), Path(args.work), args.threads)
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-data-"))
    old_tree = scratch / "old"
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), args.against], check=True, capture_output=True)
        sys.path.insert(0, str(REPO / "src"))
        from cellmap_repro import tiny_crop

        data = scratch / "data"
        tiny_crop.write_dataset(data, seed=0)
        sides = {"old": start(old_tree, data, scratch / "work-old", args.threads), "new": start(REPO, data, scratch / "work-new", args.threads)}
        results: dict[str, list[dict]] = {"old": [], "new": []}
        for position in range(args.samples):
            for name, process in sides.items():
                results[name].append(ask(process, position))
        for process in sides.values():
            process.stdin.close()
            process.wait()
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    report(args, results)


def report(args, results: dict[str, list[dict]]) -> None:
    from cellmap_repro.manifest import _cpu_model

    counted = {name: runs[1:] for name, runs in results.items()}  # the first sample compiles and warms caches
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("cpu", "wall")} for name, runs in counted.items()}
    ratio = median["old"]["cpu"] / median["new"]["cpu"]
    print(f"setup_04_all training sample (216^3 in, 30^3 x 48 out, mirror/transpose/rotate), {args.threads} thread(s), {_cpu_model()}")
    print(f"{'':6} {'CPU s (median)':>15} {'wall s (median)':>16}  input max")
    for name in ("old", "new"):
        maxima = ", ".join(f"{r['input_max']:.3g}" for r in counted[name])
        print(f"{name:6} {median[name]['cpu']:15.3f} {median[name]['wall']:16.3f}  {maxima}")
    print(f"ratio old/new (CPU): {ratio:.1f}x   ({args.against} vs this checkout, {len(counted['new'])} samples each, interleaved)")
    if args.json:
        Path(args.json).write_text(json.dumps({"against": args.against, "median": median, "ratio_cpu": ratio, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
