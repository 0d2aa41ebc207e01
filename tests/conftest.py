"""Shared fixtures: the tiny synthetic dataset and scratch copies of experiments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST_EXPERIMENT = REPO / "tests" / "experiments" / "fast"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny crop's zarr container (no weights: the fast experiment needs none)."""
    from cellmap_repro import tiny_crop

    root = tmp_path_factory.mktemp("tiny-data")
    return tiny_crop.write_dataset(root, seed=0)


@pytest.fixture(scope="session")
def setup04_data(tmp_path_factory) -> Path:
    """Data root with the tiny crop and synthetic setup04 weights (for the slow tests)."""
    from cellmap_repro import tiny_crop

    root = tmp_path_factory.mktemp("setup04-data")
    tiny_crop.write_tiny_crop(root, seed=0)
    return root


def copy_experiment(source: Path, experiments_root: Path, container: Path) -> Path:
    """A scratch copy of an experiment folder whose datasplit points at ``container``."""
    from cellmap_repro import tiny_crop
    from cellmap_repro.datasplit import write_datasplit
    from cellmap_repro.experiment import load_experiment

    target = experiments_root / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs", "checkpoints", "__pycache__", "datasplit.csv"))
    classes = load_experiment(source.name, experiments_root, parts=("data",)).classes
    write_datasplit(target / "datasplit.csv", tiny_crop.datasplit_rows(container, classes))
    return target


@pytest.fixture
def fast_experiment(tmp_path, tiny_dataset, monkeypatch) -> Path:
    root = tmp_path / "experiments"
    root.mkdir()
    monkeypatch.setenv("CELLMAP_REPRO_EXPERIMENTS", str(root))
    monkeypatch.setenv("CELLMAP_REPRO_DATA", str(tiny_dataset.parent.parent))
    monkeypatch.setenv("CELLMAP_REPRO_THREADS", "1")
    return copy_experiment(FAST_EXPERIMENT, root, tiny_dataset)


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `cellmap-repro` in a subprocess, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "cellmap_repro", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cellmap-repro {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# ---------------------------------------------------------------- the bad-input battery's counts

# case id -> {"verdict", "line", "lost", "outside"}, filled by tests/test_battery.py
BATTERY: dict[str, dict] = {}


def battery_counts() -> dict:
    records = list(BATTERY.values())
    counts = {
        "tried": len(records),
        "clear": sum(r["verdict"] == "clear" for r in records),
        "tracebacks": sum(r["verdict"] == "traceback" for r in records),
        "wrong successes": sum(r["verdict"] == "wrong success" for r in records),
        "unclear": sum(r["verdict"] == "unclear" for r in records),
        "lost outputs": sum(bool(r["lost"]) for r in records),
        "outside writes": sum(bool(r["outside"]) for r in records),
    }
    return {**counts, "text": "bad-input battery: " + ", ".join(f"{k} {v}" for k, v in counts.items())}


def pytest_terminal_summary(terminalreporter):
    if BATTERY:
        terminalreporter.write_line(battery_counts()["text"])


def pytest_runtest_logreport(report):
    # Every verdict as it happens, for comparing code versions (BATTERY_REPORT=path.jsonl).
    if report.when == "call" and os.environ.get("BATTERY_REPORT") and "test_bad_input_never_wins[" in report.nodeid:
        case_id = report.nodeid.split("[", 1)[1].rstrip("]")
        if case_id in BATTERY:
            with open(os.environ["BATTERY_REPORT"], "a") as handle:
                handle.write(json.dumps({"id": case_id, **BATTERY[case_id]}) + "\n")
