"""`cellmap-repro <stage>`: one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its subcommand and
sets ``func`` on the parser; this file only wires them together and turns
:class:`ReproError` (and OS errors, and bad flags) into one clear line and exit status 2.
Anything else is a bug: one line saying so, exit status 1.
``CELLMAP_REPRO_TRACEBACK=1`` shows the full traceback instead (for developers).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from cellmap_repro import __version__
from cellmap_repro.errors import ReproError

# Subcommand -> the module that registers it. `cellmap-repro <stage>` imports only that
# module: importing every stage (torch, scipy, zarr, ...) cost seconds on each start.
STAGE_VERBS = {
    "tiny-crop": "tiny_crop",
    "fetch": "fetch",
    "datasplit": "datasplit",
    "weights": "model",
    "train": "train",
    "predict": "predict",
    "process": "process",
    "evaluate": "evaluate",
    "pack": "pack",
    "view": "view",
    "tensorboard": "tensorboard",
    "unite-logs": "tensorboard",
    "verify": "repro",
    "seed-copy": "seeds",
    "seeds-report": "seeds",
    "smoke": "smoke",
    "gpu-check": "gpu",
}

# Module names under cellmap_repro, in the order `--help` lists them.
STAGE_MODULES = tuple(dict.fromkeys(STAGE_VERBS.values()))

EXIT_USER_ERROR = 2
EXIT_BUG = 1
TRACEBACK_ENV = "CELLMAP_REPRO_TRACEBACK"
# How a DataLoader worker's exception arrives in the training process: the worker's
# traceback as text, the original message on its last line.
_WORKER_PREFIX = f"{ReproError.__module__}.{ReproError.__qualname__}: "


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (the usage itself is one --help away)."""

    def error(self, message: str):
        print(f"cellmap-repro: error: {self.prog.removeprefix('cellmap-repro').strip() or 'cellmap-repro'}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[-1].startswith(_WORKER_PREFIX):
        return lines[-1].removeprefix(_WORKER_PREFIX)
    return " ".join(line.strip() for line in lines)


def report_error(exc: BaseException) -> int | None:
    """Print ``exc`` as the one line a user sees; the exit status, or None to re-raise."""
    if os.environ.get(TRACEBACK_ENV):
        return None
    if isinstance(exc, (ReproError, OSError)):
        print(f"cellmap-repro: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, Exception):
        print(f"cellmap-repro: internal error: {type(exc).__name__}: {one_line(exc)[:300]} (a bug: please report it; {TRACEBACK_ENV}=1 shows where)", file=sys.stderr)
        return EXIT_BUG
    return None


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or only ``stage``'s subcommand when it is a known one."""
    parser = Parser(
        prog="cellmap-repro",
        description="Reproducible CellMap Segmentation Challenge experiments.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages too")
    subparsers = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name in (STAGE_VERBS[stage],) if stage in STAGE_VERBS else STAGE_MODULES:
        try:
            module = importlib.import_module(f"cellmap_repro.{name}")
        except ModuleNotFoundError as exc:
            # A stage whose module is not written yet is simply not offered.
            if exc.name == f"cellmap_repro.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


@contextlib.contextmanager
def _flags_published(args):
    """Flags win over the environment, and later stages (e.g. the experiment's model.py
    locating the weights cache, subprocesses) read the environment: publish them there for
    the stage's run, and take them back after it (main also runs in-process, in tests)."""
    saved = {variable: os.environ.get(variable) for variable in ("CELLMAP_REPRO_DATA", "CELLMAP_REPRO_EXPERIMENTS")}
    for flag, variable in (("data", "CELLMAP_REPRO_DATA"), ("experiments_root", "CELLMAP_REPRO_EXPERIMENTS")):
        value = getattr(args, flag, None)
        if value:
            os.environ[variable] = os.path.abspath(value)
    try:
        yield
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((word for word in argv if not word.startswith("-")), None))
    args = parser.parse_args(argv)
    # as typed, for a stage that hands itself over to another launcher (train --nproc)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # cellmap-data logs per-array warnings that are noise for a user.
        logging.getLogger("cellmap_data").setLevel(logging.ERROR)
    try:
        from cellmap_repro.gpu import require_gpu_if_asked

        require_gpu_if_asked(args.stage)
        with _flags_published(args):
            result = args.func(args)
    except KeyboardInterrupt:
        print("cellmap-repro: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = report_error(exc)
        if code is None:
            raise
        return code
    return int(result or 0)
