"""`cellmap-repro seed-copy` and `seeds-report`: one experiment over several seeds.

A result from one seed says little about a configuration; the spread over seeds says how
much of a difference between two configurations is noise. `seed-copy -e EXP --seed K`
makes ``EXP_seedK``, a copy of EXP's configuration whose ``train_config.py`` ends with
``random_seed = K``, beside EXP: its checkpoints, logs, predictions and scores are its
own, so seeds never collide and each is an ordinary experiment (train, predict, process,
evaluate, requeue and resume as usual). `seeds-report -e EXP` then reads every copy's
``logs/evaluation/scores.json`` and gives, per score, the mean, the sample standard
deviation, the median and the range over the seeds, as MLPerf-style reporting does
(results over several runs, never one), in ``EXP/logs/seeds.md`` and ``seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from cellmap_repro import settings
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_directory, atomic_write_json, atomic_write_text

# What a copy holds: the configuration, not the runs (checkpoints, logs).
COPIED_SUFFIXES = (".py", ".csv", ".md")
MARKER = "seed-copy.json"
OVERALL = ("overall_score", "overall_instance_score", "overall_semantic_score")


def copy_name(experiment: str, seed: int) -> str:
    return f"{experiment}_seed{seed}"


def copy_files(source: Path, seed: int) -> dict[str, bytes]:
    """The files of ``source``'s seed-``seed`` copy, by name."""
    files = {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.is_file() and p.suffix in COPIED_SUFFIXES}
    if "train_config.py" not in files:
        raise ReproError(f"{source} has no train_config.py to copy")
    files["train_config.py"] += f"\n# written by `cellmap-repro seed-copy`: seed {seed} of {source.name}\nrandom_seed = {seed}\n".encode()
    files[MARKER] = (json.dumps({"source": source.name, "seed": seed}, sort_keys=True) + "\n").encode()
    # A copy is a product of the source, not something to commit.
    files[".gitignore"] = b"*\n"
    return files


def seed_copy(experiment: str, seed: int, experiments_root=None) -> Path:
    """Make (or find, unchanged) the seed-``seed`` copy of ``experiment``; return its folder."""
    from cellmap_repro.experiment import experiment_dir

    if seed < 0:
        raise ReproError(f"--seed must be 0 or more, not {seed}")
    source = experiment_dir(experiment, experiments_root)
    if (source / MARKER).exists():
        raise ReproError(f"{experiment} is itself a seed copy; copy the experiment it came from")
    target = source.parent / copy_name(experiment, seed)
    files = copy_files(source, seed)
    if target.exists():
        changed = sorted(name for name, data in files.items() if not (target / name).is_file() or (target / name).read_bytes() != data)
        if changed:
            raise ReproError(
                f"{target} exists but differs from {experiment} with seed {seed} ({', '.join(changed)}); "
                "the source changed since it was copied: move the copy away to start that seed again"
            )
        return target
    with atomic_directory(target) as partial:
        partial.mkdir()
        for name, data in files.items():
            (partial / name).write_bytes(data)
    return target


def seed_copies(experiment: str, experiments_root=None) -> dict[int, Path]:
    """The seed copies of ``experiment`` beside it, by seed."""
    from cellmap_repro.experiment import experiment_dir

    source = experiment_dir(experiment, experiments_root)
    copies = {}
    for folder in source.parent.glob(f"{experiment}_seed*"):
        marker = folder / MARKER
        if re.fullmatch(rf"{re.escape(experiment)}_seed\d+", folder.name) and marker.is_file():
            recorded = json.loads(marker.read_text())
            if recorded.get("source") == experiment:
                copies[int(recorded["seed"])] = folder
    return dict(sorted(copies.items()))


def spread(values: list[float]) -> dict:
    """n, mean, sample standard deviation, median, min and max of the finite ``values``."""
    finite = [v for v in values if v is not None]
    if not finite:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": len(finite),
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
        "median": statistics.median(finite),
        "min": min(finite),
        "max": max(finite),
    }


def report(experiment: str, experiments_root=None) -> dict:
    copies = seed_copies(experiment, experiments_root)
    if not copies:
        raise ReproError(f"no seed copies of {experiment} (make them with `cellmap-repro seed-copy -e {experiment} --seed K`)")
    runs, missing = {}, []
    for seed, folder in copies.items():
        path = folder / "logs" / "evaluation" / "scores.json"
        if not path.is_file():
            missing.append(seed)
            continue
        try:
            runs[seed] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ReproError(f"{path} is unreadable ({exc}); evaluate {folder.name} again") from None
    if not runs:
        raise ReproError(f"none of the {len(copies)} seed copies of {experiment} has been evaluated yet (seeds {', '.join(map(str, copies))})")
    classes = list(dict.fromkeys(name for run in runs.values() for name in run.get("classes", {})))
    return {
        "experiment": experiment,
        "seeds": sorted(runs),
        "missing_seeds": missing,
        "per_seed": {seed: {key: run.get(key) for key in OVERALL} for seed, run in runs.items()},
        "overall": {key: spread([run.get(key) for run in runs.values()]) for key in OVERALL},
        "classes": {name: spread([run.get("classes", {}).get(name, {}).get("score") for run in runs.values()]) for name in classes},
    }


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def markdown(result: dict) -> str:
    lines = [
        f"{result['experiment']} over {len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))})"
        + (f"; not evaluated: seeds {', '.join(map(str, result['missing_seeds']))}" if result["missing_seeds"] else ""),
        "",
        "| score | n | mean | std | median | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(key.replace("_score", "").replace("_", " "), s) for key, s in result["overall"].items()]
    rows += [(f"class {name}", s) for name, s in result["classes"].items()]
    for label, s in rows:
        lines.append(f"| {label} | {s['n']} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {_fmt(s['median'])} | {_fmt(s['min'])} | {_fmt(s['max'])} |")
    lines += ["", "| seed | overall | instance | semantic |", "|---|---|---|---|"]
    for seed, scores in result["per_seed"].items():
        lines.append(f"| {seed} | " + " | ".join(_fmt(scores[key]) for key in OVERALL) + " |")
    return "\n".join(lines) + "\n"


def run_copy(args: argparse.Namespace) -> int:
    # Only the name on stdout, for job scripts: EXP_SEED=$(cellmap-repro seed-copy ...)
    print(seed_copy(args.experiment, args.seed, args.experiments_root).name)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from cellmap_repro.experiment import experiment_dir

    result = report(args.experiment, args.experiments_root)
    text = markdown(result)
    logs = experiment_dir(args.experiment, args.experiments_root) / "logs"
    atomic_write_json(logs / "seeds.json", result)
    atomic_write_text(logs / "seeds.md", text)
    print(text)
    if result["missing_seeds"]:
        print(f"warning: seeds {', '.join(map(str, result['missing_seeds']))} have no scores.json yet; left out")
    print(f"report: {logs / 'seeds.md'}, {logs / 'seeds.json'}")
    return 0


def register(subparsers) -> None:
    copy = subparsers.add_parser("seed-copy", help="copy an experiment's configuration as EXP_seedK with random_seed = K", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(copy)
    copy.add_argument("--seed", type=int, required=True, help="the copy's seed")
    copy.set_defaults(func=run_copy)
    summary = subparsers.add_parser("seeds-report", help="mean and spread of the evaluation scores over an experiment's seed copies")
    settings.add_experiment_argument(summary)
    summary.set_defaults(func=run_report)
