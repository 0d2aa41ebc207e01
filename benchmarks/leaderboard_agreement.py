"""Compare `evaluate --submission` (exact and --leaderboard) with the toolbox's own evaluator.

Usage: PYTHONPATH=<toolbox>/src:<its extra deps> .venv/bin/python benchmarks/leaderboard_agreement.py
       [--cases 20] [--seed 0] [--ties]

Not a test: it needs the challenge toolbox's source (commit 6b9ad68) and what its evaluator
imports beyond this project's lock (scikit-image, fastremap, universal-pathlib, gitpython,
ortools), and it is slow. Each case writes a ground-truth zarr with two crops (semantic ecs
and pm, instance mito and nuc; random spheres; one crop with a mask) and a submission zip
whose predictions are perturbed and stored at the truth's voxel size, half or twice it, at
translations on the crop's lattice, at half voxels or off it, sometimes without a
translation, nested in a folder or without the "crop" prefix. The toolbox scores a copy
(it unzips and renames in place); the crops are added to its test-crop table, which it
reads the target grid from. Prints per-class and overall differences and the times (exact
mode: per class only, as it does not score the mask as a class).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

SEMANTIC, INSTANCE = ["ecs", "pm"], ["mito", "nuc"]


def spheres(rng, shape, count, radius=(2, 6)) -> np.ndarray:
    volume = np.zeros(shape, np.uint32)
    grid = np.indices(shape)
    for label in range(1, count + 1):
        centre = [rng.uniform(0, s) for s in shape]
        r = rng.uniform(*radius)
        volume[sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r] = label
    return volume


def perturb(rng, truth: np.ndarray, instance: bool) -> np.ndarray:
    pred = np.roll(truth, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
    ids = np.unique(pred[pred > 0])
    if len(ids) and rng.random() < 0.5:
        pred[pred == rng.choice(ids)] = 0  # one object missed
    if rng.random() < 0.5:
        pred |= spheres(rng, truth.shape, 1, (1, 3)) * (int(pred.max()) + 1)  # one spurious
    return pred if instance else (pred > 0).astype(np.uint8)


def to_voxel_size(pred: np.ndarray, factor: float, instance: bool) -> np.ndarray:
    """The prediction at ``factor`` × the truth's voxel size (nearest up, block max down)."""
    if factor == 1:
        return pred
    if factor < 1:
        k = int(round(1 / factor))
        return pred.repeat(k, 0).repeat(k, 1).repeat(k, 2)
    k = int(factor)
    shape = [s // k * k for s in pred.shape]
    blocks = pred[: shape[0], : shape[1], : shape[2]].reshape(shape[0] // k, k, shape[1] // k, k, shape[2] // k, k)
    return blocks.max(axis=(1, 3, 5))


def write_case(rng, root: Path):
    """Truth zarr and submission zip of one case; returns (truth, zip, crops table rows)."""
    import zarr

    truth_root = zarr.open_group(str(root / "truth.zarr"), mode="w")
    sub_dir = root / "made"
    prefix = "" if rng.random() < 0.25 else "crop"
    rows = []
    for crop_id in (9001, 9002):
        shape = tuple(int(s) for s in rng.integers(20, 33, 3))
        voxel = float(rng.choice([2.0, 4.0]))
        translation = tuple(float(v) for v in (rng.integers(100, 200, 3) * voxel + rng.choice([0.0, voxel / 2])))
        crop = truth_root.require_group(f"crop{crop_id}")
        for name in SEMANTIC + INSTANCE:
            instance = name in INSTANCE
            truth = spheres(rng, shape, int(rng.integers(1, 7)))
            truth = truth if instance else (truth > 0).astype(np.uint8)
            array = crop.create_dataset(name, data=truth)
            array.attrs.update({"voxel_size": [voxel] * 3, "translation": list(translation), "shape": list(shape)})
            rows.append((crop_id, name, (voxel,) * 3, translation, shape))
            if crop_id == 9002 and name == "pm":
                mask = np.zeros(shape, np.uint8)
                mask[: shape[0] // 2] = 1
                # the toolbox reads voxel_size from every array of a truth crop, masks included
                crop.create_dataset("pm_mask", data=mask).attrs.update(array.attrs.asdict())
            if rng.random() < 0.1:
                continue  # not submitted
            factor = float(rng.choice([1.0, 0.5, 2.0]))
            pred = to_voxel_size(perturb(rng, truth, instance), factor, instance)
            size = voxel * factor
            # where the prediction's voxel 0 sits: the crop's box corner (exact), or off by a
            # fraction of a voxel (the toolbox snaps it)
            corner = np.asarray(translation) - voxel / 2
            offset = float(rng.choice([0.0, 0.0, 0.5, 0.25, -0.5])) * size
            attrs = {"voxel_size": [size] * 3, "translation": list(corner + size / 2 + offset)}
            if rng.random() < 0.1:
                del attrs["translation"]
            out = zarr.open_array(str(sub_dir / f"{prefix}{crop_id}" / name), mode="w", shape=pred.shape, dtype=pred.dtype, chunks=(16, 16, 16))
            out[:] = pred
            out.attrs.update(attrs)
    inside = "nested/submission.zarr/" if rng.random() < 0.3 else ""
    with zipfile.ZipFile(root / "submission.zip", "w") as archive:
        for file in sorted(sub_dir.rglob("*")):
            if file.is_file():
                archive.write(file, inside + file.relative_to(sub_dir).as_posix())
    return root / "truth.zarr", root / "submission.zip", rows


def write_ties(rng, root: Path):
    """A crop whose instance matching has exactly tied optima, so the solver decides.

    A row of 2×2×4 truth boxes; predicted boxes of the same size straddle each pair of
    neighbours, overlapping both by half (equal IoU), and one or two stray voxels add
    components whose ids (kept when unmatched, as the toolbox keeps them) make the
    Hausdorff scores depend on which tied matching is chosen.
    """
    import zarr

    count, gap, extra = int(rng.integers(2, 5)), int(rng.integers(0, 2)), int(rng.integers(0, 2))
    shape = (10, 10, count * (4 + gap) + 8)
    truth = np.zeros(shape, np.uint32)
    pred = np.zeros(shape, np.uint32)
    for i in range(count):
        x = 2 + i * (4 + gap)
        truth[2:4, 2:4, x : x + 4] = i + 1
    for j in range(count - 1 + extra):
        x = 4 + j * (4 + gap)
        pred[2:4, 2:4, x : x + 4] = 1 + j % 2  # alternate ids: touching boxes stay apart
    for _ in range(int(rng.integers(1, 3))):
        pred[rng.integers(0, shape[0]), rng.integers(5, shape[1]), rng.integers(0, shape[2])] = 3
    attrs = {"voxel_size": [4.0] * 3, "translation": [2.0] * 3, "shape": list(shape)}
    zarr.open_group(str(root / "truth.zarr"), mode="w").require_group("crop9101").create_dataset("mito", data=truth).attrs.update(attrs)
    zarr.open_group(str(root / "made"), mode="w").require_group("crop9101").create_dataset("mito", data=pred).attrs.update(attrs)
    with zipfile.ZipFile(root / "submission.zip", "w") as archive:
        for file in sorted((root / "made").rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(root / "made").as_posix())
    return root / "truth.zarr", root / "submission.zip", [(9101, "mito", (4.0,) * 3, (2.0,) * 3, shape)]


def toolbox_scores(truth: Path, submission: Path, rows, scratch: Path) -> dict:
    from cellmap_segmentation_challenge.evaluate import score_submission
    from cellmap_segmentation_challenge.utils.crops import TEST_CROPS_DICT, TestCropRow

    for crop_id, name, voxel, translation, shape in rows:
        TEST_CROPS_DICT[crop_id, name] = TestCropRow(crop_id, "jrc_x", name, voxel, translation, shape)
    work = scratch / "toolbox"
    shutil.copytree(truth, work / "truth.zarr")
    shutil.copy(submission, work / "submission.zip")
    scores = score_submission(str(work / "submission.zip"), str(work / "result.json"), str(work / "truth.zarr"))
    return {
        "overall": scores["overall_score"],
        **{label: s.get("iou", s.get("combined_score")) for label, s in scores["label_scores"].items()},
    }


def our_scores(truth: Path, submission: Path, scratch: Path, leaderboard: bool) -> dict:
    from cellmap_repro.evaluate import evaluate_submission

    result = evaluate_submission(submission, truth, scratch / f"ours-{leaderboard}", leaderboard=leaderboard, progress=False)
    return {"overall": result["overall_score"], **{name: c["score"] for name, c in result["classes"].items()}}


def main() -> None:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ties", action="store_true", help="score the tied-matching crops instead of random cases")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    rng = np.random.default_rng(args.seed)
    worst = {"leaderboard": 0.0, "exact": 0.0}
    differing = {"leaderboard": 0, "exact": 0}
    seconds = {"toolbox": 0.0, "leaderboard": 0.0, "exact": 0.0}
    for case in range(args.cases):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            truth, submission, rows = write_ties(rng, scratch) if args.ties else write_case(rng, scratch)
            start = time.perf_counter()
            reference = toolbox_scores(truth, submission, rows, scratch)
            seconds["toolbox"] += time.perf_counter() - start
            for mode in ("leaderboard", "exact"):
                start = time.perf_counter()
                ours = our_scores(truth, submission, scratch, mode == "leaderboard")
                seconds[mode] += time.perf_counter() - start
                if mode == "leaderboard":
                    assert set(ours) == set(reference), (mode, sorted(ours), sorted(reference))
                # exact mode does not score masks as classes, so its overall differs by design
                shared = [k for k in reference if k in ours and (mode == "leaderboard" or k != "overall")]
                gaps = {k: abs((ours[k] or 0.0) - (reference[k] or 0.0)) for k in shared}
                worst[mode] = max(worst[mode], max(gaps.values()))
                if max(gaps.values()) > 1e-9:
                    differing[mode] += 1
                    print(f"case {case} {mode}: " + ", ".join(f"{k} {ours[k]:.4f} vs {reference[k]:.4f}" for k, g in gaps.items() if g > 1e-9))
    for mode in ("leaderboard", "exact"):
        print(f"{mode}: {differing[mode]}/{args.cases} cases differ from the toolbox by > 1e-9; largest difference {worst[mode]:.3g}")
    print("seconds in all: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
