"""Machinery of the bad-input battery (tests/test_battery.py): sandbox, runner, verdicts.

A case runs one CLI command (in-process through ``cellmap_repro.cli.main``) or one action
in a scratch *sandbox*::

    <sandbox>/data/jrc_tiny-1/jrc_tiny-1.zarr    the tiny crop (hard links to one session copy)
    <sandbox>/experiments/fast/                  the fast test experiment; its datasplit names
                                                 the crop relative to the sandbox (the cwd)
    <sandbox>/outside.zarr                       a decoy zarr (a raw group) that nothing may touch

and every outcome is sorted into one verdict:

* ``clear``: non-zero exit and exactly one stderr line, ``cellmap-repro: error: ...``,
  matching the case's pattern (progress bars aside);
* ``traceback``: an exception escaped ``main`` (or "Traceback"/"internal error" reached stderr);
* ``wrong success``: exit status 0 where an error was due;
* ``unclear``: non-zero exit but not one line, or a line that does not name the problem;
* and independently of those, ``lost outputs`` (an output that existed before is gone or
  changed) and ``outside writes`` (a file created, changed or deleted outside the output
  folders: input data, configuration, the decoy).

Kill cases fork a child that SIGKILLs itself at a chosen step (no ``finally`` runs, as with a
real SIGKILL), then check what is on disk and that the next command succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

FAST_FLAGS = ["--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "1", "--validation-batches", "0"]
TRAIN = ["train", "-e", "fast", *FAST_FLAGS]
CONTAINER = "data/jrc_tiny-1/jrc_tiny-1.zarr"
RAW = f"{CONTAINER}/recon-1/em/fibsem-uint8"
LABELS = f"{CONTAINER}/recon-1/labels/groundtruth"
EXP = "experiments/fast"
CHECKPOINTS = f"{EXP}/checkpoints"
PREDICTIONS = "data/predictions/fast"
PROCESSED = "data/processed/fast"
DECOY = "outside.zarr"
# Where a run may write. Everything else (data, configuration, the decoy) must stay as it was.
OUTPUT_FOLDERS = (
    re.compile(r"^experiments/[^/]+/(checkpoints|logs)(/|$)"),
    re.compile(r"^experiments/\.tensorboard(/|$)"),
    re.compile(r"^data/(predictions|processed)/fast(/|$)"),
    re.compile(r"^data/submissions(/|$)"),
    re.compile(r"^data/fetched(/|$)"),  # the fetch case's data root
)
# tqdm bars: with a total ("40%|", "| 3/8 [") or without ("0.00B [00:00, ?B/s]")
PROGRESS_LINE = re.compile(r"\d+%\||\|\s*\d+/\d+ \[|\[\d+:\d+(:\d+)?, [^\]]*/s\]$")
VERDICTS = ("clear", "traceback", "wrong success", "unclear")
# The steps of writing a file that a crash or a full disk can fall between.
WRITE_STEPS = ("fsync", "replace", "rename")


class Hang(Exception):
    """A command that did not return within its time."""


# ---------------------------------------------------------------- sandbox


def link_tree(source: Path, target: Path) -> None:
    """Copy a tree as hard links (cheap); rewrite files only through ``Sandbox.write``."""
    start = len(str(source)) + 1
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        folder = os.path.join(target, dirpath[start:])
        os.makedirs(folder, exist_ok=True)
        for name in filenames:
            os.link(os.path.join(dirpath, name), os.path.join(folder, name))


@dataclass
class Sandbox:
    root: Path
    holder: subprocess.Popen | None = None
    notes: dict = field(default_factory=dict)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def read(self, relative: str) -> str:
        return self.path(relative).read_text()

    def write(self, relative: str, content: str | bytes) -> None:
        path = self.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()  # never through a hard link into the shared copy
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    def edit(self, relative: str, old: str, new: str, count: int = 1) -> None:
        text = self.read(relative)
        assert old in text, f"{old!r} not in {relative}"
        self.write(relative, text.replace(old, new, count))

    def append(self, relative: str, text: str) -> None:
        self.write(relative, self.read(relative) + text)

    def edit_json(self, relative: str, change: Callable[[dict], None]) -> None:
        content = json.loads(self.read(relative))
        change(content)
        self.write(relative, json.dumps(content))

    def remove(self, relative: str) -> None:
        path = self.path(relative)
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    def chunks(self, array: str) -> list[str]:
        base = self.path(array)
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))

    def hold_lock(self, relative: str) -> int:
        """Hold an exclusive flock on ``relative`` from another process, as a concurrent run would."""
        path = self.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        code = (
            "import fcntl, os, sys, time\n"
            "f = open(sys.argv[1], 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n"
        )
        self.holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline().strip() == "held"
        return self.holder.pid

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
        for path in [self.root, *self.root.rglob("*")]:  # read-only cases leave folders 0555
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)


def is_output(relative: str) -> bool:
    return any(pattern.search(relative) for pattern in OUTPUT_FOLDERS)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under ``root``: (size, mtime, inode) and, for outputs, the sha256."""
    files = {}
    start = len(str(root)) + 1
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            relative = path[start:]
            info = os.lstat(path)
            digest = None
            if is_output(relative) and stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
            files[relative] = (info.st_size, info.st_mtime_ns, info.st_ino, digest)
    return files


def lost_outputs(before: dict, after: dict, anywhere: bool) -> list[str]:
    """Outputs that existed before and are gone or changed (appends to logs and lock files aside).

    ``anywhere``: a file counts as kept when its bytes are still somewhere in the output
    folders (a run that legitimately started may move the previous run aside).
    """
    kept = {entry[3] for entry in after.values() if entry[3]}
    lost = []
    for relative, entry in before.items():
        if not is_output(relative) or relative.endswith((".lock", ".log")) or "events.out.tfevents" in relative and anywhere:
            continue
        now = after.get(relative)
        if now is not None and now[3] == entry[3]:
            continue
        if anywhere and entry[3] in kept:
            continue
        lost.append(relative)
    return lost


def outside_writes(before: dict, after: dict) -> list[str]:
    changed = []
    for relative in sorted(set(before) | set(after)):
        if is_output(relative):
            continue
        if before.get(relative, (None,))[:3] != after.get(relative, (None,))[:3]:
            changed.append(relative)
    return changed


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    raised: str | None = None  # formatted exception that escaped main()
    killed: bool = False


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def _alarm(signum, frame):
    raise Hang("no answer within the case's time limit")


def run_cli(argv: list[str], capsys, limit_s: int = 120) -> Outcome:
    from cellmap_repro.cli import main

    outcome = Outcome()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        outcome.code = main(argv)
    except SystemExit as exc:
        outcome.code = _exit_status(exc)
    except BaseException:  # noqa: BLE001 - every escape is a finding
        outcome.raised = traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    outcome.stdout, outcome.stderr = capsys.readouterr()
    return outcome


def run_action(action: Callable[[], object], capsys) -> Outcome:
    """An API call, its errors shown as the CLI shows them."""
    from cellmap_repro import cli

    outcome = Outcome()
    try:
        action()
        outcome.code = 0
    except Exception as exc:  # noqa: BLE001
        code = cli.report_error(exc) if hasattr(cli, "report_error") else _report_as_before(exc)
        if code is None:
            outcome.raised = traceback.format_exc()
        outcome.code = code
    outcome.stdout, outcome.stderr = capsys.readouterr()
    return outcome


def _report_as_before(exc: Exception) -> int | None:
    """What the CLI did before it had report_error (to measure the code this battery was written against)."""
    from cellmap_repro.errors import ReproError

    if isinstance(exc, (ReproError, OSError)):
        print(f"cellmap-repro: error: {exc}", file=sys.stderr)
        return 2
    return None


def run_killed(body: Callable[[], object], limit_s: int = 120) -> Outcome:
    """Run ``body`` in a forked child that is expected to SIGKILL itself; wait for it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            body()
            os._exit(0)
        except SystemExit as exc:
            os._exit(_exit_status(exc))
        except BaseException:  # noqa: BLE001
            os._exit(99)
    deadline = time.monotonic() + limit_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return Outcome(raised="the child hung")
        time.sleep(0.02)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return Outcome(killed=True)
    return Outcome(code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1)


def error_lines(stderr: str) -> list[str]:
    """stderr's lines without progress bars (tqdm redraws with carriage returns)."""
    lines = []
    for line in re.split(r"[\r\n]", stderr):
        if line.strip() and not PROGRESS_LINE.search(line):
            lines.append(line.strip())
    return lines


def verdict(outcome: Outcome, pattern: str) -> tuple[str, str]:
    """One of VERDICTS, and the line (or reason) behind it."""
    if outcome.raised:
        return "traceback", outcome.raised.strip().splitlines()[-1]
    if "Traceback (most recent call last)" in outcome.stderr or "internal error" in outcome.stderr:
        return "traceback", outcome.stderr.strip().splitlines()[-1]
    if outcome.code == 0:
        return "wrong success", (outcome.stdout.strip().splitlines() or ["(no output)"])[-1]
    lines = error_lines(outcome.stderr)
    if len(lines) != 1 or not lines[0].startswith("cellmap-repro: error: "):
        return "unclear", " | ".join(lines) or "(no message)"
    if not re.search(pattern, lines[0]):
        return "unclear", lines[0]
    return "clear", lines[0]


# ---------------------------------------------------------------- faults


def fail_write_step(monkeypatch, step: int, error: int = errno.ENOSPC, kinds=WRITE_STEPS) -> None:
    """From the ``step``-th fsync/replace/rename on, every one fails as on a full disk (which
    stays full), naming no file as the OS names none."""
    counter = {"n": 0}
    for name in kinds:
        original = getattr(os, name)

        def failing(*args, _original=original, **kwargs):
            counter["n"] += 1
            if counter["n"] >= step:
                raise OSError(error, os.strerror(error))
            return _original(*args, **kwargs)

        monkeypatch.setattr(os, name, failing)


def kill_at_write_step(step: int, kinds=WRITE_STEPS) -> None:
    """In a forked child: SIGKILL this process just before its ``step``-th fsync/replace/rename."""
    counter = {"n": 0}
    for name in kinds:
        original = getattr(os, name)

        def killing(*args, _original=original, **kwargs):
            counter["n"] += 1
            if counter["n"] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(*args, **kwargs)

        setattr(os, name, killing)


def fail_zarr_writes(monkeypatch, error: int = errno.ENOSPC, after: int = 0) -> None:
    """zarr chunk writes fail as on a full disk (the OS names no file for a failed write)."""
    from zarr.storage import DirectoryStore

    original = DirectoryStore._tofile
    counter = {"n": 0}

    def failing(a, fn):
        counter["n"] += 1
        if counter["n"] > after:
            raise OSError(error, os.strerror(error))
        return original(a, fn)

    monkeypatch.setattr(DirectoryStore, "_tofile", staticmethod(failing))


def read_only_folder(monkeypatch, root: Path) -> None:
    """Creating anything under ``root`` fails as on a read-only mount."""
    original_mkdir, original_open = os.mkdir, os.open

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(root)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return original_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return original_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def skip_unless(condition: bool, reason: str):
    if not condition:
        pytest.skip(reason)
