"""`cellmap-repro view`: one crop in neuroglancer: raw, ground truth, predictions, processed masks.

The crop is looked up in the experiment's datasplit (raw and ground truth from its row);
predictions and processed masks from ``<data>/predictions/<exp>`` and ``<data>/processed/<exp>``
where they exist. Everything sits at its OME-NGFF position in nm. The viewer is neuroglancer's
own Python server (the toolbox's ``visualize`` uses it too), bound to 127.0.0.1 only: the URL
it prints opens on this machine; from elsewhere tunnel it (``ssh -L PORT:127.0.0.1:PORT host``
with ``--port PORT``). It serves until Ctrl-C, or for ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.classes import class_table
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import ScaleLevel, read_levels

BIND_ADDRESS = "127.0.0.1"
RAW_MARGIN = 0.5  # raw shown around the crop, as a fraction of the crop's size per side
# Logits as an orange overlay: transparent below the lower bound, opaque above the upper.
LOGIT_SHADER = """#uicontrol invlerp normalized(range=[-2, 2], clamp=true)
void main() { emitRGBA(vec4(1.0, 0.55, 0.0, normalized())); }
"""


def _dimensions(scale):
    import neuroglancer

    return neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=[float(s) for s in scale])


def _source(data, level: ScaleLevel, volume_type: str, corner_index=(0, 0, 0)):
    """A neuroglancer source placing ``data`` (whose voxel 0 is ``corner_index`` of ``level``) in nm.

    OME-NGFF translations are voxel centres, neuroglancer places voxel corners, and the
    offset may be fractional, so it goes into the layer's transform rather than voxel_offset.
    """
    import neuroglancer

    dimensions = _dimensions(level.scale)
    corner = [(t - s / 2) / s + i for t, s, i in zip(level.translation, level.scale, corner_index)]
    volume = neuroglancer.LocalVolume(data, dimensions=dimensions, volume_type=volume_type)
    transform = neuroglancer.CoordinateSpaceTransform(output_dimensions=dimensions, matrix=[[1 if r == c else 0 for c in range(3)] + [corner[r]] for r in range(3)])
    return neuroglancer.LayerDataSource(url=volume, transform=transform)


def _open_level(group: Path, where: str, level: ScaleLevel | None = None):
    import zarr

    level = level or read_levels(group, where=where)[0]
    return zarr.open_array(str(group / level.path), mode="r"), level


def _raw_window(raw_group: Path, crop_low, crop_high, voxel_size, where: str):
    """The raw level closest to ``voxel_size`` and the index box of the crop plus a margin (read lazily)."""
    levels = read_levels(raw_group, where=where)
    level = min(levels, key=lambda l: sum(abs(a - b) / b for a, b in zip(l.scale, voxel_size)))
    array, _ = _open_level(raw_group, where, level)
    scale, translation = np.asarray(level.scale), np.asarray(level.translation)
    margin = (crop_high - crop_low) * RAW_MARGIN
    low = np.floor((crop_low - margin - (translation - scale / 2)) / scale).astype(int)
    high = np.ceil((crop_high + margin - (translation - scale / 2)) / scale).astype(int)
    low, high = np.maximum(low, 0), np.minimum(high, array.shape)
    if np.any(high <= low):
        raise ReproError(f"{where}: the raw data ({raw_group}) does not reach the crop")
    return array, level, low, high


class _Window:
    """A lazy box of a zarr array (what neuroglancer reads chunk by chunk)."""

    def __init__(self, array, low, high):
        self.array, self.low = array, np.asarray(low)
        self.shape = tuple(int(h - l) for l, h in zip(low, high))
        self.dtype = array.dtype
        self.ndim = 3

    def __getitem__(self, item):
        shifted = tuple(slice(s.start + int(l), s.stop + int(l), s.step) for s, l in zip(item, self.low))
        return self.array[shifted]


MAX_SHOWN_SEGMENTS = 5000


def _segmentation(array, level: ScaleLevel):
    """A segmentation layer with every id selected (neuroglancer draws only selected ones)."""
    import neuroglancer

    data = array[:]
    data = data.astype(np.uint64 if data.dtype.itemsize > 4 or data.dtype.kind == "i" else np.uint32)
    ids = np.unique(data[data > 0])[:MAX_SHOWN_SEGMENTS]
    return neuroglancer.SegmentationLayer(source=_source(data, level, "segmentation"), segments=[int(i) for i in ids])


def _crop_row(experiment: str, crop_id: int, experiments_root):
    from cellmap_repro.datasplit import read_datasplit
    from cellmap_repro.experiment import load_experiment

    rows = read_datasplit(load_experiment(experiment, experiments_root, parts=("data",)).datasplit_path)
    for row in rows:
        if row.crop_id == crop_id:
            return row
    raise ReproError(f"crop {crop_id} is not in {experiment}'s datasplit (crops: {', '.join(str(r.crop_id) for r in rows)})")


def build_state(experiment: str, crop_id: int, data_root=None, experiments_root=None, classes: list[str] | None = None, layout: str = "4panel") -> tuple[dict, list[str]]:
    """Layers (name → neuroglancer layer) and the viewer's position; notes on what was not found."""
    import neuroglancer

    row = _crop_row(experiment, crop_id, experiments_root)
    data = settings.data_root(data_root)
    names = classes or row.classes
    unknown = [n for n in names if n not in class_table()]
    if unknown:
        raise ReproError(f"unknown class(es): {', '.join(unknown)}")
    notes: list[str] = []
    layers: dict[str, object] = {}
    boxes = []
    for name in names:
        group = row.label_group(name)
        if not group.exists():
            notes.append(f"no ground truth for '{name}' in crop {crop_id} ({group})")
            continue
        array, level = _open_level(group, f"ground truth {name} of crop {crop_id}")
        layers[f"truth {name}"] = _segmentation(array, level)
        low = np.asarray(level.translation) - np.asarray(level.scale) / 2
        boxes.append((low, low + np.asarray(level.scale) * array.shape, level.scale))
    if not boxes:
        raise ReproError(f"crop {crop_id}: none of {', '.join(names)} has ground truth on disk ({row.crop_group})")
    crop_low = np.min([b[0] for b in boxes], axis=0)
    crop_high = np.max([b[1] for b in boxes], axis=0)
    finest = min((b[2] for b in boxes), key=max)
    raw, raw_level, low, high = _raw_window(row.raw_group, crop_low, crop_high, finest, f"raw of crop {crop_id}")
    layers = {"raw": neuroglancer.ImageLayer(source=_source(_Window(raw, low, high), raw_level, "image", low))} | layers
    for kind, root in (("prediction", settings.predictions_root(data, experiment)), ("processed", settings.processed_root(data, experiment))):
        crop_folder = root / f"{row.dataset}.zarr" / f"crop{crop_id}"
        for name in names:
            group = crop_folder / name
            if not group.exists():
                notes.append(f"no {kind} '{name}' for crop {crop_id} ({group})")
                continue
            array, level = _open_level(group, f"{kind} {name} of crop {crop_id}")
            if kind == "prediction":
                layers[f"{kind} {name}"] = neuroglancer.ImageLayer(source=_source(array, level, "image"), shader=LOGIT_SHADER)
            else:
                layers[f"{kind} {name}"] = _segmentation(array, level)
    # Arrays are z, y, x; neuroglancer's "xy" panel spans the first two global dimensions,
    # so the global space is x, y, z (layers map onto it by name).
    centre = (crop_low + crop_high) / 2 / np.asarray(finest)
    view = {"dimensions": neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=[float(s) for s in finest[::-1]]), "position": centre[::-1].tolist(), "cross_section_scale": float(np.max((crop_high - crop_low) / np.asarray(finest)) / 400), "layout": layout}
    return {"layers": layers, "view": view}, notes


def open_viewer(experiment: str, crop_id: int, data_root=None, experiments_root=None, classes=None, port: int = 0, layout: str = "4panel"):
    """Start neuroglancer's server on 127.0.0.1 with the crop loaded; returns (viewer, url, notes)."""
    import neuroglancer

    state, notes = build_state(experiment, crop_id, data_root, experiments_root, classes, layout)
    neuroglancer.set_server_bind_address(BIND_ADDRESS, port)
    viewer = neuroglancer.Viewer()
    with viewer.txn() as s:
        s.dimensions = state["view"]["dimensions"]
        s.position = state["view"]["position"]
        s.cross_section_scale = state["view"]["cross_section_scale"]
        s.layout = state["view"]["layout"]
        for name, layer in state["layers"].items():
            s.layers[name] = layer
            # Predictions and masks start hidden: shown together they would cover the truth.
            s.layers[name].visible = name == "raw" or name.startswith("truth ")
    return viewer, viewer.get_viewer_url(), notes


def run(args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    viewer, url, notes = open_viewer(args.experiment, args.crop, args.data, args.experiments_root, classes, args.port, args.layout)
    for note in notes:
        print(f"note: {note}")
    print(f"neuroglancer: {url}", flush=True)
    if args.timeout is not None:
        threading.Event().wait(args.timeout)
        return 0
    print("serving on 127.0.0.1 until Ctrl-C", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopped")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("view", help="show a crop's raw, truth, predictions and masks in neuroglancer", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--crop", type=settings.number_flag(0), required=True, help="crop id (from the experiment's datasplit)")
    parser.add_argument("--classes", default=None, help="comma-separated classes to show (default: those the crop annotates)")
    parser.add_argument("--port", type=settings.number_flag(0, 65535), default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--layout", default="4panel", choices=["4panel", "xy", "xz", "yz", "3d", "xy-3d"], help="neuroglancer layout (default %(default)s)")
    parser.add_argument("--timeout", type=settings.number_flag(0, real=True, above=True), default=None, help="stop serving after this many seconds (default: until Ctrl-C)")
    parser.set_defaults(func=run)
