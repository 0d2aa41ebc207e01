"""Full-state training checkpoints, written atomically with a sha256 sidecar.

A checkpoint holds what resuming needs to continue exactly as an uninterrupted run:
the trainable parameters (the frozen backbone comes from the pretrained weights file,
whose hash the run manifest records), optimizer and scheduler state, every RNG state,
the iteration and epoch counters and the best validation score so far.

Layout in ``experiments/<exp>/checkpoints/``: ``epoch_0001.pth`` ... after each epoch,
``latest.pth`` (also refreshed every ``checkpoint_every`` iterations) and ``best.pth``;
each with ``<name>.sha256`` beside it.
"""

from __future__ import annotations

import io
from pathlib import Path

from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_write_bytes, atomic_write_text, sha256_bytes

FORMAT_VERSION = 1


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pth"


def trainable_state(model) -> dict:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # CPU copies: the same weights give the same bytes whichever device trained them.
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in trainable}


def save(path: Path, state: dict) -> str:
    """Serialise ``state`` in memory, then write file and sidecar atomically; return sha256."""
    import torch

    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    # Sidecar first: a crash between the two renames leaves a sidecar that does not
    # match the old file, which load() reports instead of trusting a stale pair.
    atomic_write_text(Path(str(path) + ".sha256"), f"{digest}  {Path(path).name}\n")
    atomic_write_bytes(path, data)
    return digest


def recorded_digest(path: Path) -> str | None:
    sidecar = Path(str(path) + ".sha256")
    if not sidecar.exists():
        return None
    return sidecar.read_text().split()[0]


def load(path: Path) -> dict:
    import torch

    path = Path(path)
    if not path.exists():
        raise ReproError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    expected = recorded_digest(path)
    if expected is not None and sha256_bytes(data) != expected:
        raise ReproError(f"checkpoint {path} does not match its sha256 sidecar (corrupt or partly written)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReproError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise ReproError(f"{path} is not a cellmap-repro checkpoint (format {FORMAT_VERSION})")
    return state


def load_into(model, state: dict, where: Path) -> None:
    """Load trainable parameters; every trainable parameter must be present."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state["model"]))
    unexpected = sorted(set(state["model"]) - set(model.state_dict()))
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ReproError(f"checkpoint {where} does not fit this experiment's model ({problem})")
    model.load_state_dict(state["model"], strict=False)


def resolve(checkpoints_dir: Path, which: str) -> Path:
    """``best``, ``latest``, an epoch number or a path, to an existing checkpoint file."""
    if which in ("best", "latest"):
        path = checkpoints_dir / f"{which}.pth"
    elif which.isdigit():
        path = checkpoints_dir / epoch_name(int(which))
    else:
        path = Path(which)
    if not path.exists():
        raise ReproError(f"checkpoint '{which}' not found: {path} (train first, or pass --checkpoint latest|best|<epoch>|<path>)")
    return path
