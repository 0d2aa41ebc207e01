"""`cellmap-repro tiny-crop`: a small synthetic dataset in the exact CellMap layout.

The real data (public S3) and the real setup04 weights are large and need a network;
this stage writes, deterministically from a seed, everything the pipeline needs to run
end to end on any machine:

* dataset ``jrc_tiny-1``: zarr v2, raw ``recon-1/em/fibsem-uint8`` at 8 nm (s0) and
  16 nm (s1), OME-NGFF 0.4 multiscales;
* three ground-truth crops at 4 nm (s0) and 8 nm (s1) with complete cellmap annotation
  attributes (including ``complement_counts``, so cellmap-data never writes back), a
  different class set per crop so that true-negative masking is exercised (crop 2 has
  no ``nuc``, crop 1 no ``ves``);
* a synthetic setup04 weight file in the layout and format cellmap-models loads
  (random, seeded; marked synthetic so that it is never mistaken for the real one);
* optionally the experiment's ``datasplit.csv``, split with the experiment's ``data.py``
  settings (seed 13 validates crop 3 at the default validation_prob 0.15).

The scene is defined analytically in world coordinates (nm), so raw and labels agree
at every resolution: a cell whose plasma membrane crosses the crops, mitochondria
(membrane + lumen), vesicles and part of a nucleus, all inside the cell.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.classes import class_table
from cellmap_repro.storage import ScaleLevel, atomic_directory, multiscale_attrs

DATASET = "jrc_tiny-1"
RAW_PATH = "recon-1/em/fibsem-uint8"
GROUNDTRUTH_PATH = "recon-1/labels/groundtruth"
RAW_VOXEL = 8.0
RAW_SHAPE = (256, 256, 256)
LABEL_VOXEL = 4.0
CROP_SHAPE = (96, 96, 96)
CHUNKS = (64, 64, 64)

# crop id -> (usage, s0 translation in nm (z, y, x), annotated classes)
# Translations are 8k - 2 nm so the crops' 8 nm level (offset +2 nm) lands on the raw grid.
CROPS: dict[int, tuple[str, tuple[float, float, float], tuple[str, ...]]] = {
    1: ("train", (830.0, 830.0, 830.0), ("ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "mito", "cell")),
    2: ("train", (862.0, 798.0, 846.0), ("ecs", "pm", "mito_mem", "mito_lum", "mito", "ves")),
    3: ("validate", (798.0, 862.0, 814.0), ("ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "ves", "mito", "cell")),
}

RAW_INTENSITY = {"ecs": 210, "cyto": 150, "pm": 60, "mito_mem": 45, "mito_lum": 105, "ves": 85, "nuc": 175}


@dataclass
class Scene:
    """Analytic shapes in world coordinates (nm); every label is computed from it."""

    cell_center: np.ndarray
    cell_radius: float
    membrane: float
    mitos: list[tuple[np.ndarray, float]] = field(default_factory=list)
    vesicles: list[tuple[np.ndarray, float]] = field(default_factory=list)
    nucleus: tuple[np.ndarray, float] | None = None

    @classmethod
    def from_seed(cls, seed: int) -> "Scene":
        rng = np.random.default_rng(seed)
        center = np.array([1024.0, 1024.0, 1024.0])
        # The cell boundary passes through every crop (which span ~800-1260 nm).
        scene = cls(
            cell_center=center + np.array([0.0, 0.0, -420.0]) + rng.uniform(-20, 20, 3),
            cell_radius=600.0,
            membrane=10.0,
        )
        for _ in range(6):
            position = center + rng.uniform(-230, 150, 3) - np.array([0.0, 0.0, 60.0])
            scene.mitos.append((position, float(rng.uniform(45, 75))))
        for _ in range(12):
            position = center + rng.uniform(-260, 200, 3) - np.array([0.0, 0.0, 80.0])
            scene.vesicles.append((position, float(rng.uniform(16, 26))))
        scene.nucleus = (center + np.array([-250.0, -250.0, -330.0]), 260.0)
        return scene

    def labels(self, axes: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Semantic masks and instance ids on the grid spanned by world ``axes`` (z, y, x)."""
        shape = tuple(len(a) for a in axes)

        def distance(point):
            # Separable squared distance: three 1-D terms broadcast, far cheaper than a meshgrid.
            z, y, x = ((a.astype(np.float32) - np.float32(p)) ** 2 for a, p in zip(axes, point))
            return np.sqrt(z[:, None, None] + y[None, :, None] + x[None, None, :])

        cell_distance = distance(self.cell_center)
        cell = cell_distance < self.cell_radius
        pm = cell & (cell_distance >= self.cell_radius - self.membrane)
        interior = cell & ~pm
        nuc_ids = np.zeros(shape, np.uint32)
        nuc_center, nuc_radius = self.nucleus
        nuc_ids[interior & (distance(nuc_center) < nuc_radius)] = 1
        free = interior & (nuc_ids == 0)
        mito_ids = np.zeros(shape, np.uint32)
        mito_mem = np.zeros(shape, bool)
        for index, (point, radius) in enumerate(self.mitos, start=1):
            d = distance(point)
            inside = free & (d < radius) & (mito_ids == 0)
            mito_ids[inside] = index
            mito_mem |= inside & (d >= radius - self.membrane)
        mito = mito_ids > 0
        ves_ids = np.zeros(shape, np.uint32)
        for index, (point, radius) in enumerate(self.vesicles, start=1):
            inside = free & ~mito & (distance(point) < radius) & (ves_ids == 0)
            ves_ids[inside] = index
        ves = ves_ids > 0
        cyto = free & ~mito & ~ves
        return {
            "ecs": ~cell,
            "pm": pm,
            "cyto": cyto,
            "mito_mem": mito_mem,
            "mito_lum": mito & ~mito_mem,
            "mito": mito_ids,
            "ves": ves_ids,
            "nuc": nuc_ids,
            "cell": cell.astype(np.uint32),
        }


def world_axes(translation, scale, shape) -> list[np.ndarray]:
    return [t + s * np.arange(n) for t, s, n in zip(translation, scale, shape)]


def raw_volume(scene: Scene, seed: int) -> np.ndarray:
    labels = scene.labels(world_axes((0.0, 0.0, 0.0), (RAW_VOXEL,) * 3, RAW_SHAPE))
    raw = np.full(RAW_SHAPE, RAW_INTENSITY["cyto"], np.float32)
    for name in ("ecs", "nuc", "mito_lum", "ves", "mito_mem", "pm"):
        raw[labels[name] > 0] = RAW_INTENSITY[name]
    noise = np.random.default_rng(seed + 1).normal(0.0, 12.0, RAW_SHAPE)
    return np.clip(raw + noise, 0, 255).astype(np.uint8)


def annotation_attrs(class_name: str, array: np.ndarray) -> dict:
    from cellmap_schemas.annotation import (
        AnnotationArrayAttrs,
        InstanceSegmentation,
        SemanticSegmentation,
        wrap_attributes,
    )

    if class_table()[class_name].instance:
        kind = InstanceSegmentation(encoding={"absent": 0})
    else:
        kind = SemanticSegmentation(encoding={"absent": 0, "present": 1})
    attrs = AnnotationArrayAttrs(
        class_name=class_name,
        annotation_type=kind,
        complement_counts={"absent": int(np.count_nonzero(array == 0))},
    )
    return wrap_attributes(attrs).model_dump(mode="json")


def group_annotation_attrs(class_name: str) -> dict:
    attrs = annotation_attrs(class_name, np.zeros(1, np.uint8))
    del attrs["cellmap"]["annotation"]["complement_counts"]
    return attrs


def write_multiscale(group, name: str, pyramid: list[np.ndarray], levels: list[ScaleLevel], array_attrs=None, group_attrs=None):
    from numcodecs import Zlib

    sub = group.create_group(name)
    sub.attrs.update({**multiscale_attrs(levels, name=name), **(group_attrs or {})})
    for level, data in zip(levels, pyramid):
        # zlib, not zarr's default multi-threaded Blosc: its compressed bytes vary from
        # run to run, and the run manifest hashes the data's bytes.
        array = sub.create_dataset(
            level.path,
            data=data,
            chunks=tuple(min(c, s) for c, s in zip(CHUNKS, data.shape)),
            compressor=Zlib(level=5),
            dimension_separator="/",
        )
        if array_attrs is not None:
            array.attrs.update(array_attrs(data))
    return sub


def label_levels(translation) -> list[ScaleLevel]:
    s1_translation = tuple(t + LABEL_VOXEL / 2 for t in translation)
    return [
        ScaleLevel("s0", (LABEL_VOXEL,) * 3, tuple(translation)),
        ScaleLevel("s1", (2 * LABEL_VOXEL,) * 3, s1_translation),
    ]


def all_ids(labels: dict[str, np.ndarray], annotated: tuple[str, ...]) -> np.ndarray:
    """The ``all`` array: the most granular annotated class id at each voxel."""
    table = class_table()
    ids = np.zeros(labels["ecs"].shape, np.uint16)
    for name in ("cell", "ecs", "nuc", "cyto", "ves", "mito", "mito_lum", "mito_mem", "pm"):
        if name in annotated:
            ids[labels[name] > 0] = table[name].id
    return ids


def write_dataset(root: Path, seed: int) -> Path:
    import zarr
    from cellmap_schemas.annotation import CropGroupAttrs, wrap_attributes

    scene = Scene.from_seed(seed)
    container = root / DATASET / f"{DATASET}.zarr"
    with atomic_directory(container) as partial:
        top = zarr.open_group(str(partial), mode="w")
        recon = top.create_group("recon-1")
        em = recon.create_group("em")
        raw = raw_volume(scene, seed)
        raw_s1 = raw.reshape(128, 2, 128, 2, 128, 2).mean(axis=(1, 3, 5)).round().astype(np.uint8)
        write_multiscale(
            em,
            "fibsem-uint8",
            [raw, raw_s1],
            [
                ScaleLevel("s0", (RAW_VOXEL,) * 3, (0.0, 0.0, 0.0)),
                ScaleLevel("s1", (2 * RAW_VOXEL,) * 3, (RAW_VOXEL / 2,) * 3),
            ],
        )
        groundtruth = recon.create_group("labels").create_group("groundtruth")
        for crop_id, (_usage, translation, annotated) in CROPS.items():
            levels = label_levels(translation)
            # Each level is sampled from the scene at its own voxel centres, so every
            # level agrees with its metadata (a [::2] subsample would be off by half a voxel).
            shapes = (CROP_SHAPE, tuple(n // 2 for n in CROP_SHAPE))
            labels, labels_s1 = (scene.labels(world_axes(level.translation, level.scale, shape)) for level, shape in zip(levels, shapes))
            crop = groundtruth.create_group(f"crop{crop_id}")
            crop_attrs = CropGroupAttrs(
                name=f"crop{crop_id}",
                description="synthetic crop written by cellmap-repro tiny-crop",
                created_by=["cellmap-repro"],
                created_with=["cellmap-repro tiny-crop"],
                start_date=None,
                end_date=None,
                duration_days=None,
                protocol_uri=None,
                class_names=sorted(annotated),
            )
            crop.attrs.update(wrap_attributes(crop_attrs).model_dump(mode="json"))
            for name in annotated:
                dtype = np.uint32 if class_table()[name].instance else np.uint8
                write_multiscale(
                    crop,
                    name,
                    [labels[name].astype(dtype), labels_s1[name].astype(dtype)],
                    levels,
                    array_attrs=lambda data, name=name: annotation_attrs(name, data),
                    group_attrs=group_annotation_attrs(name),
                )
            write_multiscale(crop, "all", [all_ids(labels, annotated), all_ids(labels_s1, annotated)], levels)
    return container


def write_synthetic_weights(weights_dir: Path, seed: int, checkpoint: str = "setup04/1820500") -> Path | None:
    """Random setup04 weights in the real file's format; never replaces real weights.

    Keys follow the published COSEM checkpoints as cellmap-models reads them:
    ``architecture.unet.*`` / ``architecture.prediction_head.*`` plus the redundant
    ``chain.0.unet.*`` copies that its loader verifies and drops.
    """
    import torch

    from cellmap_repro.model import SYNTHETIC_MARKER, weights_file

    target = weights_file(weights_dir, checkpoint)
    if target.exists() and not is_synthetic_weights(target):
        return None
    architecture = checkpoint.split("/")[0]
    from cellmap_models.pytorch.cosem import load_model

    with torch.device("meta"):
        meta_model = load_model(architecture)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in meta_model.state_dict().items():
        fan_in = int(np.prod(meta.shape[1:])) if meta.dim() > 1 else None
        if fan_in is None:
            weight_key = key.rsplit(".", 1)[0] + ".weight"
            fan_in = int(np.prod(meta_model.state_dict()[weight_key].shape[1:]))
        bound = 1.0 / np.sqrt(fan_in)
        tensor = torch.empty(meta.shape).uniform_(-bound, bound, generator=generator)
        state["architecture." + key.replace("backbone.", "unet.", 1)] = tensor
        if key.startswith("backbone."):
            state["chain.0." + key.replace("backbone.", "unet.", 1)] = tensor
    payload = {"model": state, SYNTHETIC_MARKER: {"seed": seed, "made_by": "cellmap-repro tiny-crop"}}
    from cellmap_repro.storage import atomic_output_path

    with atomic_output_path(target) as tmp:
        torch.save(payload, tmp)
    return target


def is_synthetic_weights(path: Path) -> bool:
    import torch

    from cellmap_repro.model import SYNTHETIC_MARKER

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return SYNTHETIC_MARKER in payload


def datasplit_rows(container: Path, classes: list[str], relative_to: Path | None = None):
    from cellmap_repro.datasplit import DatasplitRow

    shown = container
    if relative_to is not None:
        try:
            shown = container.relative_to(relative_to)
        except ValueError:
            shown = container
    rows = []
    for crop_id, (usage, _translation, annotated) in CROPS.items():
        present = [c for c in classes if c in annotated]
        if not present:
            continue
        rows.append(
            DatasplitRow(
                usage=usage,
                raw_container=str(shown),
                raw_path=RAW_PATH,
                label_container=str(shown),
                crop_path=f"{GROUNDTRUTH_PATH}/crop{crop_id}",
                classes=present,
            )
        )
    return rows


def write_tiny_crop(data_root: Path, seed: int = 0, weights_dir: Path | None = None) -> dict:
    data_root = Path(data_root).absolute()
    container = write_dataset(data_root, seed)
    weights = write_synthetic_weights(weights_dir or settings.weights_root(data=data_root), seed)
    info = {"dataset": str(container), "weights": str(weights) if weights else None, "seed": seed}
    (data_root / DATASET / "tiny-crop.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def write_experiment_datasplit(experiment_name: str, experiments_root, container: Path) -> tuple[Path, str]:
    """Point an experiment's datasplit.csv at the tiny crop (paths relative to the working
    directory), split with the experiment's data.py settings; returns the path and those settings."""
    from cellmap_repro.datasplit import experiment_split_settings, make_datasplit, write_datasplit
    from cellmap_repro.experiment import load_experiment

    experiment = load_experiment(experiment_name, experiments_root, parts=("data",))
    probability, force, described = experiment_split_settings(experiment)
    rows = make_datasplit(container.parent, experiment.classes, probability, force_all_classes=force, relative_to=Path.cwd(), containers=[container])
    write_datasplit(experiment.datasplit_path, rows)
    return experiment.datasplit_path, described


def run(args: argparse.Namespace) -> int:
    data = settings.data_root(args.data)
    info = write_tiny_crop(data, seed=args.seed, weights_dir=settings.weights_root(args.weights, data))
    print(f"tiny crop: {info['dataset']}")
    if info["weights"]:
        print(f"synthetic setup04 weights: {info['weights']}")
    else:
        print("real setup04 weights already present: left untouched")
    if args.write_datasplit:
        path, described = write_experiment_datasplit(args.experiment, args.experiments_root, Path(info["dataset"]))
        print(f"datasplit: {path} ({described})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny-crop",
        help="write the tiny synthetic dataset, synthetic setup04 weights and a datasplit",
        description=__doc__.split("\n\n")[0],
    )
    settings.add_data_argument(parser)
    settings.add_experiment_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scene and weights (default 0)")
    parser.add_argument("--weights", default=None, help="weights cache (default: $CELLMAP_REPRO_WEIGHTS or <data>/weights)")
    parser.add_argument(
        "--no-datasplit",
        dest="write_datasplit",
        action="store_false",
        help="do not (re)write the experiment's datasplit.csv",
    )
    parser.set_defaults(func=run)
