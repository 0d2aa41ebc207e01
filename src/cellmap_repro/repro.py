"""`cellmap-repro verify`: check that training reproduces bit for bit, and say why when not.

Three checks, each on a scratch copy of the experiment (its own checkpoints are never
touched), each a separate `cellmap-repro train` process:

1. **repeat**: two runs from scratch must give identical checkpoint sha256 per epoch;
2. **resume**: a run SIGKILLed right after a random iteration, then resumed with
   ``--resume``, must give the checkpoints of the uninterrupted run;
3. **against** (``--against manifest.json``): a new run with the recorded settings must
   reproduce the recorded checkpoint hashes; when it does not, every recorded factor
   that differs (GPU model, driver, library versions, data hashes, config, flags) is named.

Exit status 0 only when every check is bitwise equal. The report is printed and written
as JSON (``<experiment>/logs/verify.json`` unless ``--report`` says otherwise).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cellmap_repro import manifest, settings
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_write_json

# Training length used when neither flags nor a recorded manifest say otherwise: the
# smoke run's, short enough to repeat several times on a CPU.
DEFAULT_OVERRIDES = {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 1, "validation_batches": 1, "checkpoint_every": 1}
# Manifest fields that decide a run's bytes; `checkpoints` are the outcome, not a factor.
FACTOR_PREFIXES = (
    "seed",
    "settings",
    "config_sha256",
    "config_files",
    "datasplit_sha256",
    "data_sha256",
    "pretrained_weights",
    "software",
    "determinism",
    "hardware",
    "device",
    "distributed",
    "git.commit",
)


def copy_experiment(source: Path, scratch_root: Path) -> Path:
    """Copy an experiment's configuration (the files of its config hash) under ``scratch_root``."""
    target = scratch_root / source.name
    target.mkdir(parents=True)
    for name in manifest.config_files(source):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)
    return target


def train_command(experiment: str, scratch_root: Path, overrides: dict, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "cellmap_repro", "train", "-e", experiment, "--experiments-root", str(scratch_root)]
    for key, value in sorted(overrides.items()):
        command += [f"--{key.replace('_', '-')}", str(value)]
    command.append("--resume" if resume else "--overwrite")
    return command


def run_training(experiment: str, scratch_root: Path, overrides: dict, resume: bool = False, kill_at: int | None = None, quiet: bool = False) -> int:
    from cellmap_repro.train import KILL_AT_ENV

    env = dict(os.environ)
    env.pop(KILL_AT_ENV, None)
    if kill_at is not None:
        env[KILL_AT_ENV] = str(kill_at)
    stdout = subprocess.DEVNULL if quiet else None
    return subprocess.run(train_command(experiment, scratch_root, overrides, resume), env=env, stdout=stdout).returncode


def run_manifest(scratch_root: Path, experiment: str) -> dict:
    return manifest.read(scratch_root / experiment / "checkpoints" / manifest.MANIFEST_NAME)


def checkpoint_hashes(recorded: dict) -> dict[str, str]:
    return {epoch: entry["sha256"] for epoch, entry in recorded.get("checkpoints", {}).items()}


def flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differing_factors(recorded: dict, current: dict) -> list[dict]:
    """Every factor (see FACTOR_PREFIXES) whose recorded and current values differ."""
    old, new = flatten(recorded), flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if not key.startswith(FACTOR_PREFIXES):
            continue
        if old.get(key) != new.get(key):
            differences.append({"factor": key, "recorded": old.get(key), "current": new.get(key)})
    return differences


def _train_or_fail(experiment: str, scratch_root: Path, overrides: dict, what: str, quiet: bool, **kwargs) -> dict:
    code = run_training(experiment, scratch_root, overrides, quiet=quiet, **kwargs)
    if code != 0:
        raise ReproError(f"verify: the {what} training run failed (exit {code}); run `cellmap-repro train` to see why")
    return run_manifest(scratch_root, experiment)


def verify(
    experiment: str,
    experiments_root=None,
    overrides: dict | None = None,
    against: Path | None = None,
    kill_at: int | None = None,
    checks: tuple[str, ...] = ("repeat", "resume"),
    workdir: Path | None = None,
    keep: bool = False,
    quiet: bool = False,
) -> dict:
    from cellmap_repro.experiment import experiment_dir

    source = experiment_dir(experiment, experiments_root)
    recorded = manifest.read(against) if against else None
    if recorded is not None:
        overrides = dict(recorded.get("overrides", {}))
        if "seed" not in overrides:
            overrides["seed"] = recorded.get("seed")
        checks = tuple(dict.fromkeys(("against", *checks)))
    overrides = dict(DEFAULT_OVERRIDES if overrides is None else overrides)
    total = overrides.get("epochs", 1) * overrides.get("iterations_per_epoch", 1)
    scratch = Path(tempfile.mkdtemp(prefix=f"verify-{experiment}-", dir=workdir))
    report: dict = {"experiment": experiment, "overrides": overrides, "checks": {}, "scratch": str(scratch)}
    try:
        reference = _train_or_fail(experiment, _fresh(scratch / "reference", source), overrides, "reference", quiet)
        reference_hashes = checkpoint_hashes(reference)
        report["reference"] = reference_hashes
        if "repeat" in checks:
            repeat = _train_or_fail(experiment, _fresh(scratch / "repeat", source), overrides, "repeat", quiet)
            report["checks"]["repeat"] = _compare(reference_hashes, checkpoint_hashes(repeat))
        if "resume" in checks and total >= 2:
            point = kill_at if kill_at is not None else random.SystemRandom().randint(1, total - 1)
            root = _fresh(scratch / "resume", source)
            code = run_training(experiment, root, overrides, kill_at=point, quiet=quiet)
            if code != -9:
                raise ReproError(f"verify: the run to be killed at iteration {point} exited with {code} instead of being killed")
            resumed = _train_or_fail(experiment, root, overrides, "resumed", quiet, resume=True)
            result = _compare(reference_hashes, checkpoint_hashes(resumed))
            result["killed_at_iteration"] = point
            report["checks"]["resume"] = result
        if recorded is not None:
            result = _compare(checkpoint_hashes(recorded), reference_hashes)
            if not result["equal"]:
                result["differing_factors"] = differing_factors(recorded, reference)
            report["checks"]["against"] = {"manifest": str(against), **result}
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report["equal"] = all(check["equal"] for check in report["checks"].values())
    return report


def _fresh(root: Path, source: Path) -> Path:
    root.mkdir(parents=True)
    copy_experiment(source, root)
    return root


def _compare(expected: dict[str, str], actual: dict[str, str]) -> dict:
    epochs = sorted(set(expected) | set(actual), key=int)
    mismatched = [e for e in epochs if expected.get(e) != actual.get(e)]
    return {"equal": not mismatched and bool(epochs), "epochs": {e: {"expected": expected.get(e), "actual": actual.get(e)} for e in epochs}, "mismatched_epochs": mismatched}


def print_report(report: dict) -> None:
    print(f"verify {report['experiment']} ({', '.join(f'{k}={v}' for k, v in report['overrides'].items())})")
    for name, check in report["checks"].items():
        status = "EQUAL" if check["equal"] else "DIFFERENT"
        extra = f" (killed at iteration {check['killed_at_iteration']})" if "killed_at_iteration" in check else ""
        print(f"  {name:<8} {status}{extra}")
        for epoch in check.get("mismatched_epochs", []):
            detail = check["epochs"][epoch]
            print(f"    epoch {epoch}: expected {detail['expected']}, got {detail['actual']}")
        for factor in check.get("differing_factors", []):
            print(f"    differs: {factor['factor']}: recorded {factor['recorded']!r}, now {factor['current']!r}")
        if name == "against" and not check["equal"] and not check.get("differing_factors"):
            print("    no recorded factor differs: the difference is not explained by the manifest (nondeterminism?)")
    print("bitwise equal" if report["equal"] else "NOT bitwise equal")


def run(args: argparse.Namespace) -> int:
    from cellmap_repro.experiment import experiment_dir
    from cellmap_repro.train import overrides_from_args

    overrides = overrides_from_args(args).as_dict()
    checks = tuple(c for c in ("repeat", "resume") if c not in (args.skip or []))
    if args.threads:
        # The training runs are subprocesses; thread count is part of what must match.
        os.environ["CELLMAP_REPRO_THREADS"] = str(args.threads)
    report = verify(
        args.experiment,
        args.experiments_root,
        overrides={**DEFAULT_OVERRIDES, **overrides} if not args.against else None,
        against=Path(args.against) if args.against else None,
        kill_at=args.kill_at,
        checks=checks,
        workdir=Path(args.workdir) if args.workdir else None,
        keep=args.keep,
        quiet=args.quiet,
    )
    out = Path(args.report) if args.report else experiment_dir(args.experiment, args.experiments_root) / "logs" / "verify.json"
    atomic_write_json(out, report)
    print_report(report)
    print(f"report: {out}")
    return 0 if report["equal"] else 1


def register(subparsers) -> None:
    from cellmap_repro.train import add_override_arguments

    parser = subparsers.add_parser("verify", help="check bit-for-bit reproducibility (repeat, kill+resume, against a manifest)", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    add_override_arguments(parser)
    parser.add_argument("--against", default=None, help="a recorded manifest.json to reproduce (uses its settings)")
    parser.add_argument("--kill-at", type=int, default=None, help="iteration after which the resume check kills the run (default: random)")
    parser.add_argument("--skip", action="append", choices=["repeat", "resume"], help="skip a check (repeatable)")
    parser.add_argument("--workdir", default=None, help="where scratch copies go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch runs")
    parser.add_argument("--report", default=None, help="JSON report path (default <experiment>/logs/verify.json)")
    parser.add_argument("--quiet", action="store_true", help="hide the training runs' output")
    parser.set_defaults(func=run)
