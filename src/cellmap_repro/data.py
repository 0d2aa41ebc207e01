"""Training data through cellmap-data, checked before use and read reproducibly.

* Every datasplit row is checked first (paths exist, voxel sizes fit the model's arrays,
  annotation counts present) so that a bad row fails with one line naming it; without
  ``complement_counts`` cellmap-data would count the labels and *write the counts back*
  into the data, and its class weights would then differ between the first and later runs.
* Datasets are ``CellMapDataset`` objects combined by ``CellMapDataSplit``, with the
  class relations from the class table (true-negative masking).
* Sample order is drawn per epoch from a generator seeded by ``(seed, epoch)``; each
  sample's augmentation from torch's RNG reseeded by ``(seed, sample position)``. So a
  sample depends only on the seed and its position: resuming anywhere, or changing the
  number of loader workers, gives the same samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellmap_repro.classes import class_relations
from cellmap_repro.datasplit import DatasplitRow, check_paths_exist, read_datasplit
from cellmap_repro.determinism import derived_seed
from cellmap_repro.errors import ReproError
from cellmap_repro.fetch_record import require_window_fetched
from cellmap_repro.storage import read_levels

INPUT_KEY = "input"
TARGET_KEY = "output"
VALIDATION_STREAM = 1 << 20  # keeps validation seeds apart from training positions


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


@dataclass
class TrainingData:
    split: object  # CellMapDataSplit
    classes: list[str]
    rows: list[DatasplitRow]

    @property
    def train(self):
        return self.split.train_datasets_combined

    @property
    def validate(self):
        return self.split.validation_datasets_combined

    def class_weights(self) -> dict[str, float]:
        """Per class background/foreground voxel ratio over the training crops (cellmap-data's)."""
        return {c: float(w) for c, w in self.train.class_weights.items()}

    def sample_weights(self) -> np.ndarray:
        return np.asarray(self.train.sample_weights, dtype=np.float64)


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
        is_train = row.usage == "train"
        try:
            dataset = CellMapDataset(
                str(row.raw_group),
                str(row.crop_group / f"[{','.join(row.classes)}]"),
                list(config.classes),
                input_arrays,
                target_arrays,
                spatial_transforms=config.spatial_transforms if is_train else None,
                raw_value_transforms=config.train_raw_value_transforms if is_train else config.val_raw_value_transforms,
                target_value_transforms=config.target_value_transforms,
                is_train=is_train,
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
    return TrainingData(split=split, classes=list(config.classes), rows=rows)


def epoch_indices(seed: int, epoch: int, count: int, weights: np.ndarray | None, dataset_size: int) -> np.ndarray:
    """The ``count`` dataset indices of one epoch: weighted draws with replacement."""
    rng = np.random.default_rng([seed, epoch])
    if weights is None or not np.any(weights > 0):
        return rng.integers(0, dataset_size, size=count)
    probabilities = weights / weights.sum()
    return rng.choice(dataset_size, size=count, replace=True, p=probabilities)


def validation_indices(seed: int, count: int, dataset_size: int) -> np.ndarray:
    """A fixed set of validation samples: the same every epoch and every run of a seed."""
    rng = np.random.default_rng([seed, VALIDATION_STREAM])
    return rng.choice(dataset_size, size=min(count, dataset_size), replace=False) if count <= dataset_size else rng.integers(0, dataset_size, size=count)


class SeededSamples:
    """Map-style dataset: position p -> sample ``indices[p]`` with augmentations seeded by (seed, p)."""

    def __init__(self, dataset, indices, seed: int, first_position: int):
        self.dataset = dataset
        self.indices = np.asarray(indices)
        self.seed = seed
        self.first_position = first_position
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, offset: int):
        import torch

        torch.manual_seed(derived_seed(self.seed, self.first_position + int(offset)))
        sample = self.dataset[int(self.indices[offset])]
        sample.pop("__metadata__", None)
        return sample


def loader(samples: SeededSamples, batch_size: int, num_workers: int, start: int = 0):
    """cellmap-data's loader over ``samples`` from ``start`` on, in order (the order is in ``samples``)."""
    import logging

    from cellmap_data import CellMapDataLoader

    # It warns that it cannot bound TensorStore's cache through our wrapper; harmless.
    logging.getLogger("cellmap_data.dataloader").setLevel(logging.ERROR)
    if num_workers > 0:
        raise ReproError(
            f"num_workers={num_workers}: loader worker processes do not work with cellmap-data 2026.2.28.30 "
            "(TensorStore aborts on fork, and its datasets cannot be pickled for spawn); use num_workers = 0"
        )
    return CellMapDataLoader(
        samples,
        classes=samples.classes,
        batch_size=batch_size,
        num_workers=num_workers,
        sampler=list(range(start, len(samples))),
        is_train=False,
        device="cpu",
        tensorstore_cache_bytes=0,
        persistent_workers=False,
    )
