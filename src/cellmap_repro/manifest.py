"""The run manifest: everything that decides a training run's bytes, beside its checkpoints.

``experiments/<exp>/checkpoints/manifest.json`` records code (git commit, dirty flag),
environment (lock hash, image digest, library versions, determinism flags, hardware),
inputs (config, datasplit, data and pretrained-weights hashes, seed, overrides) and,
per epoch, the sha256 of each checkpoint. `cellmap-repro verify --against` compares a
new run with a recorded manifest and names the factor that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

from tqdm import tqdm

from cellmap_repro.storage import atomic_write_json, sha256_file

MANIFEST_NAME = "manifest.json"
# Not configuration: run outputs, caches, and the README (`evaluate --update-readme` rewrites it).
NOT_CONFIG_FOLDERS = ("checkpoints", "logs")
NOT_CONFIG_FILES = ("README.md",)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def git_state(root: Path | None = None) -> dict:
    root = root or repo_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("CELLMAP_REPRO_REVISION"), "dirty": None}
    if commit.returncode != 0:
        # In the image there is no .git; the build records the revision instead.
        return {"commit": os.environ.get("CELLMAP_REPRO_REVISION"), "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def lock_hash() -> str | None:
    lock = repo_root() / "requirements.txt"
    if lock.exists():
        return sha256_file(lock)
    return os.environ.get("CELLMAP_REPRO_LOCK_SHA256")


def hash_tree(paths: list[Path], desc: str = "hashing data") -> str:
    """sha256 over the relative names and contents of every file under ``paths``, sorted."""
    files: list[tuple[str, Path]] = []
    for base in sorted(set(paths)):
        if base.is_file():
            files.append((base.name, base))
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file():
                files.append((f"{base.name}/{path.relative_to(base).as_posix()}", path))
    digest = hashlib.sha256()
    for name, path in tqdm(files, desc=desc, unit="file", leave=False, disable=len(files) < 200):
        digest.update(name.encode() + b"\0" + sha256_file(path).encode() + b"\0")
    return digest.hexdigest()


def config_files(experiment_dir: Path) -> dict[str, str]:
    """sha256 of every file of an experiment folder that decides a run.

    That is every file except ``checkpoints/``, ``logs/``, caches (``__pycache__``,
    ``*.pyc``), hidden files and the top-level README.md: helper modules (``unet.py``)
    and the datasplit count as much as model.py.
    """
    files = {}
    for path in sorted(Path(experiment_dir).rglob("*")):
        relative = path.relative_to(experiment_dir)
        parts = relative.parts
        if parts[0] in NOT_CONFIG_FOLDERS or "__pycache__" in parts or any(p.startswith(".") for p in parts):
            continue
        if path.suffix == ".pyc" or relative.as_posix() in NOT_CONFIG_FILES or not path.is_file():
            continue
        files[relative.as_posix()] = sha256_file(path)
    return files


def config_hash(experiment_dir: Path, overrides: dict) -> str:
    digest = hashlib.sha256()
    for name, file_hash in config_files(experiment_dir).items():
        digest.update(name.encode() + b"\0" + file_hash.encode() + b"\0")
    digest.update(json.dumps(overrides, sort_keys=True).encode())
    return digest.hexdigest()


def changed_files(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    return sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))


def data_hashes(rows, raw_levels: dict[str, str]) -> dict[str, str]:
    """Per crop: hash of the label groups it names and of the raw level the model reads."""
    hashes = {}
    for row in rows:
        raw = row.raw_group / raw_levels.get(str(row.raw_group), "")
        labels = [row.label_group(c) for c in row.classes]
        hashes[f"{row.dataset}/crop{row.crop_id}"] = hash_tree([raw, *labels], desc=f"hashing crop{row.crop_id}")
    return hashes


def hardware() -> dict:
    import torch

    info: dict = {"machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    info["gpus"] = _gpus() if torch.cuda.is_available() else []
    return info


def _gpus() -> list[dict]:
    from cellmap_repro.gpu import describe_gpus

    return describe_gpus()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def software() -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in ("torch", "torchvision", "cellmap-data", "cellmap-models", "numpy", "zarr", "tensorstore", "cellmap-repro"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "packages": versions,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lock_sha256": lock_hash(),
        "image_digest": os.environ.get("CELLMAP_REPRO_IMAGE_DIGEST"),
        "in_container": Path("/.dockerenv").exists() or bool(os.environ.get("CELLMAP_REPRO_IN_CONTAINER")),
    }


def write(path: Path, manifest: dict) -> None:
    atomic_write_json(path, manifest)


def read(path: Path) -> dict:
    from cellmap_repro.errors import ReproError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReproError(f"manifest not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ReproError(f"manifest {path} is not valid JSON ({exc})") from None
