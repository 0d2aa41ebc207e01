"""Training checkpoints: the whole model state but the frozen weights, written atomically.

A checkpoint holds what resuming needs to continue exactly as an uninterrupted run, and
what predicting needs to use exactly the trained model:

* ``model``: every buffer (e.g. BatchNorm running statistics) and every parameter of the
  model's ``state_dict`` **except frozen parameters** (``requires_grad`` False, e.g. the
  0.94 GB setup04 backbone, which never changes during a run);
* ``frozen_sha256``: a fingerprint of those frozen parameters (sha256 over each one's
  name, shape, dtype and bytes), computed once per run. Loading rebuilds the model from
  the experiment's ``model.py`` and refuses, in one line, a model whose frozen parameters
  do not have this fingerprint ("frozen weights differ from those the checkpoint was
  trained with: ...", e.g. another pretrained weights file);
* ``classes``: the experiment's classes, names and order (one output channel each);
* ``model_signature``: sha256 over the name, shape and dtype of every ``state_dict``
  entry, frozen ones included: the architecture. Loading refuses other classes, another
  class order or another architecture in one line;
* optimizer and scheduler state, every RNG state, the iteration and epoch counters, the
  run seed and the best validation score so far.

A checkpoint of another format version (e.g. format 1, which lacked buffers, classes and
the fingerprint) is refused in one line.

Layout in ``experiments/<exp>/checkpoints/``: ``epoch_0001.pth`` ... after each epoch,
``latest.pth`` (also refreshed every ``checkpoint_every`` iterations) and ``best.pth``;
each with ``<name>.sha256`` beside it (``sha256sum -c`` format).

File and sidecar are always consistent, whenever a crash or a full disk stops a save:
the new checkpoint is written to a temporary file first; the sidecar then lists the new
digest *and* the current file's, so that either file is accepted while the checkpoint is
renamed into place; finally the sidecar is rewritten with the new digest alone. An intact
checkpoint is never reported corrupt, and a corrupt one never passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from pathlib import Path

from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_write_text, sha256_bytes, sha256_file, write_temporary, writing

FORMAT_VERSION = 2


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pth"


def frozen_names(model) -> set[str]:
    # Every name of a shared parameter, as state_dict lists them all.
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def model_state(model) -> dict:
    """Every state_dict entry but the frozen parameters, as CPU copies."""
    frozen = frozen_names(model)
    # CPU copies: the same weights give the same bytes whichever device trained them.
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def model_signature(model) -> str:
    entries = [f"{name}:{tuple(v.shape)}:{v.dtype}" for name, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def frozen_fingerprint(model) -> str:
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(frozen_names(model)):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def identity(model, classes: list[str]) -> dict:
    """What a checkpoint must match to be loaded into ``model`` (computed once per run)."""
    return {"classes": list(classes), "model_signature": model_signature(model), "frozen_sha256": frozen_fingerprint(model)}


def save(path: Path, state: dict) -> str:
    """Serialise ``state`` and replace ``path`` and its sidecar as one (see the module doc); return sha256."""
    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    tmp = write_temporary(path, data)
    try:
        still_valid = _current_digests(path)
        _write_sidecar(path, [digest, *still_valid])
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _write_sidecar(path, [digest])
    return digest


def sidecar_path(path: Path) -> Path:
    return Path(str(path) + ".sha256")


def _write_sidecar(path: Path, digests: list[str]) -> None:
    lines = [f"{d}  {Path(path).name}\n" for d in dict.fromkeys(digests)]
    atomic_write_text(sidecar_path(path), "".join(lines))


def _current_digests(path: Path) -> list[str]:
    """The digests under which the file now at ``path`` loads (kept valid during the swap)."""
    if not path.exists():
        return []
    try:
        recorded = recorded_digests(path)
    except ReproError:  # a damaged sidecar must not stop the save that replaces it
        recorded = []
    return recorded or [sha256_file(path)]


def recorded_digests(path: Path) -> list[str]:
    """The digests the sidecar accepts, newest first; [] without a sidecar."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return []
    try:
        lines = [line.split() for line in sidecar.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        lines = []
    digests = [line[0] for line in lines if re.fullmatch(r"[0-9a-f]{64}", line[0])]
    if not lines or len(digests) != len(lines):
        raise ReproError(f"{sidecar} is malformed (expected '<sha256>  {Path(path).name}' lines): restore it, or delete it to load {Path(path).name} unchecked")
    return digests


def recorded_digest(path: Path) -> str | None:
    digests = recorded_digests(path)
    return digests[0] if digests else None


def load(path: Path) -> dict:
    return read(path)[0]


def read(path: Path) -> tuple[dict, str]:
    """A checkpoint's state, checked against its sidecar, and the sha256 of its bytes."""
    import torch

    path = Path(path)
    if not path.exists():
        raise ReproError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    accepted = recorded_digests(path)
    if accepted and digest not in accepted:
        raise ReproError(f"checkpoint {path} does not match its sha256 sidecar (corrupt or partly written)")
    try:
        with warnings.catch_warnings():  # e.g. about a foreign pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReproError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc)[:160]})") from None
    if not isinstance(state, dict) or "format" not in state or "model" not in state:
        raise ReproError(f"{path} is not a cellmap-repro checkpoint")
    if state["format"] != FORMAT_VERSION:
        raise ReproError(
            f"{path} is a format-{state['format']} checkpoint; this version reads format {FORMAT_VERSION} "
            "(whole model state, classes, model signature): train again with --overwrite"
        )
    return state, digest


def load_into(model, state: dict, where: Path, current: dict) -> None:
    """Load a checkpoint's model state after checking it against ``current = identity(model, classes)``."""
    if state["classes"] != current["classes"]:
        raise ReproError(f"checkpoint {where} {_class_difference(state['classes'], current['classes'])}")
    if state["model_signature"] != current["model_signature"]:
        raise ReproError(f"checkpoint {where} was written by another architecture than this experiment's model.py ({_first_difference(model, state['model'])})")
    saved, expected = set(state["model"]), set(model.state_dict()) - frozen_names(model)
    if saved != expected:
        example = sorted(saved ^ expected)[:2]
        raise ReproError(f"checkpoint {where} was written with other parameters frozen than model.py freezes now (e.g. {', '.join(example)})")
    if state["frozen_sha256"] != current["frozen_sha256"]:
        raise ReproError(
            f"frozen weights differ from those the checkpoint was trained with: {where} "
            "(model.py now builds the frozen layers with other weights, e.g. from another pretrained weights file)"
        )
    model.load_state_dict(state["model"], strict=False)


def _class_difference(saved: list[str], current: list[str]) -> str:
    if sorted(saved) == sorted(current):
        return f"has the experiment's classes in another order ({', '.join(saved[:4])}, ... vs {', '.join(current[:4])}, ...): every channel would be mislabelled"
    if len(saved) != len(current):
        return f"was trained for {len(saved)} classes, the experiment has {len(current)}"
    changed = next(f"{a} vs {b}" for a, b in zip(saved, current) if a != b)
    return f"was trained for other classes than the experiment's ({changed})"


def _first_difference(model, saved: dict) -> str:
    current = model.state_dict()
    for name, tensor in saved.items():
        if name not in current:
            return f"unexpected entry {name}"
        if tuple(tensor.shape) != tuple(current[name].shape):
            return f"{name} is {tuple(tensor.shape)} there, {tuple(current[name].shape)} here"
    return "frozen layers or dtypes differ"


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
