"""evaluate on hand-made processed outputs in the documented layout, and on submissions against a truth zarr."""

import hashlib
import json
import os
import posixpath
import shutil
import zipfile

import numpy as np
import pytest
import zarr

from cellmap_repro.errors import ReproError
from cellmap_repro.evaluate import evaluate_experiment, evaluate_submission, update_readme
from cellmap_repro.storage import ScaleLevel, multiscale_attrs, read_levels


def write_processed(processed_root, dataset_container, crop_id, classes, transform=lambda name, a: a):
    source = dataset_container / f"recon-1/labels/groundtruth/crop{crop_id}"
    target = processed_root / "jrc_tiny-1.zarr" / f"crop{crop_id}"
    zarr.open_group(str(processed_root / "jrc_tiny-1.zarr"), mode="a")
    for name in classes:
        levels = read_levels(source / name)
        data = transform(name, zarr.open_array(str(source / name / "s0"), mode="r")[:])
        group = zarr.open_group(str(target / name), mode="a")
        group.attrs.update(multiscale_attrs([levels[0]], name=name))
        group.create_dataset("s0", data=data, overwrite=True)


@pytest.fixture
def evaluated(fast_experiment, tiny_dataset):
    data_root = tiny_dataset.parent.parent / "eval-data"
    shutil.rmtree(data_root, ignore_errors=True)
    return fast_experiment, data_root


def test_perfect_prediction_scores_one(evaluated, tiny_dataset):
    experiment, data_root = evaluated
    classes = ["ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "ves", "mito", "cell"]
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, classes)
    result = evaluate_experiment(experiment, data_root, progress=False)
    assert result["overall_score"] == pytest.approx(1.0)
    assert set(result["classes"]) == set(classes)
    assert result["classes"]["mito"]["type"] == "instance" and result["classes"]["mito"]["f1"] == 1.0
    out = experiment / "logs" / "evaluation"
    saved = json.loads((out / "scores.json").read_text())
    assert saved["overall_score"] == pytest.approx(1.0) and len(saved["per_crop"]) == len(classes)
    assert "| mito | instance | 1.0000 |" in (out / "scores.md").read_text()
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_class_is_scored_as_not_submitted_and_reported(evaluated, tiny_dataset):
    experiment, data_root = evaluated
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "mito", "cell"])
    result = evaluate_experiment(experiment, data_root, progress=False)
    assert result["classes"]["ves"]["score"] == 0.0
    assert result["classes"]["ves"]["fn"] > 0 and result["classes"]["ves"]["tp"] == 0
    assert any("no prediction for 'ves'" in w for w in result["warnings"])


def test_prediction_at_8nm_is_resampled_to_the_4nm_truth(evaluated, tiny_dataset):
    experiment, data_root = evaluated
    source = tiny_dataset / "recon-1/labels/groundtruth/crop3"
    target = data_root / "processed" / "fast" / "jrc_tiny-1.zarr" / "crop3"
    for name in ["ecs", "cell"]:
        levels = read_levels(source / name)
        group = zarr.open_group(str(target / name), mode="a")
        eight_nm = ScaleLevel("s0", levels[1].scale, levels[1].translation)
        group.attrs.update(multiscale_attrs([eight_nm], name=name))
        group.create_dataset("s0", data=zarr.open_array(str(source / name / "s1"), mode="r")[:], overwrite=True)
    result = evaluate_experiment(experiment, data_root, progress=False)
    # The 4 nm centres sit a quarter of an 8 nm voxel from the nearest 8 nm centres, so
    # trilinear interpolation is, per axis, 0.75 * nearest + 0.25 * next, with 0 beyond the
    # border (skimage's rescale in the toolbox pads with 0 the same way).
    coarse = zarr.open_array(str(source / "ecs" / "s1"), mode="r")[:].astype(float)
    fine = zarr.open_array(str(source / "ecs" / "s0"), mode="r")[:] > 0

    def upsample_axis(a, axis):
        a = np.moveaxis(a, axis, 0)
        before = np.concatenate([np.zeros_like(a[:1]), a[:-1]])
        after = np.concatenate([a[1:], np.zeros_like(a[-1:])])
        out = np.empty((2 * a.shape[0], *a.shape[1:]))
        out[0::2] = 0.75 * a + 0.25 * before
        out[1::2] = 0.75 * a + 0.25 * after
        return np.moveaxis(out, 0, axis)

    upsampled = upsample_axis(upsample_axis(upsample_axis(coarse, 0), 1), 2) > 0.5
    expected = np.count_nonzero(upsampled & fine) / np.count_nonzero(upsampled | fine)
    assert result["classes"]["ecs"]["iou"] == pytest.approx(expected)
    assert 0.5 < expected < 1.0
    assert result["classes"]["cell"]["f1"] == 1.0


def test_legacy_scoring_and_readme_table(evaluated, tiny_dataset, tmp_path):
    experiment, data_root = evaluated
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs", "mito"], transform=lambda n, a: np.zeros_like(a) if n == "mito" else a)
    result = evaluate_experiment(experiment, data_root, scoring="legacy", progress=False)
    assert result["classes"]["ecs"]["score"] == 1.0
    # The release scored an empty instance prediction by voxel accuracy alone (no
    # distances to average: normalised Hausdorff 1), so an empty mito is not 0.
    truth = zarr.open_array(str(tiny_dataset / "recon-1/labels/groundtruth/crop3/mito/s0"), mode="r")[:]
    background = 1 - np.count_nonzero(truth) / truth.size
    assert result["classes"]["mito"]["accuracy"] == pytest.approx(background)
    assert result["classes"]["mito"]["score"] == pytest.approx(background**0.5)
    assert result["classes"]["nuc"]["score"] == 0.0  # not submitted
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    update_readme(readme, result)
    text = readme.read_text()
    assert "old" not in text and "| ecs | semantic | 1.0000 |" in text and text.endswith("tail\n")


def test_uncovered_crop_is_reported_and_an_empty_array_refused(evaluated, tiny_dataset):
    experiment, data_root = evaluated
    processed = data_root / "processed" / "fast"
    # ecs cut to its first half along z: scored (the rest as background) with a warning
    write_processed(processed, tiny_dataset, 3, ["ecs"], transform=lambda name, a: a[: a.shape[0] // 2])
    result = evaluate_experiment(experiment, data_root, progress=False)
    assert any("'ecs' does not cover the whole crop" in w for w in result["warnings"])
    assert 0.0 < result["classes"]["ecs"]["iou"] < 1.0
    write_processed(processed, tiny_dataset, 3, ["ecs"], transform=lambda name, a: a[:0])
    with pytest.raises(ReproError, match=r"crop3/ecs/s0: array has shape \[0, "):
        evaluate_experiment(experiment, data_root, progress=False)


def test_legacy_json_has_no_infinities(evaluated, tiny_dataset):
    experiment, data_root = evaluated
    # one mito object dropped: its truth object has no match, an infinite distance
    def drop_one(name, a):
        if name != "mito":
            return a
        a = a.copy()
        a[a == np.unique(a[a > 0])[0]] = 0
        return a

    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["mito"], transform=drop_one)
    result = evaluate_experiment(experiment, data_root, scoring="legacy", progress=False)
    text = (experiment / "logs" / "evaluation" / "scores.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    mito = json.loads(text)["classes"]["mito"]
    assert mito["hausdorff_distance"] is None and mito["normalized_hausdorff_distance"] == 0.0
    assert result["classes"]["mito"]["score"] == 0.0


# ---------------------------------------------------------------- submissions against a truth zarr


TRUTH_CLASSES = ["ecs", "mito", "nuc"]


def crop_truth(tiny_dataset, name):
    group = tiny_dataset / f"recon-1/labels/groundtruth/crop3/{name}"
    level = read_levels(group)[0]
    return zarr.open_array(str(group / level.path), mode="r")[:], level


@pytest.fixture
def truth_zarr(tiny_dataset, tmp_path):
    """The toolbox's ground-truth layout: crop<id>/<class> arrays with voxel_size/translation."""
    root = zarr.open_group(str(tmp_path / "truth.zarr"), mode="w")
    for name in TRUTH_CLASSES:
        data, level = crop_truth(tiny_dataset, name)
        array = root.require_group("crop3").create_dataset(name, data=data)
        array.attrs.update({"voxel_size": list(level.scale), "translation": list(level.translation), "shape": list(data.shape)})
    return tmp_path / "truth.zarr"


def write_submission(path, arrays, prefix="crop", attrs=lambda name, level: {"voxel_size": list(level.scale), "translation": list(level.translation)}):
    """A submission zarr folder: {class: (data, level)}; no .zgroup files, as hand-made ones often have none."""
    for name, (data, level) in arrays.items():
        array = zarr.open_array(str(path / f"{prefix}3" / name), mode="w", shape=data.shape, dtype=data.dtype, chunks=(48, 48, 48))
        array[:] = data
        array.attrs.update(attrs(name, level))
    return path


def listing(root):
    """Every file under ``root`` with its sha256: to check that reading changed nothing."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def zip_folder(folder, zip_path, inside=""):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, posixpath.join(inside, file.relative_to(folder).as_posix()))
    return zip_path


def test_perfect_submission_zip_scores_one_and_is_read_in_place(truth_zarr, tiny_dataset, tmp_path):
    folder = write_submission(tmp_path / "sub.zarr", {n: crop_truth(tiny_dataset, n) for n in TRUTH_CLASSES})
    sub = zip_folder(folder, tmp_path / "sub.zip")
    before = hashlib.sha256(sub.read_bytes()).hexdigest(), listing(truth_zarr), sorted(os.listdir(tmp_path))
    result = evaluate_submission(sub, truth_zarr, progress=False)
    assert result["overall_score"] == pytest.approx(1.0)
    assert result["mode"] == "exact" and result["toolbox"]["commit"] == "6b9ad68"
    out = tmp_path / "sub-scores"
    assert json.loads((out / "scores.json").read_text())["classes"]["mito"]["f1"] == 1.0
    assert "| nuc | instance | 1.0000 |" in (out / "scores.md").read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # nothing unzipped beside it, nothing changed in the zip or the truth
    assert (hashlib.sha256(sub.read_bytes()).hexdigest(), listing(truth_zarr)) == before[:2]
    assert sorted(os.listdir(tmp_path)) == sorted(before[2] + ["sub-scores"])


def test_the_toolboxs_input_tolerance(truth_zarr, tiny_dataset, tmp_path):
    """Crop folders without "crop", a zarr nested in the zip, attribute aliases, a missing
    translation, a multiscale group (its closest level picked) and a missing class."""
    ecs, level = crop_truth(tiny_dataset, "ecs")
    mito, mito_level = crop_truth(tiny_dataset, "mito")
    folder = write_submission(tmp_path / "made", {"ecs": (ecs, level), "mito": (mito, mito_level)}, prefix="",
                              attrs=lambda name, lv: {"resolution": list(lv.scale), "offset": list(lv.translation)} if name == "ecs" else {"voxel_size": list(lv.scale)})
    # nuc as an OME-NGFF group: s0 at 2 nm (a decoy), s1 at the crop's 4 nm; the 4 nm level is picked
    nuc, nuc_level = crop_truth(tiny_dataset, "nuc")
    group = zarr.open_group(str(folder / "3" / "nuc"), mode="w")
    decoy = ScaleLevel("s0", (2.0, 2.0, 2.0), tuple(t - 1 for t in nuc_level.translation))
    group.attrs.update(multiscale_attrs([decoy, ScaleLevel("s1", nuc_level.scale, nuc_level.translation)]))
    group.create_dataset("s0", data=np.zeros((8, 8, 8), np.uint8))
    group.create_dataset("s1", data=nuc)
    sub = zip_folder(folder, tmp_path / "nested.zip", inside="outer/my_submission.zarr")
    result = evaluate_submission(sub, truth_zarr, tmp_path / "out", progress=False)
    assert result["classes"]["ecs"]["iou"] == 1.0  # resolution/offset aliases
    assert result["classes"]["mito"]["f1"] == 1.0  # no translation: starts where the crop starts
    assert result["classes"]["nuc"]["f1"] == 1.0  # the 4 nm level of the group
    warnings = "\n".join(result["warnings"])
    assert "outer/my_submission.zarr" in warnings and "without the 'crop' prefix" in warnings
    assert "'mito': no translation" in warnings and "'nuc' is a group, not an array" in warnings
    # the leaderboard lists arrays only: the group is not submitted there
    board = evaluate_submission(sub, truth_zarr, tmp_path / "out-board", leaderboard=True, progress=False)
    assert board["classes"]["nuc"]["score"] == 0.0 and board["classes"]["nuc"]["fn"] > 0
    assert board["classes"]["ecs"]["iou"] == 1.0 and board["classes"]["mito"]["f1"] == 1.0


def test_unsafe_or_broken_submissions_are_refused(truth_zarr, tmp_path):
    for name, member in [("up.zip", "../escape/.zarray"), ("abs.zip", "/etc/crop3/ecs/.zarray")]:
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr(member, "{}")
        with pytest.raises(ReproError, match="points outside the archive"):
            evaluate_submission(tmp_path / name, truth_zarr, tmp_path / "out", progress=False)
    link = zipfile.ZipInfo("crop3/ecs")
    link.external_attr = (0o120777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ReproError, match="symbolic link"):
        evaluate_submission(tmp_path / "link.zip", truth_zarr, tmp_path / "out", progress=False)
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ReproError, match="neither a zip file nor a zarr folder|corrupt zip"):
        evaluate_submission(tmp_path / "junk.zip", truth_zarr, tmp_path / "out", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").mkdir()
    with pytest.raises(ReproError, match="no submitted crop matches"):
        evaluate_submission(tmp_path / "other", truth_zarr, tmp_path / "out", progress=False)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_leaderboard_floor_snaps_a_shifted_prediction(truth_zarr, tiny_dataset, tmp_path):
    """The crop sits at a half-voxel translation (798 nm at 4 nm). A prediction stored one
    voxel later (translation + 4 nm, data shifted to match) is right where it belongs
    geometrically (only the crop's first plane on each axis is uncovered); the toolbox snaps
    802 nm down to 800, 2 nm from the crop's 798, which truncates to 0 voxels: it does not
    shift the array, so the leaderboard sees the truth moved by one voxel."""
    ecs, level = crop_truth(tiny_dataset, "ecs")
    shifted = np.zeros_like(ecs)
    shifted[:-1, :-1, :-1] = ecs[1:, 1:, 1:]
    moved = ScaleLevel("s0", level.scale, tuple(t + 4 for t in level.translation))
    sub = write_submission(tmp_path / "sub.zarr", {"ecs": (shifted, moved), "mito": crop_truth(tiny_dataset, "mito"), "nuc": crop_truth(tiny_dataset, "nuc")})
    exact = evaluate_submission(sub, truth_zarr, progress=False)
    board = evaluate_submission(sub, truth_zarr, leaderboard=True, progress=False)
    t, p = ecs > 0, shifted > 0
    expected_exact = np.count_nonzero(t[1:, 1:, 1:]) / np.count_nonzero(t)
    expected_board = np.count_nonzero(t & p) / np.count_nonzero(t | p)
    assert exact["classes"]["ecs"]["iou"] == pytest.approx(expected_exact)
    assert board["classes"]["ecs"]["iou"] == pytest.approx(expected_board)
    assert expected_board < expected_exact - 0.05
    assert board["mode"] == "leaderboard" and "resampling and tie-breaking" in board["toolbox"]["follows"]
    assert (tmp_path / "sub-scores" / "scores.json").exists() and (tmp_path / "sub-scores-leaderboard" / "scores.json").exists()


def test_leaderboard_scores_masks_as_classes_and_overall_like_the_toolbox(truth_zarr, tiny_dataset, tmp_path):
    ecs, level = crop_truth(tiny_dataset, "ecs")
    mask = np.zeros(ecs.shape, np.uint8)
    mask[:48] = 1
    zarr.open_group(str(truth_zarr), mode="a")["crop3"].create_dataset("ecs_mask", data=mask)
    sub = write_submission(tmp_path / "sub.zarr", {"ecs": (np.ones_like(ecs), level)})
    exact = evaluate_submission(sub, truth_zarr, progress=False)
    t = ecs[:48] > 0
    assert exact["classes"]["ecs"]["iou"] == pytest.approx(np.count_nonzero(t) / t.size)  # scored inside the mask only
    assert "ecs_mask" not in exact["classes"]
    board = evaluate_submission(sub, truth_zarr, leaderboard=True, progress=False)
    # the toolbox lists ecs_mask as a class; nobody submits it: IoU 0 (every voxel a false negative)
    assert board["classes"]["ecs_mask"]["iou"] == 0.0 and board["classes"]["ecs_mask"]["fn"] == mask.size
    assert board["overall_semantic_score"] == pytest.approx(exact["classes"]["ecs"]["iou"] / 2)
    # mito and nuc not submitted: instance mean 0 in both; the toolbox's overall is √(0 · semantic)
    assert board["overall_score"] == 0.0 and board["overall_instance_score"] == 0.0


def test_cli_scores_a_submission_and_checks_its_flags(truth_zarr, tiny_dataset, tmp_path, capsys):
    from cellmap_repro.cli import main

    sub = write_submission(tmp_path / "sub.zarr", {"ecs": crop_truth(tiny_dataset, "ecs")})
    assert main(["evaluate", "--submission", str(sub), "--truth", str(truth_zarr), "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| ecs | semantic | 1.0000 |" in out and "warning: crop3: no prediction for 'mito'" in out
    assert main(["evaluate", "--submission", str(sub)]) == 2
    assert main(["evaluate", "--submission", str(sub), "--truth", str(truth_zarr), "--leaderboard", "--scoring", "legacy"]) == 2
    assert "cannot be combined with --scoring legacy" in capsys.readouterr().err


def test_the_datasplit_named_in_data_py_is_the_one_read(evaluated, tiny_dataset):
    experiment, data_root = evaluated
    (experiment / "datasplit.csv").rename(experiment / "validation_split.csv")
    with open(experiment / "data.py", "a") as handle:
        handle.write('\ndatasplit_path = "validation_split.csv"\n')
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs"])
    result = evaluate_experiment(experiment, data_root, progress=False)
    assert result["crops"] == [3] and result["classes"]["ecs"]["iou"] == 1.0


def test_experiment_leaderboard_mode_agrees_on_a_pyramid_level(evaluated, tiny_dataset):
    """An 8 nm pyramid level (translation = 4 nm translation + 2 nm) onto its own 4 nm grid:
    the toolbox upsamples without smoothing, and 800 nm snaps to 800, 2 nm from 798, so no
    shift: its voxels are the exact geometry's. Written apart, with the commit it follows."""
    experiment, data_root = evaluated
    source = tiny_dataset / "recon-1/labels/groundtruth/crop3"
    target = data_root / "processed" / "fast" / "jrc_tiny-1.zarr" / "crop3"
    for name in ["ecs", "mito"]:
        levels = read_levels(source / name)
        group = zarr.open_group(str(target / name), mode="a")
        group.attrs.update(multiscale_attrs([ScaleLevel("s0", levels[1].scale, levels[1].translation)], name=name))
        group.create_dataset("s0", data=zarr.open_array(str(source / name / "s1"), mode="r")[:], overwrite=True)
    exact = evaluate_experiment(experiment, data_root, progress=False)
    board = evaluate_experiment(experiment, data_root, progress=False, leaderboard=True)
    assert board["classes"]["ecs"]["iou"] == exact["classes"]["ecs"]["iou"] < 1.0
    assert board["classes"]["mito"]["tp"] == exact["classes"]["mito"]["tp"]
    saved = json.loads((experiment / "logs" / "evaluation-leaderboard" / "scores.json").read_text())
    assert saved["mode"] == "leaderboard" and saved["toolbox"]["commit"] == "6b9ad68"
    assert json.loads((experiment / "logs" / "evaluation" / "scores.json").read_text())["mode"] == "exact"


def test_leaderboard_without_ortools_falls_back_with_one_warning(truth_zarr, tiny_dataset, tmp_path, monkeypatch):
    from cellmap_repro import metrics

    monkeypatch.setattr(metrics, "ortools_version", lambda: None)
    sub = write_submission(tmp_path / "sub.zarr", {n: crop_truth(tiny_dataset, n) for n in TRUTH_CLASSES})
    result = evaluate_submission(sub, truth_zarr, leaderboard=True, progress=False)
    notes = [w for w in result["warnings"] if "OR-Tools is not installed" in w]
    assert len(notes) == 1 and "pip install --no-deps ortools==9.15.6755" in notes[0]
    assert result["matching"].startswith("scipy") and result["overall_score"] == pytest.approx(1.0)
