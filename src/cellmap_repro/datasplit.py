"""`cellmap-repro datasplit`: read, validate and write the toolbox's ``datasplit.csv``.

Format (reference section c): no header; one row per crop; five double-quoted fields:
usage (``train``/``validate``), raw container (up to ``.zarr``), raw array path,
label container, crop group path followed by the bracketed class list, e.g.
``recon-1/labels/groundtruth/crop234/[ecs,mito,nuc]``.

Writing from disk scans ``<data>/<dataset>/<dataset>.zarr/recon-1/labels/groundtruth``,
keeps the crops holding at least one requested class and draws each crop's usage with
a seeded generator over the sorted crop list, so the same inputs give the same file.
``validation_prob`` and ``force_all_classes`` come from the experiment's ``data.py``
unless a flag overrides them; with two or more crops at least one is validated and one
trained on (see :func:`make_datasplit`).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellmap_repro import settings
from cellmap_repro.classes import check_classes
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_write_text

USAGES = ("train", "validate")
DEFAULT_SEED = 13
RAW_ARRAY = "recon-1/em/fibsem-uint8"
GROUNDTRUTH = "recon-1/labels/groundtruth"
_CROP_FIELD = re.compile(r"^(?P<crop_path>.+/crop(?P<crop_id>\d+))/\[(?P<classes>[^\]]*)\]$")


@dataclass
class DatasplitRow:
    usage: str
    raw_container: str
    raw_path: str
    label_container: str
    crop_path: str
    classes: list[str] = field(default_factory=list)

    @property
    def crop_id(self) -> int:
        return int(self.crop_path.rsplit("crop", 1)[1])

    @property
    def dataset(self) -> str:
        return Path(self.raw_container).name.removesuffix(".zarr")

    @property
    def raw_group(self) -> Path:
        return settings.resolve(self.raw_container) / self.raw_path

    @property
    def crop_group(self) -> Path:
        return settings.resolve(self.label_container) / self.crop_path

    def label_group(self, class_name: str) -> Path:
        return self.crop_group / class_name

    def fields(self) -> list[str]:
        return [
            self.usage,
            self.raw_container,
            self.raw_path,
            self.label_container,
            f"{self.crop_path}/[{','.join(self.classes)}]",
        ]


def parse_datasplit(text: str, where: str) -> list[DatasplitRow]:
    rows = []
    reader = csv.reader(io.StringIO(text))
    for line_number, fields in enumerate(reader, start=1):
        if not fields or all(not f.strip() for f in fields):
            continue
        at = f"{where}:{line_number}"
        if len(fields) != 5:
            raise ReproError(f"{at}: expected 5 fields (usage, raw container, raw path, label container, crop/[classes]), got {len(fields)}")
        usage, raw_container, raw_path, label_container, crop_field = (f.strip() for f in fields)
        if usage not in USAGES:
            raise ReproError(f"{at}: usage must be 'train' or 'validate', got {usage!r}")
        match = _CROP_FIELD.match(crop_field)
        if not match:
            raise ReproError(f"{at}: last field must look like 'recon-1/labels/groundtruth/crop<id>/[class,...]', got {crop_field!r}")
        classes = [c.strip() for c in match["classes"].split(",") if c.strip()]
        if not classes:
            raise ReproError(f"{at}: empty class list in {crop_field!r}")
        check_classes(classes, at)
        for name, value in (("raw container", raw_container), ("label container", label_container)):
            if not value.rstrip("/").endswith(".zarr"):
                raise ReproError(f"{at}: {name} must end in .zarr, got {value!r}")
        rows.append(DatasplitRow(usage, raw_container, raw_path, label_container, match["crop_path"], classes))
    if not rows:
        raise ReproError(f"{where}: datasplit has no rows")
    return rows


def read_datasplit(path: Path) -> list[DatasplitRow]:
    path = Path(path)
    if not path.exists():
        raise ReproError(f"datasplit not found: {path} (write one with `cellmap-repro datasplit` or `cellmap-repro tiny-crop`)")
    return parse_datasplit(path.read_text(), str(path))


def crop_ids(text: str, flag: str, words: str) -> set[int]:
    """Crop ids like ``1,2`` given on the command line, or one line saying what is allowed."""
    try:
        wanted = {int(c) for c in text.split(",") if c.strip()}
    except ValueError:
        wanted = set()
    if not wanted:
        raise ReproError(f"{flag} must be {words} or crop ids like 1,2; got {text!r}")
    return wanted


def select_rows(rows: list[DatasplitRow], which: str, flag: str = "--crops") -> list[DatasplitRow]:
    """The datasplit rows ``which`` names: validate, train, all, or crop ids like 1,2."""
    if which in USAGES:
        chosen = [r for r in rows if r.usage == which]
    elif which == "all":
        chosen = list(rows)
    else:
        wanted = crop_ids(which, flag, "validate, train, all")
        chosen = [r for r in rows if r.crop_id in wanted]
        missing = wanted - {r.crop_id for r in chosen}
        if missing:
            raise ReproError(f"crop(s) {sorted(missing)} are not in the datasplit")
    if not chosen:
        raise ReproError(f"the datasplit has no '{which}' crops")
    return chosen


def check_paths_exist(rows: list[DatasplitRow], where: str) -> None:
    """Fail on the first raw array or label group of a row that is not on disk."""
    for row in rows:
        if not row.raw_group.exists():
            raise ReproError(f"{where}: raw data for crop {row.crop_id} does not exist: {row.raw_group}")
        for class_name in row.classes:
            if not row.label_group(class_name).exists():
                raise ReproError(f"{where}: label '{class_name}' of crop {row.crop_id} does not exist: {row.label_group(class_name)}")


def format_datasplit(rows: list[DatasplitRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for row in rows:
        writer.writerow(row.fields())
    return out.getvalue()


def write_datasplit(path: Path, rows: list[DatasplitRow]) -> None:
    atomic_write_text(path, format_datasplit(rows))


def scan_container(container: Path) -> list[tuple[Path, int, list[str]]]:
    """(container, crop id, annotated classes) for every ground-truth crop of one container, by id."""
    groundtruth = container / GROUNDTRUTH
    if not groundtruth.is_dir():
        return []
    found = []
    for crop in sorted(groundtruth.glob("crop*"), key=lambda p: (len(p.name), p.name)):
        if not crop.name[4:].isdigit():
            continue
        classes = sorted(p.name for p in crop.iterdir() if (p / ".zattrs").exists() and p.name != "all")
        found.append((container, int(crop.name[4:]), classes))
    return found


def scan_crops(data_root: Path) -> list[tuple[Path, int, list[str]]]:
    """(container, crop id, annotated classes) for every ground-truth crop on disk, sorted."""
    return [crop for container in sorted(data_root.glob("*/*.zarr")) for crop in scan_container(container)]


def make_datasplit(
    data_root: Path,
    classes: list[str],
    validation_prob: float = 0.15,
    seed: int = DEFAULT_SEED,
    force_all_classes: str | bool = False,
    relative_to: Path | None = None,
    containers: list[Path] | None = None,
) -> list[DatasplitRow]:
    """Split the crops on disk (or of ``containers``) per crop, as the toolbox does, but reproducibly.

    Each crop, in sorted order, draws u from a generator seeded by ``seed`` and is validated
    when u < ``validation_prob``. ``force_all_classes`` as in the toolbox: True drops crops
    lacking a requested class; "train" / "validate" keeps such incomplete crops out of that
    usage (they go to the other). With two or more crops, at least one is validated and one
    trained on: if the draw validates none, the crop whose u was lowest (closest to being
    drawn) among those allowed in validation is moved there; if it trains on none, the
    crop whose u was highest is moved to training.
    """
    if not 0.0 <= validation_prob <= 1.0:
        raise ReproError(f"--validation-prob must be within [0, 1], got {validation_prob}")
    crops = scan_crops(data_root) if containers is None else [c for container in containers for c in scan_container(Path(container))]
    if not crops:
        raise ReproError(f"no ground-truth crops under {data_root} (expected <dataset>/<dataset>.zarr/{GROUNDTRUTH}/crop<id>)")
    rng = np.random.default_rng(seed)
    rows, draws, allowed = [], [], []
    for container, crop_id, annotated in crops:
        draw = rng.random()
        present = [c for c in classes if c in annotated]
        if not present:
            continue
        complete = len(present) == len(classes)
        if not complete and force_all_classes is True:
            continue
        usages = set(USAGES) - ({force_all_classes} if not complete and force_all_classes in USAGES else set())
        usage = "validate" if draw < validation_prob else "train"
        shown = container
        if relative_to is not None and container.is_relative_to(relative_to):
            shown = container.relative_to(relative_to)
        rows.append(DatasplitRow(usage if usage in usages else next(iter(usages)), str(shown), RAW_ARRAY, str(shown), f"{GROUNDTRUTH}/crop{crop_id}", present))
        draws.append(draw)
        allowed.append(usages)
    if not rows:
        raise ReproError(f"no crop under {data_root} holds any of the requested classes")
    if len(rows) >= 2:
        for usage, pick in (("validate", min), ("train", max)):
            movable = [i for i, row in enumerate(rows) if usage in allowed[i]]
            if movable and not any(row.usage == usage for row in rows):
                rows[pick(movable, key=lambda i: draws[i])].usage = usage
    return rows


def split_advice(rows: list[DatasplitRow], force_all_classes) -> str | None:
    """One line on a split that cannot train and validate, with what to do about it."""
    counts = {u: sum(r.usage == u for r in rows) for u in USAGES}
    if len(rows) == 1:
        return (
            f"note: only one crop (crop {rows[0].crop_id}): it is used for {rows[0].usage} and nothing else; "
            "fetch more crops (`cellmap-repro fetch --crops ID,ID`) and write the datasplit again"
        )
    for usage in USAGES:
        if counts[usage] == 0:
            return (
                f"warning: no {usage} crop: every crop lacks some of the requested classes and force_all_classes "
                f"{force_all_classes!r} keeps incomplete crops out of {usage}; pass --force-all-classes false"
            )
    return None


def run(args: argparse.Namespace) -> int:
    from cellmap_repro.experiment import load_experiment

    experiment = load_experiment(args.experiment, args.experiments_root, parts=("data",))
    data = settings.data_root(args.data)
    probability, force, described = experiment_split_settings(experiment, args.validation_prob, args.force_all_classes, args.seed)
    rows = make_datasplit(data, experiment.classes, probability, args.seed, force, relative_to=Path.cwd())
    out = Path(args.output) if args.output else experiment.datasplit_path
    write_datasplit(out, rows)
    counts = {u: sum(r.usage == u for r in rows) for u in USAGES}
    print(f"wrote {out}: {counts['train']} train, {counts['validate']} validate crops ({described})")
    advice = split_advice(rows, force)
    if advice:
        print(advice)
    return 0


def experiment_split_settings(experiment, validation_prob: float | None = None, force_flag: str | None = None, seed: int = DEFAULT_SEED):
    """validation_prob and force_all_classes from the flags, else from the experiment's data.py."""
    probability = experiment.validation_prob if validation_prob is None else validation_prob
    force = experiment.force_all_classes if force_flag is None else {"true": True, "false": False}.get(force_flag, force_flag)
    described = (
        f"validation_prob {probability:g} from {'data.py' if validation_prob is None else '--validation-prob'}, "
        f"force_all_classes {force!r} from {'data.py' if force_flag is None else '--force-all-classes'}, seed {seed}"
    )
    return probability, force, described


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "datasplit",
        help="write an experiment's datasplit.csv from the crops on disk",
        description=__doc__.split("\n\n")[0],
    )
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--validation-prob", type=float, default=None, help="probability that a crop is used for validation (default: the experiment's data.py, else 0.15)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the per-crop draw (default %(default)s)")
    parser.add_argument(
        "--force-all-classes",
        choices=["false", "true", "train", "validate"],
        default=None,
        help="true: drop crops lacking a requested class; train/validate: keep such crops out of that usage (default: the experiment's data.py, else false)",
    )
    parser.add_argument("-o", "--output", default=None, help="output path (default: the experiment's datasplit.csv)")
    parser.set_defaults(func=run)
