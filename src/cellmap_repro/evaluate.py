"""`cellmap-repro evaluate`: challenge scores of predictions against ground truth.

Two forms. ``evaluate -e EXP`` scores an experiment's processed predictions on the crops
of its datasplit (validation crops by default; the datasplit is the one ``data.py`` names).
``evaluate --submission SUB.zip|SUB.zarr --truth TRUTH.zarr`` scores a submission as the
challenge's evaluator reads it (``submission.py``: nested zarr, crop names with or without
"crop", missing metadata, scale levels), without unzipping or changing either.

Every class the truth annotates is scored with the challenge's metrics (``metrics.py``;
``--scoring legacy`` for the 2025-04 release the baseline's figures used); one without a
prediction is scored as not submitted, as the challenge does, and reported. Predictions
reach the truth's grid by exact geometry (voxel centres mapped, the default) or, with
``--leaderboard``, by the toolbox's own resampling and tie-breaking, so the figures are
what the leaderboard says (see docs/evaluation.md for where the two differ).

Writes ``scores.json`` (every per-crop and per-class figure, the mode and the toolbox commit
it follows), ``scores.md`` (a table per class) and ``scores.png`` (per-class bars): for an
experiment under ``experiments/<exp>/logs/evaluation[-leaderboard]/``, for a submission
beside it in ``<name>-scores[-leaderboard]/``, or in ``--output``.
"""

from __future__ import annotations

import argparse
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellmap_repro import metrics, settings
from cellmap_repro.classes import instance_classes
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_output_path, atomic_write_json, atomic_write_text, read_levels

RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"
ORTOOLS_PIN = "ortools==9.15.6755"
ORTOOLS_MISSING = (
    f"OR-Tools is not installed (`pip install --no-deps {ORTOOLS_PIN}`): instance matches are chosen by scipy, "
    "so where two matchings cost exactly the same the tied objects may pair differently from the leaderboard's"
)


@dataclass
class Mode:
    """How predictions meet the truth and how ties are broken, and what to tell the user about it."""

    scoring: str = "current"
    leaderboard: bool = False
    matcher: str = "scipy"
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def choose(cls, scoring: str, leaderboard: bool) -> "Mode":
        if leaderboard and scoring == "legacy":
            raise ReproError(f"--leaderboard follows the current evaluator (toolbox {metrics.TOOLBOX_COMMIT}); it cannot be combined with --scoring legacy")
        mode = cls(scoring, leaderboard)
        if leaderboard:
            if metrics.ortools_version():
                mode.matcher = "ortools"
            else:
                mode.warnings.append(ORTOOLS_MISSING)
        return mode

    def describe(self) -> dict:
        """The JSON's record of what this run mirrors."""
        if self.scoring == "legacy":
            follows, commit = "scoring rules of the 2025-04 release; exact geometry", metrics.LEGACY_COMMIT
        elif self.leaderboard:
            follows, commit = "scoring rules, resampling and tie-breaking of the evaluator", metrics.TOOLBOX_COMMIT
        else:
            follows, commit = "scoring rules of the evaluator; exact geometry; ties by scipy", metrics.TOOLBOX_COMMIT
        matching = f"OR-Tools {metrics.ortools_version()} min-cost flow on the toolbox's graph" if self.matcher == "ortools" else "scipy linear_sum_assignment per overlap component"
        return {
            "mode": "leaderboard" if self.leaderboard else "exact",
            "toolbox": {"repository": metrics.TOOLBOX_REPOSITORY, "commit": commit, "follows": follows},
            "matching": matching,
        }


def _finite_or_none(value):
    """JSON has no infinity: infinite distances (an object with no counterpart) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


# ---------------------------------------------------------------- one prediction on the truth grid


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, ...]
    voxel_size: tuple[float, ...]
    translation: tuple[float, ...]


def on_grid(array, voxel_size, translation, grid: Grid, instance: bool, mode: Mode, where: str, warnings: list[str]) -> np.ndarray:
    """A prediction (zarr or numpy array) brought onto ``grid``; ``voxel_size``/``translation`` may be None."""
    ratio = float(np.prod(array.shape, dtype=float) / np.prod(grid.shape, dtype=float))
    if ratio > metrics.MAX_VOLUME_RATIO:
        raise ReproError(f"{where}: {list(array.shape)} voxels is {ratio:.0f}× the crop's {list(grid.shape)}; the challenge refuses more than {metrics.MAX_VOLUME_RATIO:.0f}× (downsample the prediction)")
    if voxel_size is None:
        warnings.append(f"{where}: no voxel size; {'centre padded/cropped' if tuple(array.shape) != grid.shape else 'taken'} to the crop's grid, as the toolbox does")
    elif translation is None:
        warnings.append(f"{where}: no translation; taken to start where the crop starts, as the toolbox does")
    if mode.leaderboard:
        return _toolbox_on_grid(array, voxel_size, translation, grid, instance)
    data = array[:]
    if voxel_size is None:
        data = metrics.centre_pad_crop(data, grid.shape)
        return data if instance else (data > 0).astype(np.uint8)
    voxel_size = tuple(float(v) for v in voxel_size[-len(grid.shape):])
    if translation is None:
        translation = metrics.aligned_translation(voxel_size, grid.shape, grid.voxel_size, grid.translation)
    translation = tuple(float(v) for v in translation[-len(grid.shape):])
    if not metrics.covers(voxel_size, translation, data.shape, grid.voxel_size, grid.translation, grid.shape):
        warnings.append(f"{where} does not cover the whole crop; the rest is scored as background")
    return metrics.resample_to(data, voxel_size, translation, grid.shape, grid.voxel_size, grid.translation, instance)


def _toolbox_on_grid(array, voxel_size, translation, grid: Grid, instance: bool) -> np.ndarray:
    """The toolbox's path: large sources resampled in cubes, others whole, then snapped and placed."""
    target = np.asarray(grid.voxel_size, float)
    factors = None
    if np.prod(array.shape, dtype=float) > metrics.CHUNKED_ABOVE_VOXELS:
        if voxel_size is not None:
            sizes = np.asarray(voxel_size, float)[-len(target):]
            factors = None if np.allclose(sizes, target) else sizes / target
        else:
            ratios = np.asarray(array.shape, float) / np.asarray(grid.shape, float)
            factors = 1 / ratios if np.all(ratios >= 1) and not np.allclose(ratios, 1) else None
    if factors is not None:
        data = metrics.toolbox_resample_chunked(array, factors, instance)
        return metrics.toolbox_align(data, grid.voxel_size, translation, grid.shape, grid.voxel_size, grid.translation, instance, resampled=True)
    return metrics.toolbox_align(array[:], voxel_size, translation, grid.shape, grid.voxel_size, grid.translation, instance)


# ---------------------------------------------------------------- scoring one (crop, class)


def score_entry(base: dict, truth: np.ndarray, pred: np.ndarray | None, mask: np.ndarray | None, grid: Grid, instance: bool, mode: Mode, warnings: list[str]) -> dict:
    """One (crop, class) record. A prediction that is missing is scored on the unmasked truth, as the toolbox does."""
    scored_truth = truth * (mask > 0) if mask is not None else truth
    entry = {**base, "type": "instance" if instance else "semantic", "voxel_size": list(grid.voxel_size), "voxels": int(truth.size), "truth_voxels": int(np.count_nonzero(scored_truth)), "submitted": pred is not None}
    if pred is not None and mask is not None:
        pred = pred * (mask > 0)
    if pred is None:
        scored_truth = truth
    if mode.scoring == "legacy":
        entry.update(metrics.legacy_instance(scored_truth, pred, grid.voxel_size) if instance else metrics.legacy_semantic(scored_truth, pred))
    elif instance:
        counts = metrics.instance_counts(scored_truth, pred, grid.voxel_size, matcher=mode.matcher, float32_distances=mode.leaderboard)
        entry.update({"tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "distances_nm": counts.distances, "distance_scores": counts.distance_scores, "skipped": counts.skipped})
        if counts.skipped and pred is not None:
            warnings.append(f"crop {base['crop']}: '{base['class']}' left out of the pooled counts, as the challenge does: {counts.skipped}")
    else:
        counts = metrics.semantic_counts(scored_truth, pred)
        entry.update({"tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "iou": counts.iou, "dice": counts.dice})
    return entry


def summarise(per_crop: list[dict], mode: Mode, warnings: list[str], **header) -> dict:
    per_class = _aggregate(per_crop, mode.scoring)
    summary = metrics.overall(
        [c["score"] for c in per_class.values() if c["type"] == "instance"],
        [c["score"] for c in per_class.values() if c["type"] == "semantic"],
        toolbox_rule=mode.leaderboard,
    )
    result = {**header, "scoring": mode.scoring, **mode.describe(), **summary, "classes": per_class, "per_crop": per_crop, "warnings": mode.warnings + warnings}
    return _finite_or_none(result)


# ---------------------------------------------------------------- an experiment's processed predictions


def _read_truth(group: Path, where: str):
    import zarr

    levels = read_levels(group, where=where)
    array = zarr.open_array(str(group / levels[0].path), mode="r")[:]
    if array.size == 0 or array.ndim != len(levels[0].scale):
        raise ReproError(f"{where}: array {group / levels[0].path} has shape {list(array.shape)}, expected a non-empty {len(levels[0].scale)}-d volume")
    return array, Grid(tuple(array.shape), tuple(levels[0].scale), tuple(levels[0].translation))


def evaluate_experiment(experiment_dir: Path, data_root: Path | None = None, scoring: str = "current", crops: str = "validate", progress: bool = True, leaderboard: bool = False, output: Path | None = None) -> dict:
    from tqdm import tqdm

    from cellmap_repro.datasplit import read_datasplit, select_rows
    from cellmap_repro.experiment import load_experiment
    from cellmap_repro.submission import Tree, pick_level

    experiment_dir = Path(experiment_dir)
    experiment = experiment_dir.name
    mode = Mode.choose(scoring, leaderboard)
    datasplit = load_experiment(experiment, experiment_dir.parent, parts=("data",)).datasplit_path
    rows = select_rows(read_datasplit(datasplit), crops)
    processed_root = settings.processed_root(settings.data_root(data_root), experiment)
    if not processed_root.exists():
        raise ReproError(f"no processed predictions under {processed_root} (run predict and process for {experiment} first)")
    instances = set(instance_classes())
    per_crop: list[dict] = []
    warnings: list[str] = []
    jobs = [(row, name) for row in rows for name in row.classes]
    for row, name in tqdm(jobs, desc=f"evaluate {experiment}", unit="class", disable=not progress):
        truth, grid = _read_truth(row.label_group(name), f"ground truth {name} of crop {row.crop_id}")
        mask_group = row.crop_group / f"{name}_mask"
        mask = _read_truth(mask_group, f"mask {name} of crop {row.crop_id}")[0] if mask_group.exists() else None
        prediction_group = processed_root / f"{row.dataset}.zarr" / f"crop{row.crop_id}" / name
        instance = name in instances
        pred = None
        if prediction_group.exists():
            with Tree(prediction_group.parent) as tree:
                level, _ = pick_level(tree, name, grid.voxel_size)
                where = f"crop {row.crop_id}: prediction for '{name}'"
                pred = on_grid(tree.array(level.path), level.voxel_size, level.translation, grid, instance, mode, where, warnings)
        else:
            warnings.append(f"crop {row.crop_id}: no prediction for '{name}' ({prediction_group}); scored as not submitted")
        per_crop.append(score_entry({"crop": row.crop_id, "dataset": row.dataset, "class": name}, truth, pred, mask, grid, instance, mode, warnings))
    result = summarise(per_crop, mode, warnings, experiment=experiment, crops=sorted({r.crop_id for r in rows}))
    out_dir = Path(output) if output else experiment_dir / "logs" / ("evaluation-leaderboard" if leaderboard else "evaluation")
    write_outputs(result, out_dir)
    result["output_dir"] = str(out_dir)
    return result


# ---------------------------------------------------------------- a submission against a truth zarr


def _crop_label(name: str):
    digits = name.removeprefix("crop")
    return int(digits) if digits.isdigit() else name


def _truth_labels(truth_tree, crop: str, mode: Mode, warnings: list[str]) -> tuple[list[str], dict[str, str]]:
    """Classes to score in a truth crop, and their mask arrays (``<class>_mask``)."""
    from cellmap_repro.submission import labels

    names = labels(truth_tree, crop)
    masks = {n.removesuffix("_mask"): n for n in names if n.endswith("_mask") and n.removesuffix("_mask") in names}
    scored = [n for n in names if n not in masks.values() and n != "all"]
    if mode.leaderboard and masks:
        # The toolbox's discovery lists every array of a truth crop, masks included; a mask
        # nobody submits is then scored as a missing semantic class.
        scored += [m for m in masks.values() if truth_tree.is_array(posixpath.join(crop, m))]
        warnings.append(f"{crop}: {', '.join(sorted(masks.values()))} scored as classes too, as the toolbox does (its discovery lists every array of a truth crop)")
    return scored, masks


def _default_output(submission: Path, leaderboard: bool) -> Path:
    stem = submission.name.removesuffix(".zip").removesuffix(".zarr").rstrip("/") or "submission"
    return submission.parent / f"{stem}-scores{'-leaderboard' if leaderboard else ''}"


def evaluate_submission(submission: Path, truth: Path, output: Path | None = None, scoring: str = "current", leaderboard: bool = False, progress: bool = True) -> dict:
    from tqdm import tqdm

    from cellmap_repro.submission import match_crops, open_submission, open_truth, truth_grid

    submission, truth = Path(submission).absolute(), Path(truth).absolute()
    if not submission.exists():
        raise ReproError(f"submission not found: {submission}")
    mode = Mode.choose(scoring, leaderboard)
    instances = set(instance_classes())
    per_crop: list[dict] = []
    truth_tree = open_truth(truth)
    tree, warnings = open_submission(submission)
    with tree, truth_tree:
        truth_crops = truth_tree.children()
        if not truth_crops:
            raise ReproError(f"ground truth {truth}: no crop folders")
        found, missing = match_crops(tree.children(), truth_crops)
        if any(found[c] != c for c in found):
            warnings.append("crop folders are named without the 'crop' prefix; matched as crop<id>, as the toolbox does")
        for crop in missing:
            warnings.append(f"{crop}: not in the submission; every class scored as not submitted")
        jobs = []
        for crop in truth_crops:
            names, masks = _truth_labels(truth_tree, crop, mode, warnings)
            jobs += [(crop, name, masks.get(name)) for name in names]
        for crop, name, mask_name in tqdm(jobs, desc=f"evaluate {submission.name}", unit="class", disable=not progress):
            # a mask scored as a class (leaderboard) sits on the grid of the class it masks
            owner = name.removesuffix("_mask") if name.endswith("_mask") and truth_tree.exists(posixpath.join(crop, name.removesuffix("_mask"))) else name
            level, _ = truth_grid(truth_tree, posixpath.join(crop, owner))
            truth_array = truth_tree.array(level.path if owner == name else posixpath.join(crop, name))[:]
            grid = Grid(tuple(truth_array.shape), level.voxel_size[-3:], level.translation[-3:])
            mask = truth_tree.array(posixpath.join(crop, mask_name))[:] if mask_name else None
            instance = name in instances
            pred = _submitted(tree, found.get(crop), crop, name, grid, instance, mode, warnings)
            per_crop.append(score_entry({"crop": _crop_label(crop), "dataset": "", "class": name}, truth_array, pred, mask, grid, instance, mode, warnings))
    result = summarise(per_crop, mode, warnings, submission=str(submission), truth=str(truth), crops=[_crop_label(c) for c in truth_crops])
    out_dir = Path(output) if output else _default_output(submission, leaderboard)
    write_outputs(result, out_dir)
    result["output_dir"] = str(out_dir)
    return result


def _submitted(tree, folder: str | None, crop: str, name: str, grid: Grid, instance: bool, mode: Mode, warnings: list[str]) -> np.ndarray | None:
    """The submitted prediction of one class on the truth grid, or None when not submitted."""
    from cellmap_repro.submission import pick_level

    path = posixpath.join(folder, name) if folder else None
    if path is None or not tree.exists(path):
        if folder:
            warnings.append(f"{crop}: no prediction for '{name}'; scored as not submitted")
        return None
    if not tree.is_array(path):
        if mode.leaderboard:
            warnings.append(f"{crop}: '{name}' is a group, not an array; the toolbox lists only arrays, so the leaderboard scores it as not submitted")
            return None
        warnings.append(f"{crop}: '{name}' is a group, not an array; scored here, but the toolbox ({metrics.TOOLBOX_COMMIT}) lists only arrays and would score it as not submitted")
    level, _ = pick_level(tree, path, grid.voxel_size)
    return on_grid(tree.array(level.path), level.voxel_size, level.translation, grid, instance, mode, f"{crop}: '{name}'", warnings)


# ---------------------------------------------------------------- aggregation and outputs


def _aggregate(per_crop: list[dict], scoring: str) -> dict:
    classes: dict[str, dict] = {}
    for name in dict.fromkeys(e["class"] for e in per_crop):
        entries = [e for e in per_crop if e["class"] == name]
        kind = entries[0]["type"]
        voxels = sum(e["truth_voxels"] for e in entries)
        if scoring == "legacy":
            # The 2025-04 release weighted each crop by its volume in nm³; an infinite
            # mean distance in any crop makes the class's mean distance infinite too.
            weights = np.array([np.prod(e["voxel_size"]) * e["voxels"] for e in entries], float)

            def weighted(key):
                return float(np.average([e[key] for e in entries], weights=weights))

            if kind == "instance":
                summary = {"score": weighted("combined_score"), "type": kind, "accuracy": weighted("accuracy"), "hausdorff_distance": weighted("hausdorff_distance"), "normalized_hausdorff_distance": weighted("normalized_hausdorff_distance"), "truth_voxels": voxels}
            else:
                summary = {"score": weighted("iou"), "type": kind, "iou": weighted("iou"), "dice": weighted("dice"), "truth_voxels": voxels}
        elif kind == "instance":
            counts = metrics.InstanceCounts()
            for e in entries:
                counts = counts.add(metrics.InstanceCounts(e["tp"], e["fp"], e["fn"], list(e["distance_scores"]), list(e["distances_nm"])))
            summary = {"score": counts.combined, "type": kind, "f1": counts.f1, "hausdorff_score": counts.hausdorff_score, "mean_hausdorff_nm": counts.mean_distance, "tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "truth_voxels": voxels}
        else:
            counts = metrics.SemanticCounts()
            for e in entries:
                counts = counts.add(metrics.SemanticCounts(e["tp"], e["fp"], e["fn"], e["voxels"]))
            summary = {"score": counts.iou, "type": kind, "iou": counts.iou, "dice": counts.dice, "tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "truth_voxels": voxels}
        classes[name] = summary
    return classes


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(result: dict) -> str:
    geometry = "toolbox resampling and tie-breaking (--leaderboard)" if result.get("mode") == "leaderboard" else "exact geometry"
    toolbox = result.get("toolbox", {})
    lines = [
        f"Overall {_fmt(result['overall_score'])} (instance {_fmt(result['overall_instance_score'])}, semantic {_fmt(result['overall_semantic_score'])}); "
        f"{result['scoring']} scoring, crops {', '.join(str(c) for c in result['crops'])}",
        "",
        f"{geometry}; follows {toolbox.get('repository', metrics.TOOLBOX_REPOSITORY)} at {toolbox.get('commit', metrics.TOOLBOX_COMMIT)}; matching: {result.get('matching', 'scipy')}",
        "",
        "| class | type | score | IoU / F1 | Dice / Hausdorff score | mean Hausdorff (nm) | truth voxels |"
        if result["scoring"] != "legacy"
        else "| class | type | score | IoU / accuracy | Dice / Hausdorff score | mean Hausdorff (nm) | truth voxels |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in result["classes"].items():
        if c["type"] == "instance":
            first = c.get("f1", c.get("accuracy"))
            second = c.get("hausdorff_score", c.get("normalized_hausdorff_distance"))
            distance = c.get("mean_hausdorff_nm", c.get("hausdorff_distance"))
        else:
            first, second, distance = c.get("iou", c["score"]), c.get("dice"), None
        lines.append(f"| {name} | {c['type']} | {_fmt(c['score'])} | {_fmt(first)} | {_fmt(second)} | {_fmt(distance)} | {c['truth_voxels']} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_json(out_dir / "scores.json", result)
    atomic_write_text(out_dir / "scores.md", markdown_table(result))
    names = list(result["classes"])
    scores = [result["classes"][n]["score"] for n in names]
    colours = ["tab:orange" if result["classes"][n]["type"] == "instance" else "tab:blue" for n in names]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.5))
    axis.bar(names, scores, color=colours)
    axis.set_ylim(0, 1)
    axis.set_ylabel("score")
    title = result.get("experiment") or Path(result.get("submission", "submission")).name
    axis.set_title(f"{title}: overall {_fmt(result['overall_score'])} (blue semantic IoU, orange instance combined)", fontsize=9)
    axis.tick_params(axis="x", rotation=60, labelsize=8)
    figure.tight_layout()
    with atomic_output_path(out_dir / "scores.png") as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def update_readme(readme: Path, result: dict) -> None:
    text = readme.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        raise ReproError(f"{readme} has no {RESULTS_START} ... {RESULTS_END} markers for the results table")
    pattern = re.compile(re.escape(RESULTS_START) + r".*?" + re.escape(RESULTS_END), re.S)
    replacement = f"{RESULTS_START}\n{markdown_table(result)}{RESULTS_END}"
    atomic_write_text(readme, pattern.sub(lambda _: replacement, text))


def run(args: argparse.Namespace) -> int:
    from cellmap_repro.experiment import experiment_dir

    if bool(args.submission) != bool(args.truth):
        raise ReproError("--submission and --truth go together: the submission to score and the ground-truth zarr to score it against")
    output = Path(args.output) if args.output else None
    if args.submission:
        if args.update_readme:
            raise ReproError("--update-readme is for an experiment's own evaluation, not for a submission")
        result = evaluate_submission(Path(args.submission), Path(args.truth), output, args.scoring, args.leaderboard)
        directory = None
    else:
        directory = experiment_dir(args.experiment, args.experiments_root)
        result = evaluate_experiment(directory, args.data, args.scoring, args.crops, leaderboard=args.leaderboard, output=output)
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(markdown_table(result))
    if directory is not None and args.update_readme:
        update_readme(directory / "README.md", result)
        print(f"updated {directory / 'README.md'}")
    print(f"scores: {result['output_dir']}/scores.json, scores.md, scores.png")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score predictions or a submission with the challenge metrics", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--submission", default=None, help="a submission zip or zarr to score (with --truth) instead of the experiment's processed predictions")
    parser.add_argument("--truth", default=None, help="ground-truth zarr: crop<id>/<class> arrays with voxel_size and translation (or OME-NGFF groups)")
    parser.add_argument("--leaderboard", action="store_true", help=f"resample and break ties as the challenge's evaluator does (toolbox {metrics.TOOLBOX_COMMIT}); default: exact geometry")
    parser.add_argument("--scoring", choices=["current", "legacy"], default="current", help="current challenge scoring (default) or the 2025-04 release's")
    parser.add_argument("--crops", default="validate", help="experiment form: validate (default), train, all, or crop ids like 3,4")
    parser.add_argument("--output", default=None, help="folder for scores.json/md/png (default: experiments/<exp>/logs/evaluation[-leaderboard], or <submission>-scores[-leaderboard] beside the submission)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the results table in the experiment README")
    parser.set_defaults(func=run)
