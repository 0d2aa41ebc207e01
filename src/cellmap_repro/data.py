"""Training data: cellmap-data finds the crops, the engine reads the samples.

* Every datasplit row is checked first (paths exist, voxel sizes fit the model's arrays,
  annotation counts present) so that a bad row fails with one line naming it; without
  ``complement_counts`` cellmap-data would count the labels and *write the counts back*
  into the data, and its class weights would then differ between the first and later runs.
* cellmap-data (``CellMapDataset`` per crop, combined by ``CellMapDataSplit``) decides
  where samples can be centred, the class weights and the per-crop sampling weights;
  the class relations come from the class table (true-negative masking).
* The samples themselves are read by :mod:`cellmap_repro.augment`: the same spatial
  augmentation as cellmap-data, drawn the same way, but each source read once as a block
  of its stored dtype and interpolated in torch, 10-100x cheaper than cellmap-data's
  float64 ``xarray.interp``.
* **One input normalisation on every path**: raw reaches the experiment's value
  transforms as float32 in [0, 1] (stored integers divided by their type's maximum),
  whatever path read it: training (rotated or not), validation and ``predict``.
* Sample order is drawn per epoch from a generator seeded by ``(seed, epoch)``; each
  sample's augmentation from torch's RNG reseeded by ``(seed, sample position)``, inside
  a forked RNG so that the training process's own RNG is never touched. So a sample
  depends only on the seed and its position: resuming anywhere, or changing the number
  of loader workers, gives the same samples.
* Loader workers are spawned processes (TensorStore and forked CUDA/OpenMP state do not
  survive ``fork``); each opens its own arrays and loads the experiment's ``data.py``
  for its transforms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cellmap_repro import augment
from cellmap_repro.classes import class_relations
from cellmap_repro.datasplit import DatasplitRow, check_paths_exist, read_datasplit
from cellmap_repro.determinism import derived_seed
from cellmap_repro.errors import ReproError
from cellmap_repro.fetch_record import require_window_fetched
from cellmap_repro.storage import read_levels

INPUT_KEY = "input"
TARGET_KEY = "output"
VALIDATION_STREAM = 1 << 20  # keeps validation seeds apart from training positions
AUGMENT_DEVICES = ("cpu", "cuda")


def check_rows(rows: list[DatasplitRow], input_scale, target_scale, where: str, input_shape=None, rotates: bool = False) -> None:
    check_paths_exist(rows, where)
    for row in rows:
        if input_shape is not None:  # every window around the crop lies on fetched raw
            require_window_fetched(row.raw_group, row.label_group(row.classes[0]), row.crop_id, input_shape, input_scale, rotates, where)
        raw_levels = read_levels(row.raw_group, where=f"{where}: raw of crop {row.crop_id}")
        finest = raw_levels[0].scale
        if any(f > s * 1.01 for f, s in zip(finest, input_scale)):
            raise ReproError(
                f"{where}: raw of crop {row.crop_id} ({row.raw_group}) is at {list(finest)} nm at best, coarser than the model input's {list(input_scale)} nm"
            )
        for class_name in row.classes:
            group = row.label_group(class_name)
            levels = read_levels(group, where=f"{where}: crop {row.crop_id} label {class_name}")
            if any(f > s * 1.01 for f, s in zip(levels[0].scale, target_scale)):
                raise ReproError(
                    f"{where}: label '{class_name}' of crop {row.crop_id} is at {list(levels[0].scale)} nm at best, coarser than the target's {list(target_scale)} nm ({group})"
                )
            s0_attrs = group / levels[0].path / ".zattrs"
            try:
                json.loads(s0_attrs.read_text())["cellmap"]["annotation"]["complement_counts"]["absent"]
            except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
                raise ReproError(
                    f"{where}: {s0_attrs} lacks cellmap.annotation.complement_counts.absent; "
                    "cellmap-data would count the labels and write them back into the data"
                ) from None


@dataclass(frozen=True)
class CropSpec:
    """What reading one crop's samples needs, in plain values (pickled to loader workers)."""

    raw: augment.ArraySource
    labels: dict[str, augment.ArraySource]  # annotated classes
    inferred: dict[str, tuple[str, ...]]  # unannotated class -> annotated classes it excludes
    sampling_start: tuple[float, float, float]
    sampling_shape: tuple[int, int, int]
    step: tuple[float, float, float]

    @property
    def size(self) -> int:
        return int(max(np.prod(self.sampling_shape), 1))

    def center(self, index: int) -> tuple[float, float, float]:
        """cellmap-data's sample centre for ``index`` (world nm)."""
        position = np.unravel_index(int(index), self.sampling_shape)
        return tuple(float(p * s + start) for p, s, start in zip(position, self.step, self.sampling_start))


def crop_spec(dataset) -> CropSpec:
    """The spec of a ``CellMapDataset``: its levels, relations and sampling box."""
    from cellmap_data.image import CellMapImage

    raw = dataset.input_sources[INPUT_KEY]
    labels, inferred = {}, {}
    for name, source in dataset.target_sources[TARGET_KEY].items():
        if isinstance(source, CellMapImage):
            labels[name] = augment.ArraySource.open(source.path, source.scale_level)
        elif isinstance(source, list):
            inferred[name] = tuple(source)
    inferred = {name: tuple(o for o in others if o in labels) for name, others in inferred.items()}
    return CropSpec(
        raw=augment.ArraySource.open(raw.path, raw.scale_level),
        labels=labels,
        inferred={name: others for name, others in inferred.items() if others},
        sampling_start=tuple(float(dataset.sampling_box[a][0]) for a in augment.AXES),
        sampling_shape=tuple(int(dataset.sampling_box_shape[a]) for a in augment.AXES),
        step=tuple(float(dataset.largest_voxel_sizes[a]) for a in augment.AXES),
    )


@dataclass
class Transforms:
    """An experiment's value transforms (loaded afresh in each loader worker)."""

    raw: Callable | None
    target: object

    @classmethod
    def of(cls, config, train: bool) -> "Transforms":
        return cls(config.train_raw_value_transforms if train else config.val_raw_value_transforms, config.target_value_transforms)

    def for_class(self, name: str, index: int):
        if isinstance(self.target, dict):
            return self.target.get(name)
        if isinstance(self.target, (list, tuple)):
            return self.target[index]
        return self.target


def normalised_raw(values, transform: Callable | None):
    """The one input normalisation: float32 in [0, 1] in, the experiment's transforms on top."""
    import torch

    values = values.to(torch.float32)
    return transform(values) if transform is not None else values


@dataclass
class SamplePlan:
    """How to read samples of one split: crops, window sizes, augmentation, transforms."""

    specs: list[CropSpec]
    classes: list[str]
    input_window: tuple[tuple[int, ...], tuple[float, ...]]  # shape, scale
    target_window: tuple[tuple[int, ...], tuple[float, ...]]
    spatial_transforms: dict | None
    train: bool
    experiment: tuple[str, str]  # name, experiments root: where workers find the transforms
    transforms: Transforms | None = field(default=None, repr=False)
    starts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.starts = np.cumsum([0] + [s.size for s in self.specs])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        # Transforms may be instances of classes defined in the experiment's data.py,
        # which a spawned worker cannot unpickle; it loads them itself.
        return {**self.__dict__, "transforms": None}

    def value_transforms(self) -> Transforms:
        if self.transforms is None:
            from cellmap_repro.experiment import load_experiment

            name, root = self.experiment
            self.transforms = Transforms.of(load_experiment(name, root, parts=("data",)).configs["data"], self.train)
        return self.transforms

    def locate(self, index: int) -> tuple[CropSpec, int]:
        crop = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.specs[crop], int(index - self.starts[crop])

    def read(self, index: int, seed: int, defer_raw: bool = False) -> dict:
        """Sample ``index`` with the augmentation drawn from ``seed`` (the RNG outside is untouched)."""
        import torch

        spec, local = self.locate(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            augmentation = augment.draw(self.spatial_transforms if self.train else None)
            raw = augment.read_raw(spec.raw, self._window(spec, local, self.input_window), augmentation, defer=defer_raw)
            if not isinstance(raw, augment.RawBlock):
                raw = self._finish_raw(raw, augmentation)
            target = self._target(spec, local, augmentation)
            sample = {INPUT_KEY: raw, TARGET_KEY: target, "augmentation": augmentation}
            if defer_raw:
                # the raw value transforms run after interpolation, seeded the same way
                sample["raw_seed"] = int(torch.randint(0, 2**62, (1,)).item())
            return sample

    def finish_deferred(self, raw, augmentation: augment.Augmentation, seed: int, device):
        """Interpolate a deferred raw block on ``device`` and apply the value transforms there."""
        import torch

        values = augment.trilinear_on(raw, device)
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            return self._finish_raw(values, augmentation)

    def _finish_raw(self, values, augmentation):
        values = augment.transpose(cellmap_layout(values, augmentation), augmentation)
        return normalised_raw(values, self.value_transforms().raw)[None]

    def _window(self, spec: CropSpec, local: int, window) -> augment.Window:
        shape, scale = window
        return augment.Window(spec.center(local), tuple(shape), tuple(scale))

    def _target(self, spec: CropSpec, local: int, augmentation: augment.Augmentation):
        """(classes, *window) targets: annotated classes read and transformed, the others
        NaN (unknown) except where an annotated class that excludes them is present."""
        import torch

        window = self._window(spec, local, self.target_window)
        transforms = self.value_transforms()
        labels = augment.read_labels(spec.labels, window, augmentation)
        shape = augment.transpose(cellmap_layout(torch.empty(window.shape), augmentation), augmentation).shape
        target = torch.full((len(self.classes), *shape), float("nan"))
        for index, name in enumerate(self.classes):
            if name in labels:
                values = augment.transpose(cellmap_layout(labels[name], augmentation), augmentation)
                transform = transforms.for_class(name, index)
                target[index] = transform(values) if transform is not None else values
        inferred = [name for name in spec.inferred if name in self.classes]
        if inferred:
            annotated = [name for name in self.classes if name in labels]
            present = torch.stack([target[self.classes.index(name)] > 0 for name in annotated]).flatten(1).float()
            excludes = torch.tensor([[float(other in spec.inferred[name]) for other in annotated] for name in inferred])
            excluded = (excludes @ present > 0).reshape(len(inferred), *shape)
            rows = [self.classes.index(name) for name in inferred]
            target[rows] = torch.where(excluded, 0.0, target[rows])
        return target


def cellmap_layout(values, augmentation: augment.Augmentation):
    """cellmap-data's rotated reads come out with z and y swapped (its meshgrid is 'xy'
    indexed); replicated so that samples equal cellmap-data's for the same draws."""
    return values.transpose(0, 1) if augmentation.rotated else values


@dataclass
class TrainingData:
    split: object  # CellMapDataSplit
    classes: list[str]
    rows: list[DatasplitRow]
    train: SamplePlan
    validate: SamplePlan

    def class_weights(self) -> dict[str, float]:
        """Per class background/foreground voxel ratio over the training crops (cellmap-data's)."""
        return {c: float(w) for c, w in self.split.train_datasets_combined.class_weights.items()}

    def crop_weights(self) -> np.ndarray:
        """cellmap-data's per-sample weight of each training crop (constant within a crop)."""
        combined = self.split.train_datasets_combined
        return np.asarray([float(w) for w in combined.dataset_weights.values()], dtype=np.float64)


def build(experiment, datasplit_path: Path | None = None) -> TrainingData:
    import logging

    from cellmap_data import CellMapDataSplit
    from cellmap_data.dataset import CellMapDataset

    if not logging.getLogger().isEnabledFor(logging.INFO):
        # cellmap-data pins its dataset logger to INFO at import; per-crop chatter is noise.
        logging.getLogger("cellmap_data.dataset").setLevel(logging.WARNING)

    config = experiment.train
    path = Path(datasplit_path or experiment.datasplit_path)
    rows = read_datasplit(path)
    rotates = "rotate" in (config.spatial_transforms or {})
    check_rows(rows, config.input_array_info.scale, config.target_array_info.scale, str(path), config.input_array_info.shape, rotates)
    input_arrays = {INPUT_KEY: {"shape": config.input_array_info.shape, "scale": config.input_array_info.scale}}
    target_arrays = {TARGET_KEY: {"shape": config.target_array_info.shape, "scale": config.target_array_info.scale}}
    # Without masking every class still gets an (empty) entry: cellmap-data 2026.2.28.30
    # fails to build an unannotated class when no relation dict is given at all.
    relations = class_relations(config.classes) if config.use_mutual_exclusion else {c: [] for c in config.classes}
    datasets: dict[str, list] = {"train": [], "validate": []}
    for row in rows:
        try:
            # cellmap-data only places samples and counts classes here; the engine reads them.
            dataset = CellMapDataset(
                str(row.raw_group),
                str(row.crop_group / f"[{','.join(row.classes)}]"),
                list(config.classes),
                input_arrays,
                target_arrays,
                is_train=row.usage == "train",
                class_relation_dict=relations,
                pad=config.pad,
            )
            has_data = dataset.verify()
        except ReproError:
            raise
        except Exception as exc:
            raise ReproError(f"{path}: crop {row.crop_id} cannot be read by cellmap-data ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not has_data:
            raise ReproError(f"{path}: crop {row.crop_id} has no samples for the model's array sizes ({row.crop_group})")
        datasets[row.usage].append(dataset)
    if not datasets["train"]:
        raise ReproError(f"{path}: no 'train' rows")
    split = CellMapDataSplit(
        input_arrays=input_arrays,
        target_arrays=target_arrays,
        classes=list(config.classes),
        datasets=datasets,
        class_relation_dict=relations,
        pad=config.pad,
    )
    where = (experiment.name, str(experiment.directory.parent))
    windows = {
        "input_window": (tuple(config.input_array_info.shape), tuple(config.input_array_info.scale)),
        "target_window": (tuple(config.target_array_info.shape), tuple(config.target_array_info.scale)),
    }

    def plan(usage: str) -> SamplePlan:
        train = usage == "train"
        specs = [crop_spec(d) for d in datasets[usage]]
        return SamplePlan(specs, list(config.classes), spatial_transforms=config.spatial_transforms, train=train, experiment=where, transforms=Transforms.of(config, train), **windows)

    return TrainingData(split=split, classes=list(config.classes), rows=rows, train=plan("train"), validate=plan("validate"))


def epoch_indices(seed: int, epoch: int, count: int, crop_weights: np.ndarray | None, crop_sizes: np.ndarray) -> np.ndarray:
    """The ``count`` sample indices of one epoch: weighted draws with replacement.

    A crop is drawn with probability weight x size (cellmap-data's per-sample weights are
    constant within a crop), then a sample uniformly within it: the distribution of
    drawing from all samples with their weights, without a per-sample weight vector.
    """
    rng = np.random.default_rng([seed, epoch])
    sizes = np.asarray(crop_sizes, dtype=np.int64)
    mass = sizes.astype(np.float64) * (crop_weights if crop_weights is not None and np.any(crop_weights > 0) else 1.0)
    crops = rng.choice(len(sizes), size=count, replace=True, p=mass / mass.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return offsets[crops] + rng.integers(0, sizes[crops])


def validation_indices(seed: int, count: int, dataset_size: int) -> np.ndarray:
    """A fixed set of validation samples: the same every epoch and every run of a seed."""
    rng = np.random.default_rng([seed, VALIDATION_STREAM])
    return rng.choice(dataset_size, size=min(count, dataset_size), replace=False) if count <= dataset_size else rng.integers(0, dataset_size, size=count)


class RunSamples:
    """Map-style dataset over a whole training run: position p -> a sample.

    Epoch ``p // per_epoch`` draws its indices from ``(seed, epoch)``; the sample's
    augmentation is drawn from ``(seed, p)``. One loader serves the whole run, so worker
    processes start once.
    """

    def __init__(self, plan: SamplePlan, seed: int, per_epoch: int, total: int, crop_weights: np.ndarray | None, defer_raw: bool = False):
        self.plan, self.seed, self.per_epoch, self.total = plan, seed, per_epoch, total
        self.crop_weights = crop_weights
        self.defer_raw = defer_raw
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.total

    def index(self, position: int) -> int:
        epoch = position // self.per_epoch
        if self._epoch is None or self._epoch[0] != epoch:
            sizes = np.diff(self.plan.starts)
            self._epoch = (epoch, epoch_indices(self.seed, epoch, self.per_epoch, self.crop_weights, sizes))
        return int(self._epoch[1][position % self.per_epoch])

    def __getitem__(self, position: int) -> dict:
        return self.plan.read(self.index(position), derived_seed(self.seed, int(position)), self.defer_raw)


class FixedSamples:
    """Map-style dataset over given indices (validation): offset i -> sample, seeded by (seed, stream + i)."""

    def __init__(self, plan: SamplePlan, indices, seed: int, stream: int = VALIDATION_STREAM):
        self.plan, self.indices, self.seed, self.stream = plan, np.asarray(indices), seed, stream

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, offset: int) -> dict:
        return self.plan.read(int(self.indices[offset]), derived_seed(self.seed, self.stream + int(offset)))


def collate(samples: list[dict]) -> dict:
    """Stack inputs and targets; deferred raw blocks (different sizes) stay a list."""
    import torch

    batch = {TARGET_KEY: torch.stack([s[TARGET_KEY] for s in samples]), "augmentation": [s["augmentation"] for s in samples]}
    raws = [s[INPUT_KEY] for s in samples]
    if isinstance(raws[0], augment.RawBlock):
        batch[INPUT_KEY] = raws
        batch["raw_seed"] = [s["raw_seed"] for s in samples]
    else:
        batch[INPUT_KEY] = torch.stack(raws)
    return batch


def _quiet_worker(_worker_id: int) -> None:
    import logging

    import torch

    # Each worker reads one sample at a time; more threads per worker only contend.
    torch.set_num_threads(1)
    logging.getLogger("cellmap_data").setLevel(logging.ERROR)


def loader(samples, batch_size: int, num_workers: int, start: int = 0, pin_memory: bool = False, shard: tuple[int, int] = (0, 1)):
    """Batches of ``samples`` from position ``start`` on, in order, from ``num_workers`` spawned workers.

    ``shard = (rank, processes)``: this rank's positions only, ``start + rank`` and every
    ``processes``-th after it (``batch_size`` is then the rank's share of the batch).
    """
    from torch.utils.data import DataLoader

    import torch

    workers = {"multiprocessing_context": "spawn", "persistent_workers": True, "worker_init_fn": _quiet_worker} if num_workers > 0 else {}
    # Its own generator: a DataLoader draws a worker base seed from the global RNG each
    # time it starts iterating, which would make the training RNG depend on the worker
    # count. The samples do not use that seed (see SamplePlan.read).
    return DataLoader(samples, batch_size=batch_size, sampler=range(start + shard[0], len(samples), shard[1]), num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), **workers)


def finish_batch(batch: dict, plan: SamplePlan, device) -> tuple:
    """(input, target) on ``device``; deferred raw blocks are interpolated there."""
    import torch

    target = batch[TARGET_KEY].to(device, non_blocking=True)
    raw = batch[INPUT_KEY]
    if isinstance(raw, list):
        raw = torch.stack([plan.finish_deferred(block, aug, seed, device) for block, aug, seed in zip(raw, batch["augmentation"], batch["raw_seed"])])
    return raw.to(device, non_blocking=True), target


def on_device(batches, plan: SamplePlan, device):
    """(input, target) per batch on ``device``.

    On a GPU the next batch is copied (from pinned memory, non-blocking, on a side
    stream) and, if deferred, interpolated while the current one computes.
    """
    import torch

    if torch.device(device).type != "cuda":
        for batch in batches:
            yield finish_batch(batch, plan, device)
        return
    side = torch.cuda.Stream(device)

    def stage(batch):
        with torch.cuda.stream(side):
            return finish_batch(batch, plan, device)

    pending = None
    for batch in batches:
        staged = stage(batch)
        if pending is not None:
            yield _ready(pending, side)
        pending = staged
    if pending is not None:
        yield _ready(pending, side)


def _ready(tensors: tuple, side):
    import torch

    current = torch.cuda.current_stream()
    current.wait_stream(side)
    for tensor in tensors:
        tensor.record_stream(current)  # their memory belongs to the compute stream now
    return tensors


def default_workers(processes: int = 1) -> int:
    """As many loader workers as a training process's share of the cores allows, one core left to it."""
    from cellmap_repro.determinism import available_cores

    return max(0, min(available_cores() // processes - 1, 16))
