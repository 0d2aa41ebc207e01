import json

import numpy as np
import zarr

from cellmap_repro import tiny_crop
from cellmap_repro.storage import read_levels, sha256_file


def tree_hashes(root):
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_metadata(tiny_dataset):
    raw = tiny_dataset / "recon-1/em/fibsem-uint8"
    levels = read_levels(raw)
    assert [(l.path, l.scale) for l in levels] == [("s0", (8.0,) * 3), ("s1", (16.0,) * 3)]
    assert zarr.open_array(str(raw / "s0"), mode="r").dtype == np.uint8
    attrs = json.loads((raw / ".zattrs").read_text())["multiscales"][0]
    assert attrs["version"] == "0.4" and [a["name"] for a in attrs["axes"]] == ["z", "y", "x"]
    for crop_id, (_, translation, classes) in tiny_crop.CROPS.items():
        crop = tiny_dataset / f"recon-1/labels/groundtruth/crop{crop_id}"
        crop_attrs = json.loads((crop / ".zattrs").read_text())["cellmap"]["annotation"]
        assert sorted(crop_attrs["class_names"]) == sorted(classes)
        for name in classes:
            levels = read_levels(crop / name)
            assert levels[0].scale == (4.0,) * 3 and levels[0].translation == translation
            assert levels[1].translation == tuple(t + 2.0 for t in translation)
            array = zarr.open_array(str(crop / name / "s0"), mode="r")
            annotation = array.attrs["cellmap"]["annotation"]
            assert annotation["class_name"] == name
            assert annotation["complement_counts"]["absent"] == int((array[:] == 0).sum())
        assert (crop / "all" / "s0" / ".zarray").exists()


def test_masking_is_exercised_by_the_crops():
    annotated = {crop: set(classes) for crop, (_, _, classes) in tiny_crop.CROPS.items()}
    assert "nuc" in annotated[1] and "nuc" not in annotated[2]
    assert "ves" in annotated[2] and "ves" not in annotated[1]


def test_generation_is_deterministic(tmp_path):
    a = tiny_crop.write_dataset(tmp_path / "a", seed=5)
    b = tiny_crop.write_dataset(tmp_path / "b", seed=5)
    c = tiny_crop.write_dataset(tmp_path / "c", seed=6)
    assert tree_hashes(a) == tree_hashes(b)
    assert tree_hashes(a) != tree_hashes(c)


def test_labels_are_consistent_with_each_other(tiny_dataset):
    crop = zarr.open_group(str(tiny_dataset / "recon-1/labels/groundtruth/crop3"), mode="r")
    get = lambda name: crop[name]["s0"][:] > 0  # noqa: E731
    assert not np.any(get("ecs") & get("cell"))
    assert np.array_equal(get("mito"), get("mito_mem") | get("mito_lum"))
    assert np.all(get("ecs") | get("cell"))
    assert get("mito").any() and get("nuc").any() and get("ves").any() and get("pm").any()


def test_reading_through_cellmap_data_changes_nothing(fast_experiment, tiny_dataset):
    from cellmap_repro import data
    from cellmap_repro.experiment import load_experiment

    before = tree_hashes(tiny_dataset)
    experiment = load_experiment("fast")
    training = data.build(experiment)
    training.class_weights()
    training.train.read(0, seed=0)
    training.validate.read(0, seed=0)
    assert tree_hashes(tiny_dataset) == before
