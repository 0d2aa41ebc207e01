"""evaluate on hand-made processed outputs in the documented layout."""

import json
import shutil

import numpy as np
import pytest
import zarr

from cellmap_repro.evaluate import evaluate_experiment, update_readme
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
    from cellmap_repro.errors import ReproError

    experiment, data_root = evaluated
    processed = data_root / "processed" / "fast"
    # ecs cut to its first half along z: scored (the rest as background) with a warning
    write_processed(processed, tiny_dataset, 3, ["ecs"], transform=lambda name, a: a[: a.shape[0] // 2])
    result = evaluate_experiment(experiment, data_root, progress=False)
    assert any("'ecs' does not cover the whole crop" in w for w in result["warnings"])
    assert 0.0 < result["classes"]["ecs"]["iou"] < 1.0
    write_processed(processed, tiny_dataset, 3, ["ecs"], transform=lambda name, a: a[:0])
    with pytest.raises(ReproError, match=r"prediction ecs of crop 3: array .*ecs/s0 has shape \[0, "):
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
