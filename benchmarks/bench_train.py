"""Training throughput of an experiment: samples/s, time waiting for data, memory, projection.

Usage (repository root; the tiny crop and synthetic weights are written if missing):

    .venv/bin/python benchmarks/bench_train.py [--experiment setup_04_all] [--iterations 8]
        [--batch-size 4] [--workers 0 1 2] [--device cpu|cuda] [--augment-device cpu|cuda]
        [--no-tf32] [--record] [--data-only]

For each worker count, trains a scratch copy of the experiment for one epoch (no
validation) and reports, over the iterations after the first two (warm-up):

* samples/s and seconds per iteration;
* the fraction of each iteration spent waiting for the next batch (0: the data path keeps
  up with the device; from the ``time/*`` scalars the training loop logs);
* peak host RSS of the training process and its loader workers together (sampled from
  /proc every 0.2 s);
* on CUDA: mean GPU utilisation (nvidia-ml-py, sampled) and peak GPU memory;
* the projected wall time of the experiment's full run (epochs x iterations x batch
  samples) at the measured rate, and, from the model's FLOPs per sample
  (``torch.utils.flop_counter``), what the device alone would need at stated rates.

``--data-only`` measures the data path without the model: the samples/s the loader
delivers with each worker count (what a device could consume at most).

``--record`` appends the rows to the table in docs/benchmarks.md (between its markers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE_START = "<!-- bench_train:start -->"
TABLE_END = "<!-- bench_train:end -->"
# Effective dense throughput an H100 reaches on 3-D convolutions, chosen so that one
# setup_04_all sample (1.09 TFLOP) takes ~10 ms with TF32 and ~40 ms in strict FP32.
ASSUMED_TFLOPS = {"H100, TF32": 110.0, "H100, FP32": 27.0}


class Sampler(threading.Thread):
    """Peak RSS of this process tree and mean GPU utilisation, sampled in the background."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peak_rss, self.gpu_busy = interval, 0, []
        self.done = threading.Event()

    def run(self) -> None:
        handle = _nvml_handle()
        while not self.done.is_set():
            self.peak_rss = max(self.peak_rss, tree_rss(os.getpid()))
            if handle is not None:
                import pynvml

                self.gpu_busy.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.done.wait(self.interval)


def _nvml_handle():
    import torch

    if not torch.cuda.is_available():
        return None
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def scalars(tensorboard_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


def ensure_data(data: Path) -> None:
    from cellmap_repro import tiny_crop

    if not (data / tiny_crop.DATASET / f"{tiny_crop.DATASET}.zarr").exists():
        tiny_crop.write_tiny_crop(data, seed=0)


def scratch_copy(args, scratch: Path) -> None:
    """The experiment copied into ``scratch``, with a datasplit over the tiny crop unless --real-data."""
    from cellmap_repro import tiny_crop
    from cellmap_repro.datasplit import write_datasplit
    from cellmap_repro.experiment import load_experiment

    target = scratch / args.experiment
    shutil.copytree(REPO / "experiments" / args.experiment, target, ignore=shutil.ignore_patterns("logs", "checkpoints", "__pycache__"))
    if args.tiny_crop:
        classes = load_experiment(args.experiment, scratch, parts=("data",)).classes
        write_datasplit(target / "datasplit.csv", tiny_crop.datasplit_rows(Path(os.environ["CELLMAP_REPRO_DATA"]) / tiny_crop.DATASET / f"{tiny_crop.DATASET}.zarr", classes))


def run_variant(args, workers: int) -> dict:
    import torch

    from cellmap_repro import train
    from cellmap_repro.experiment import load_experiment

    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        scratch_copy(args, scratch)
        overrides = train.Overrides(
            epochs=1, iterations_per_epoch=args.iterations, batch_size=args.batch_size, validation_batches=0,
            num_workers=workers, augment_device=args.augment_device, allow_tf32=False if args.no_tf32 else None,
        )
        sampler = Sampler()
        sampler.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = train.train(args.experiment, scratch, overrides, progress=False)
        sampler.done.set()
        sampler.join()
        manifest = json.loads(result.manifest_path.read_text())
        iteration = scalars(result.tensorboard_dir, "time/iteration_s")[2:]
        waited = scalars(result.tensorboard_dir, "time/data_wait_s")[2:]
        figures = {
            "workers": workers,
            "seconds_per_iteration": statistics.median(iteration),
            "samples_per_second": args.batch_size / statistics.median(iteration),
            "data_wait_fraction": sum(waited) / sum(iteration),
            "peak_host_rss_gb": sampler.peak_rss / 1e9,
            "gpu_utilisation": statistics.mean(sampler.gpu_busy) if sampler.gpu_busy else None,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
            "settings": manifest["settings"],
            "determinism": manifest["determinism"],
        }
        config = load_experiment(args.experiment, scratch).train
        figures["full_run_samples"] = config.epochs * config.iterations_per_epoch * config.batch_size
        figures["projected_hours"] = figures["full_run_samples"] / figures["samples_per_second"] / 3600
        return figures
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def data_only(args, workers: int) -> dict:
    """Samples/s the training data path alone delivers (no model), after the first batch."""
    from cellmap_repro import data as data_module
    from cellmap_repro.experiment import load_experiment

    scratch = Path(tempfile.mkdtemp(prefix="bench-data-path-"))
    try:
        scratch_copy(args, scratch)
        training = data_module.build(load_experiment(args.experiment, scratch))
        per_run = (args.iterations + 1) * args.batch_size
        samples = data_module.RunSamples(training.train, 0, per_run, per_run, training.crop_weights())
        sampler = Sampler()
        sampler.start()
        batches = iter(data_module.loader(samples, args.batch_size, workers))
        next(batches)  # worker start-up
        started = time.perf_counter()
        for _ in range(args.iterations):
            next(batches)
        elapsed = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        return {"workers": workers, "samples_per_second": args.iterations * args.batch_size / elapsed, "peak_host_rss_gb": sampler.peak_rss / 1e9}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def flops_per_sample(experiment: str) -> dict:
    """Forward FLOPs of the frozen part and forward+backward of the trainable part, one sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cellmap_repro.experiment import load_experiment

    config = load_experiment(experiment).train
    model = config.model.to("meta")
    inputs = torch.zeros((1, 1, *config.input_array_info.shape), device="meta")
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(inputs)
    with FlopCounterMode(display=False) as training:
        model(inputs).sum().backward()
    return {"forward": forward.get_total_flops(), "training_step": training.get_total_flops()}


def hardware(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    from cellmap_repro.determinism import available_cores
    from cellmap_repro.manifest import _cpu_model

    return f"{_cpu_model()}, {available_cores()} cores ({platform.machine()})"


def rows(args, figures: list[dict]) -> list[str]:
    where = hardware(args.device)
    out = []
    for f in figures:
        gpu = f"{f['gpu_utilisation']:.0f} % / {f['peak_gpu_memory_gb']:.1f} GB" if f["gpu_utilisation"] is not None else "–"
        tf32 = "on" if f["determinism"]["cudnn_allow_tf32"] else "off"
        out.append(
            f"| {args.experiment} | {where} | {f['settings']['batch_size']} | {f['workers']} | {f['settings']['augment_device']} | {tf32} "
            f"| {f['samples_per_second']:.2f} | {f['data_wait_fraction']:.0%} | {f['peak_host_rss_gb']:.1f} GB | {gpu} | {f['projected_hours']:,.0f} h |"
        )
    return out


def record(lines: list[str]) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text()
    if TABLE_END not in text:
        raise SystemExit(f"{doc} has no {TABLE_END} marker")
    doc.write_text(text.replace(TABLE_END, "\n".join(lines) + "\n" + TABLE_END))
    print(f"added {len(lines)} row(s) to {doc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="setup_04_all")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--augment-device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--no-tf32", action="store_true")
    parser.add_argument("--data", default=str(REPO / "data"), help="data root (default ./data)")
    parser.add_argument("--real-data", dest="tiny_crop", action="store_false", help="use the experiment's own datasplit instead of the tiny crop")
    parser.add_argument("--data-only", action="store_true", help="measure the data path alone (no model): samples/s per worker count")
    parser.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["CELLMAP_REPRO_DEVICE"] = args.device
    os.environ["CELLMAP_REPRO_DATA"] = str(Path(args.data).absolute())
    if args.tiny_crop:
        ensure_data(Path(args.data))
    if args.data_only:
        where = hardware("cpu")
        for figure in (data_only(args, workers) for workers in args.workers):
            print(f"| {args.experiment} data path only | {where} | batch {args.batch_size} | {figure['workers']} workers | {figure['samples_per_second']:.2f} samples/s | peak RSS {figure['peak_host_rss_gb']:.1f} GB |")
        return
    figures = [run_variant(args, workers) for workers in args.workers]
    flops = flops_per_sample(args.experiment)
    header = [
        "| experiment | hardware | batch | workers | interpolation | TF32 | samples/s | waiting for data | peak host RSS | GPU busy / memory | full run at this rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = rows(args, figures)
    print("\n".join(header + table))
    full = figures[0]["full_run_samples"]
    print(f"\nFLOPs per sample: {flops['forward'] / 1e12:.3f} TFLOP forward, {flops['training_step'] / 1e12:.3f} TFLOP forward+backward (all layers)")
    for name, tflops in ASSUMED_TFLOPS.items():
        per_sample = flops["training_step"] / (tflops * 1e12)
        print(f"  at {tflops:.0f} TFLOP/s effective ({name}): {per_sample * 1e3:.0f} ms/sample, the full run's {full:,} samples in {full * per_sample / 3600:,.0f} h (if the data path keeps up: {1 / per_sample:.0f} samples/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware(args.device), "figures": figures, "flops": flops}, indent=2, default=str))
    if args.record:
        record(table)


if __name__ == "__main__":
    main()
