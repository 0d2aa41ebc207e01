"""`cellmap-repro <stage>`: one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its subcommand and
sets ``func`` on the parser; this file only wires them together and turns
:class:`ReproError` into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
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


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or only ``stage``'s subcommand when it is a known one."""
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((word for word in argv if not word.startswith("-")), None))
    args = parser.parse_args(argv)
    # as typed, for a stage that hands itself over to another launcher (train --nproc)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    # Flags win over the environment, and later stages (e.g. the experiment's model.py
    # locating the weights cache) read the environment, so publish them there.
    for flag, variable in (("data", "CELLMAP_REPRO_DATA"), ("experiments_root", "CELLMAP_REPRO_EXPERIMENTS")):
        value = getattr(args, flag, None)
        if value:
            os.environ[variable] = os.path.abspath(value)
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
        result = args.func(args)
    except ReproError as exc:
        print(f"cellmap-repro: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("cellmap-repro: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # Disk full, permission denied and the like: the OS message names the file.
        if os.environ.get("CELLMAP_REPRO_TRACEBACK"):
            raise
        print(f"cellmap-repro: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return int(result or 0)
