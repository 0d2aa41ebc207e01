"""Load and validate an experiment folder (``experiments/<name>/``).

An experiment is configuration only, in the layout challenge users know:
``model.py`` (architecture and weights), ``data.py`` (classes, arrays, transforms),
``train_config.py`` (imports from both plus optimisation settings) and
``process_config.py`` (post-processing), plus any helper modules they import
(``from .unet import UNet``). Each file's top-level variables are checked against the
names it may define: a misspelt or unknown variable is an error naming the file and the
variable, never a silently ignored setting. Names starting with ``_``, functions,
classes and absolute imports are free for the author's own use.

Building the model follows one recipe wherever it happens (train, resume, predict):
every RNG is seeded with the run seed *before* ``model.py`` is imported (so
construction-time initialisation is repeatable), the modules named in ``reinitialize``
(none by default: pretrained layers keep their weights) are re-initialised, and the
model's output shape for ``input_array_info.shape`` is checked once against
``(len(classes), *target_array_info.shape)`` on meta weights (milliseconds).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from cellmap_repro import settings
from cellmap_repro.classes import check_classes
from cellmap_repro.errors import ReproError

_ALLOW_OBJECTS = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)
DEFAULT_SEED = 13


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
    # Module-name prefixes whose parameters the engine re-initialises after building
    # (seeded); nothing else is ever reset, so pretrained layers keep their weights.
    reinitialize: list[str] = []
    # Per axis, the amount by which the input may grow (the output then grows by the
    # same amount times input/output voxel size); predict grows tiles in these steps.
    # Left out, it is derived by probing the model on meta weights.
    input_step: Optional[tuple[PositiveInt, PositiveInt, PositiveInt]] = None

    @field_validator("model")
    @classmethod
    def _a_module(cls, value):
        import torch

        if not isinstance(value, torch.nn.Module):
            raise ValueError(f"must be a torch.nn.Module, got {type(value).__name__}")
        return value

    @field_validator("input_step", mode="before")
    @classmethod
    def _one_step_for_all_axes(cls, value):
        return (value,) * 3 if isinstance(value, int) else value


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

    @field_validator("spatial_transforms")
    @classmethod
    def _known_spatial_transforms(cls, value):
        return check_spatial_transforms(value)

    @field_validator("train_raw_value_transforms", "val_raw_value_transforms")
    @classmethod
    def _callable_or_none(cls, value):
        if value is not None and not callable(value):
            raise ValueError(f"must be a callable transform (or None), got {type(value).__name__}")
        return value

    @field_validator("target_value_transforms")
    @classmethod
    def _target_transforms(cls, value):
        members = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(m is not None and not callable(m) for m in members):
            raise ValueError("must be a callable transform, or a dict/list of them per class (or None)")
        return value


SPATIAL_TRANSFORMS = ("mirror", "transpose", "rotate")


def check_spatial_transforms(value: dict | None) -> dict | None:
    """cellmap-data's spatial_transforms, checked at load: a mistake here would otherwise
    surface as an error inside the first training sample."""
    if value is None:
        return value
    axes = set("zyx")
    for kind, params in value.items():
        if kind not in SPATIAL_TRANSFORMS:
            raise ValueError(f"unknown spatial transform {kind!r} (known: {', '.join(SPATIAL_TRANSFORMS)})")
        given = params.get("axes") if isinstance(params, dict) else None
        if kind == "mirror":
            valid = isinstance(given, dict) and all(a in axes and isinstance(p, (int, float)) and 0 <= p <= 1 for a, p in given.items())
            expected = 'mirror: {"axes": {"x": probability, ...}} with probabilities in [0, 1]'
        elif kind == "transpose":
            valid = isinstance(given, (list, tuple)) and all(a in axes for a in given) and len(set(given)) == len(given)
            expected = 'transpose: {"axes": ["x", "y", "z"]}'
        else:
            valid = isinstance(given, dict) and all(
                a in axes and isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) and r[0] <= r[1] for a, r in given.items()
            )
            expected = 'rotate: {"axes": {"x": [low, high], ...}} in degrees'
        if not valid:
            raise ValueError(f"{kind}: expected {expected}, got {params!r}")
    return value


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
    random_seed: int = Field(DEFAULT_SEED, ge=0, lt=2**63)
    num_threads: Optional[int] = Field(None, gt=0)
    deterministic: bool = True
    allow_tf32: bool = True

    @field_validator("criterion")
    @classmethod
    def _a_callable(cls, value):
        if not callable(value):
            raise ValueError(f"must be a loss class such as torch.nn.BCEWithLogitsLoss, got {type(value).__name__}")
        return value

    @field_validator("optimizer")
    @classmethod
    def _an_optimizer(cls, value):
        import torch

        if not isinstance(value, torch.optim.Optimizer):
            raise ValueError(f"must be a torch.optim.Optimizer over the model's parameters, got {type(value).__name__}")
        return value

    @field_validator("scheduler")
    @classmethod
    def _a_scheduler(cls, value):
        if value is not None and not (callable(getattr(value, "step", None)) and callable(getattr(value, "state_dict", None))):
            raise ValueError(f"must be a torch.optim.lr_scheduler scheduler (or None), got {type(value).__name__}")
        return value


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
    tree = _parse(path)
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


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise ReproError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None


def run_seed(directory: Path, override: int | None = None) -> int:
    """The run seed: ``--seed``, else env ``SEED``, else ``random_seed`` in train_config.py (13).

    Read without running train_config.py, which imports model.py: the model must be built
    after every RNG is seeded with this value, so it has to be a literal there.
    """
    if override is not None:
        return _valid_seed(override, "--seed")
    from_environment = settings.from_environment("SEED", *settings.SEED_RANGE)
    if from_environment is not None:
        return from_environment
    path = directory / "train_config.py"
    if not path.exists():
        return DEFAULT_SEED
    tree = _parse(path)
    value = DEFAULT_SEED
    for node in tree.body:
        names = _assigned_or_imported(node)
        if "random_seed" not in names:
            continue
        literal = _literal(node.value) if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None else None
        if not isinstance(literal, int) or isinstance(literal, bool) or len(names) > 1:
            raise ReproError(f"{path}: random_seed must be a whole-number literal (random_seed = 13): the model is built, seeded with it, before this file runs")
        value = literal
    return _valid_seed(value, f"{path}: random_seed")


def _assigned_or_imported(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Assign):
        return [n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [alias.asname or alias.name for alias in node.names]
    return []


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _valid_seed(value: int, where: str) -> int:
    if not 0 <= value < 2**63:
        raise ReproError(f"{where}: seed {value} is out of range (a whole number from 0 to 2**63-1)")
    return value


def _keyword_names(function) -> set[str] | None:
    """Keyword arguments ``function`` accepts; None when it takes ``**kwargs`` or cannot be inspected."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def check_criterion(config: "TrainConfig", path: Path) -> None:
    """The engine builds the criterion with reduction="none" and masks unknown voxels itself."""
    name = getattr(config.criterion, "__name__", repr(config.criterion))
    reduction = config.criterion_kwargs.get("reduction", "none")
    if reduction != "none":
        raise ReproError(
            f"{path}: criterion_kwargs reduction={reduction!r} would switch off true-negative masking: "
            "the engine asks for per-voxel losses (reduction='none') and averages them over known voxels; remove it"
        )
    accepted = _keyword_names(config.criterion)
    if accepted is not None and "reduction" not in accepted:
        raise ReproError(f"{path}: criterion {name} does not accept reduction='none', which masking needs (per-voxel losses)")
    if config.weight_loss and accepted is not None and "pos_weight" not in accepted:
        raise ReproError(f"{path}: criterion {name} does not accept pos_weight (class weights); set weight_loss = False")


def check_optimizer(optimizer, model, path: Path) -> None:
    """The optimizer steps this model: every trainable parameter, and nothing else."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    parameters = list(model.parameters())
    if stepped - {id(p) for p in parameters}:
        raise ReproError(f"{path}: the optimizer holds parameters that are not the model's (build it over model.parameters() of the model imported from model.py)")
    missed = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in stepped]
    if missed:
        raise ReproError(f"{path}: the optimizer leaves trainable parameters of the model out (e.g. {missed[0]}): freeze them in model.py or give them to the optimizer")


def check_voxel_sizes(config: "ModelConfig", path: Path) -> None:
    """predict writes the model's output on its input's voxel grid: the two must agree."""
    given, wanted = config.target_array_info.scale, config.input_array_info.scale
    if any(abs(a - b) > 1e-6 * max(abs(b), 1.0) for a, b in zip(given, wanted)):
        raise ReproError(
            f"{path}: target_array_info.scale {list(given)} nm differs from input_array_info.scale {list(wanted)} nm: "
            "predictions are written on the input's voxel grid, so the two voxel sizes must be equal"
        )


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
    # How the model's output shape was computed at load (meta, fake or real forward).
    shape_forward: Any = None

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

    def input_step(self) -> tuple[int, int, int]:
        """``input_step`` of model.py, checked with one probe; else derived by probing."""
        from cellmap_repro.model import derive_input_step, model_output_shape

        config = self.configs["model"]
        where = str(self.directory / "model.py")
        in_info, out_info = config.input_array_info, config.target_array_info
        ratio = tuple(i / o for i, o in zip(in_info.scale, out_info.scale))
        if config.input_step is None:
            return derive_input_step(config.model, in_info.shape, out_info.shape, ratio, self.shape_forward, where)
        grown = tuple(s + d for s, d in zip(in_info.shape, config.input_step))
        wanted = tuple(round(t + d * r) for t, d, r in zip(out_info.shape, config.input_step, ratio))
        try:
            got = model_output_shape(config.model, grown, self.shape_forward)[0][2:]
        except Exception as exc:
            got = f"an error ({type(exc).__name__})"
        if got != wanted:
            raise ReproError(f"{where}: input_step {config.input_step} is not valid: input {grown} gives {got}, not {wanted}")
        return config.input_step


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
    except SystemExit as exc:  # sys.exit() or exit() in a config file: not a successful run
        raise ReproError(f"{path}: calls exit({exc.code!r}) while loading; a config file only defines variables") from None
    except Exception as exc:  # the author's code failed: say where, keep it one line
        raise ReproError(f"{path}: failed to load: {type(exc).__name__}: {exc}") from exc
    values = {n: getattr(module, n) for n in names if hasattr(module, n)}
    try:
        config = FILES[part].model_validate(values)
    except ValidationError as exc:
        raise ReproError(_format_validation_error(exc, path)) from None
    if part == "train_config":
        check_criterion(config, path)
    if part == "model":
        check_voxel_sizes(config, path)
    return config


def load_experiment(
    name: str,
    root: str | Path | None = None,
    parts: tuple[str, ...] = ("train_config", "process_config"),
    seed: int | None = None,
) -> Experiment:
    """Load the named config files of an experiment (``data`` alone avoids building the model).

    Loading ``model`` (or ``train_config``) builds the model: seeded with ``seed`` (default:
    the run seed, see ``run_seed``), re-initialised where model.py asks, shapes checked.
    """
    from cellmap_repro.determinism import seed_everything
    from cellmap_repro.model import check_shapes, reinitialize

    directory = experiment_dir(name, root)
    builds_model = "model" in parts or "train_config" in parts
    if builds_model:
        parts = tuple(dict.fromkeys(("data", "model", *parts)))
        seed_everything(run_seed(directory) if seed is None else seed)
    package = _import_package(name, directory)
    experiment = Experiment(name=name, directory=directory, package=package)
    for part in parts:
        experiment.configs[part] = _load_file(package, directory, part)
        if part == "model":
            model_config = experiment.configs["model"]
            reinitialize(model_config.model, model_config.reinitialize, str(directory / "model.py"))
    if builds_model:
        model_config = experiment.configs["model"]
        if "train_config" in experiment.configs:
            check_optimizer(experiment.configs["train_config"].optimizer, model_config.model, directory / "train_config.py")
        expected = (len(experiment.configs["data"].classes), *model_config.target_array_info.shape)
        experiment.shape_forward = check_shapes(model_config.model, model_config.input_array_info.shape, expected, str(directory / "model.py"))
    return experiment
