"""`cellmap-repro evaluate`: challenge scores of processed predictions on validation crops.

For every crop of the experiment's datasplit (validation crops by default) and every
class annotated there, the processed prediction is resampled onto the ground truth's grid
and scored with the challenge's metrics (``metrics.py``; ``--scoring legacy`` for the
2025-04 release the baseline's figures used). A class or crop without a prediction is
scored as not submitted, as the challenge does, and reported. Writes
``experiments/<exp>/logs/evaluation/scores.json`` (every per-crop and per-class figure),
``scores.md`` (a table per class) and ``scores.png`` (per-class bar plot).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np

from cellmap_repro import metrics, settings
from cellmap_repro.classes import class_table
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import atomic_output_path, atomic_write_json, atomic_write_text, read_levels

RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"


def _read_level(group: Path, where: str):
    import zarr

    levels = read_levels(group, where=where)
    array = zarr.open_array(str(group / levels[0].path), mode="r")[:]
    if array.size == 0 or array.ndim != len(levels[0].scale):
        raise ReproError(f"{where}: array {group / levels[0].path} has shape {list(array.shape)}, expected a non-empty {len(levels[0].scale)}-d volume")
    return array, levels[0]


def _finite_or_none(value):
    """JSON has no infinity: infinite distances (an object with no counterpart) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _select(rows, crops: str):
    if crops in ("validate", "train"):
        chosen = [r for r in rows if r.usage == crops]
    elif crops == "all":
        chosen = list(rows)
    else:
        wanted = {int(c) for c in crops.split(",") if c.strip().isdigit()}
        chosen = [r for r in rows if r.crop_id in wanted]
    if not chosen:
        raise ReproError(f"no '{crops}' crops in the datasplit to evaluate")
    return chosen


def evaluate_experiment(experiment_dir: Path, data_root: Path | None = None, scoring: str = "current", crops: str = "validate", progress: bool = True) -> dict:
    from tqdm import tqdm

    from cellmap_repro.datasplit import read_datasplit

    experiment_dir = Path(experiment_dir)
    experiment = experiment_dir.name
    data = settings.data_root(data_root)
    rows = _select(read_datasplit(experiment_dir / "datasplit.csv"), crops)
    processed_root = settings.processed_root(data, experiment)
    if not processed_root.exists():
        raise ReproError(f"no processed predictions under {processed_root} (run predict and process for {experiment} first)")
    table = class_table()
    per_crop: list[dict] = []
    warnings: list[str] = []
    jobs = [(row, name) for row in rows for name in row.classes]
    for row, name in tqdm(jobs, desc=f"evaluate {experiment}", unit="class", disable=not progress):
        truth, truth_level = _read_level(row.label_group(name), f"ground truth {name} of crop {row.crop_id}")
        mask_group = row.crop_group / f"{name}_mask"
        prediction_group = processed_root / f"{row.dataset}.zarr" / f"crop{row.crop_id}" / name
        instance = table[name].instance
        if prediction_group.exists():
            pred, level = _read_level(prediction_group, f"prediction {name} of crop {row.crop_id}")
            if not metrics.covers(level.scale, level.translation, pred.shape, truth_level.scale, truth_level.translation, truth.shape):
                warnings.append(f"crop {row.crop_id}: prediction for '{name}' does not cover the whole crop ({prediction_group}); the rest is scored as background")
            pred = metrics.resample_to(pred, level.scale, level.translation, truth.shape, truth_level.scale, truth_level.translation, instance)
        else:
            pred = None
            warnings.append(f"crop {row.crop_id}: no prediction for '{name}' ({prediction_group}); scored as not submitted")
        if mask_group.exists():
            mask, _ = _read_level(mask_group, f"mask {name} of crop {row.crop_id}")
            truth = truth * (mask > 0)
            pred = pred * (mask > 0) if pred is not None else None
        entry = {"crop": row.crop_id, "dataset": row.dataset, "class": name, "type": "instance" if instance else "semantic", "voxel_size": list(truth_level.scale), "voxels": int(truth.size), "truth_voxels": int(np.count_nonzero(truth)), "submitted": pred is not None}
        if scoring == "legacy":
            entry.update(metrics.legacy_instance(truth, pred, truth_level.scale) if instance else metrics.legacy_semantic(truth, pred))
        elif instance:
            counts = metrics.instance_counts(truth, pred, truth_level.scale)
            entry.update({"tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "distances_nm": counts.distances, "distance_scores": counts.distance_scores, "skipped": counts.skipped})
            if counts.skipped and pred is not None:
                warnings.append(f"crop {row.crop_id}: '{name}' left out of the pooled counts, as the challenge does: {counts.skipped}")
        else:
            counts = metrics.semantic_counts(truth, pred)
            entry.update({"tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "iou": counts.iou, "dice": counts.dice})
        per_crop.append(entry)
    per_class = _aggregate(per_crop, scoring)
    summary = metrics.overall(
        [c["score"] for c in per_class.values() if c["type"] == "instance"],
        [c["score"] for c in per_class.values() if c["type"] == "semantic"],
    )
    result = {"experiment": experiment, "scoring": scoring, "crops": sorted({r.crop_id for r in rows}), **summary, "classes": per_class, "per_crop": per_crop, "warnings": warnings}
    result = _finite_or_none(result)
    out_dir = experiment_dir / "logs" / "evaluation"
    write_outputs(result, out_dir)
    result["output_dir"] = str(out_dir)
    return result


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
    lines = [
        f"Overall {_fmt(result['overall_score'])} (instance {_fmt(result['overall_instance_score'])}, semantic {_fmt(result['overall_semantic_score'])}); "
        f"{result['scoring']} scoring, crops {', '.join(str(c) for c in result['crops'])}",
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
    axis.set_title(f"{result['experiment']}: overall {_fmt(result['overall_score'])} (blue semantic IoU, orange instance combined)", fontsize=9)
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

    directory = experiment_dir(args.experiment, args.experiments_root)
    result = evaluate_experiment(directory, args.data, args.scoring, args.crops)
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(markdown_table(result))
    if args.update_readme:
        update_readme(directory / "README.md", result)
        print(f"updated {directory / 'README.md'}")
    print(f"scores: {result['output_dir']}/scores.json, scores.md, scores.png")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score processed predictions with the challenge metrics", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    parser.add_argument("--scoring", choices=["current", "legacy"], default="current", help="current challenge scoring (default) or the 2025-04 release's")
    parser.add_argument("--crops", default="validate", help="validate (default), train, all, or crop ids like 3,4")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the results table in the experiment README")
    parser.set_defaults(func=run)
