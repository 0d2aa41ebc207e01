"""Load and validate an experiment folder (``experiments/<name>/``).

An experiment is configuration only, in the layout challenge users know:
``model.py`` (architecture and weights), ``data.py`` (classes, arrays, transforms),
``train_config.py`` (imports from both plus optimisation settings) and
``process_config.py`` (post-processing). Each file's top-level variables are checked
against the names it may define: a misspelt or unknown variable is an error naming the
file and the variable, never a silently ignored setting. Names starting with ``_``,
functions, classes and absolute imports are free for the author's own use.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cellmap_repro import settings
from cellmap_repro.classes import check_classes
from cellmap_repro.errors import ReproError

_ALLOW_OBJECTS = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


class ArrayInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]


class ModelConfig(BaseModel):
    """Variables of ``model.py``."""

    model_config = _ALLOW_OBJECTS
    model: Any
    model_name: str
    input_array_info: ArrayInfo
    target_array_info: ArrayInfo
    pretrained_checkpoint: Optional[str] = None


class DataConfig(BaseModel):
    """Variables of ``data.py``."""

    model_config = _ALLOW_OBJECTS
    classes: list[str]
    datasplit_path: str = "datasplit.csv"
    validation_prob: float = Field(0.15, ge=0.0, le=1.0)
    force_all_classes: bool | Literal["train", "validate"] = False
    spatial_transforms: Optional[dict] = None
    train_raw_value_transforms: Any = None
    val_raw_value_transforms: Any = None
    target_value_transforms: Any = None
    use_mutual_exclusion: bool = True
    weighted_sampler: bool = True
    # loader worker processes; None: as many as the cores allow (one core left to training)
    num_workers: Optional[int] = Field(None, ge=0)
    pad: bool = True

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, value):
        return check_classes(value, "classes")


class TrainConfig(BaseModel):
    """Variables of ``train_config.py``.

    It may import names from ``model.py`` and ``data.py`` (as the toolbox's configs do),
    but each setting has exactly one home: model and data settings are read from their
    own files, so one left out of the imports is never silently replaced by a default.
    """

    model_config = _ALLOW_OBJECTS
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    iterations_per_epoch: int = Field(gt=0)
    validation_batches: int = Field(1, ge=0)
    optimizer: Any
    criterion: Any
    criterion_kwargs: dict = {}
    weight_loss: bool = True
    max_grad_norm: Optional[float] = Field(None, gt=0)
    scheduler: Any = None
    random_seed: int = 13
    num_threads: Optional[int] = Field(None, gt=0)
    deterministic: bool = True
    allow_tf32: bool = True
    load_model: Literal["best", "latest"] = "best"


class ProcessConfig(BaseModel):
    """Variables of ``process_config.py``."""

    model_config = _ALLOW_OBJECTS
    threshold: float | dict[str, float] = 0.0
    instance_classes: Optional[list[str]] = None
    connectivity: Literal[6, 18, 26] = 26
    min_instance_size: int = Field(0, ge=0)
    classes: Optional[list[str]] = None
    checkpoint: str = "best"


FILES: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train_config": TrainConfig,
    "process_config": ProcessConfig,
}


def bound_names(path: Path) -> tuple[set[str], set[str]]:
    """Top-level names a config file assigns, and names it imports from sibling files.

    Assigned names must all be known to the file's schema (that is how a misspelling is
    caught); imported names are only picked up where the schema wants them.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    assigned: set[str] = set()
    imported: set[str] = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            imported.update(alias.asname or alias.name for alias in node.names)
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    assigned.add(sub.id)
    public = lambda names: {n for n in names if not n.startswith("_")}  # noqa: E731
    return public(assigned), public(imported)


def _format_validation_error(error: ValidationError, path: Path) -> str:
    first = error.errors()[0]
    name = ".".join(str(p) for p in first["loc"]) or "?"
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown variable '{name}' (misspelt? see the experiment README for the allowed names)"
    if first["type"] == "missing":
        return f"{path}: required variable '{name}' is not defined"
    return f"{path}: variable '{name}': {first['msg']}"


CHECKPOINTS_FOLDER = "checkpoints"


@dataclass
class Experiment:
    name: str
    directory: Path
    package: ModuleType
    configs: dict[str, BaseModel] = field(default_factory=dict)

    def __getattr__(self, item: str):
        for config in self.__dict__.get("configs", {}).values():
            if item in type(config).model_fields:
                return getattr(config, item)
        raise AttributeError(item)

    @property
    def train(self) -> SimpleNamespace:
        """Model, data and training settings together, as the training stage uses them."""
        merged = {}
        for part in ("data", "model", "train_config"):
            config = self.configs[part]
            merged.update({name: getattr(config, name) for name in type(config).model_fields})
        return SimpleNamespace(**merged)

    @property
    def process(self) -> ProcessConfig:
        return self.configs["process_config"]

    @property
    def datasplit_path(self) -> Path:
        path = Path(self.configs["data"].datasplit_path)
        return path if path.is_absolute() else self.directory / path

    @property
    def checkpoints_dir(self) -> Path:
        return self.directory / CHECKPOINTS_FOLDER

    @property
    def logs_dir(self) -> Path:
        return self.directory / "logs"


def experiment_dir(name: str, root: str | Path | None = None) -> Path:
    root_path = settings.experiments_root(root)
    directory = root_path / name
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not directory.is_dir():
        available = sorted(p.name for p in root_path.iterdir() if (p / "train_config.py").exists()) if root_path.is_dir() else []
        raise ReproError(f"unknown experiment '{name}' (no folder {directory}; available: {', '.join(available) or 'none'})")
    return directory


def experiment_checkpoints_dir(name: str, root: str | Path | None = None) -> Path:
    """Where an experiment's checkpoints live, known without loading (and building) its config."""
    return experiment_dir(name, root) / CHECKPOINTS_FOLDER


def _import_package(name: str, directory: Path) -> ModuleType:
    # Always import afresh: a config holds live objects (model, optimizer) whose state
    # must not leak from one run into the next within a process.
    package_name = f"cellmap_repro_experiment_{name}"
    for key in [k for k in sys.modules if k == package_name or k.startswith(package_name + ".")]:
        del sys.modules[key]
    init = directory / "__init__.py"
    spec = importlib.util.spec_from_file_location(package_name, init, submodule_search_locations=[str(directory)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[package_name] = package
    spec.loader.exec_module(package)
    return package


def _load_file(package: ModuleType, directory: Path, part: str) -> BaseModel:
    path = directory / f"{part}.py"
    if not path.exists():
        raise ReproError(f"experiment file missing: {path}")
    assigned, imported = bound_names(path)
    names = assigned | (imported & set(FILES[part].model_fields))
    try:
        module = importlib.import_module(f"{package.__name__}.{part}")
    except ReproError:
        raise
    except Exception as exc:  # the author's code failed: say where, keep it one line
        raise ReproError(f"{path}: failed to load: {type(exc).__name__}: {exc}") from exc
    values = {n: getattr(module, n) for n in names if hasattr(module, n)}
    try:
        return FILES[part].model_validate(values)
    except ValidationError as exc:
        raise ReproError(_format_validation_error(exc, path)) from None


def load_experiment(
    name: str,
    root: str | Path | None = None,
    parts: tuple[str, ...] = ("train_config", "process_config"),
) -> Experiment:
    """Load the named config files of an experiment (``data`` alone avoids building the model)."""
    directory = experiment_dir(name, root)
    package = _import_package(name, directory)
    experiment = Experiment(name=name, directory=directory, package=package)
    if "train_config" in parts:
        parts = tuple(dict.fromkeys(("data", "model", *parts)))
    for part in parts:
        experiment.configs[part] = _load_file(package, directory, part)
    return experiment

