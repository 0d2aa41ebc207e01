"""`cellmap-repro unite-logs` and `cellmap-repro tensorboard`: one TensorBoard for all experiments.

Every experiment writes its runs to ``experiments/<exp>/logs/tensorboard/<run>/``.
`unite-logs` mirrors them into one logdir, ``<united>/<exp>/<run>/``, so a single
TensorBoard lists every run labelled by its experiment. Directories are real, event
files are *relative* symlinks to the originals: runs keep growing while TensorBoard
watches, and the same links resolve natively and inside the container, where the
experiments folder is mounted at the same place relative to the united logdir.
`tensorboard` unites, then serves and re-unites periodically so new runs show up.
"""

from __future__ import annotations

import argparse
import errno
import os
import threading
from pathlib import Path

from cellmap_repro import settings
from cellmap_repro.errors import ReproError

DEFAULT_UNITED = ".tensorboard"  # inside the experiments root; not a valid experiment name


def united_dir(experiments_root: Path, out: str | None) -> Path:
    return Path(out).absolute() if out else experiments_root / DEFAULT_UNITED


def unite_logs(experiments_root: Path, out: Path) -> dict[str, list[str]]:
    """Mirror every experiment's TensorBoard runs into ``out``; return {experiment: [runs]}."""
    if not experiments_root.is_dir():
        raise ReproError(f"experiments folder does not exist: {experiments_root}")
    found: dict[str, list[str]] = {}
    wanted_links: set[Path] = set()
    for runs_dir in sorted(experiments_root.glob("*/logs/tensorboard")):
        experiment = runs_dir.parent.parent.name
        if experiment.startswith("."):
            continue
        for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
            found.setdefault(experiment, []).append(run.name)
            for event_file in sorted(run.rglob("*")):
                if not event_file.is_file():
                    continue
                link = out / experiment / run.name / event_file.relative_to(run)
                link.parent.mkdir(parents=True, exist_ok=True)
                target = os.path.relpath(event_file, link.parent)
                wanted_links.add(link)
                if link.is_symlink() and os.readlink(link) == target:
                    continue
                tmp = link.with_name(f".{link.name}.tmp")
                if tmp.is_symlink() or tmp.exists():
                    tmp.unlink()
                tmp.symlink_to(target)
                os.replace(tmp, link)
    # Drop links to runs that were deleted since the last unite.
    if out.exists():
        for path in sorted(out.rglob("*"), reverse=True):
            if path.is_symlink() and path not in wanted_links:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return found


def run_unite(args: argparse.Namespace) -> int:
    root = settings.experiments_root(args.experiments_root)
    out = united_dir(root, args.out)
    found = unite_logs(root, out)
    if not found:
        print(f"no TensorBoard runs under {root}/*/logs/tensorboard yet; {out} is empty")
    for experiment, runs in found.items():
        print(f"{experiment}: {', '.join(runs)}")
    print(f"united logdir: {out}")
    return 0


PORT_ENV = "TENSORBOARD_PORT"
DEFAULT_PORT = 6006


def check_port_free(host: str, port: int) -> None:
    """One clear line before TensorBoard starts, instead of its error and a zero exit."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ReproError(f"cannot serve TensorBoard on host {host!r}: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ReproError(f"port {port} on {host} is {reason}: pass --port (or set {PORT_ENV}) to serve TensorBoard elsewhere") from None


def run_serve(args: argparse.Namespace) -> int:
    port = args.port if args.port is not None else settings.from_environment(PORT_ENV, 1, 65535) or DEFAULT_PORT
    check_port_free(args.host, port)
    from tensorboard import program

    root = settings.experiments_root(args.experiments_root)
    out = united_dir(root, args.out)
    out.mkdir(parents=True, exist_ok=True)
    unite_logs(root, out)
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(args.refresh):
            try:
                unite_logs(root, out)
            except (ReproError, OSError):
                pass

    threading.Thread(target=refresh, daemon=True).start()
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(out), "--host", args.host, "--port", str(port), "--reload_interval", "15"])
    print(f"TensorBoard on http://{args.host}:{port}/ (logdir {out}); Ctrl-C stops it")
    try:
        status = board.main()
    finally:
        stop.set()
    if status:  # e.g. the port was taken in the moment since the check
        raise ReproError(f"TensorBoard stopped with status {status} (see its message above)")
    return 0


def register(subparsers) -> None:
    unite = subparsers.add_parser("unite-logs", help="gather every experiment's TensorBoard runs into one logdir", description=__doc__.split("\n\n")[0])
    unite.add_argument("--experiments-root", default=None, help="folder holding experiment folders (default ./experiments)")
    unite.add_argument("--out", default=None, help=f"united logdir (default <experiments>/{DEFAULT_UNITED})")
    unite.set_defaults(func=run_unite)

    serve = subparsers.add_parser("tensorboard", help="unite all experiments' logs and serve them with TensorBoard")
    serve.add_argument("--experiments-root", default=None, help="folder holding experiment folders (default ./experiments)")
    serve.add_argument("--out", default=None, help=f"united logdir (default <experiments>/{DEFAULT_UNITED})")
    serve.add_argument("--host", default=os.environ.get("TENSORBOARD_HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1; the container uses 0.0.0.0)")
    serve.add_argument("--port", type=settings.number_flag(1, 65535), default=None, help=f"port (default ${PORT_ENV} or {DEFAULT_PORT})")
    serve.add_argument("--refresh", type=settings.number_flag(0, real=True, above=True), default=30.0, help="seconds between re-uniting new runs (default 30)")
    serve.set_defaults(func=run_serve)
