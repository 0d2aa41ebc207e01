"""pack: the submission zip reopens, matches the manifest, and bad input is refused."""

import zipfile

import numpy as np
import pytest
import zarr

from cellmap_repro.errors import ReproError
from cellmap_repro.pack import pack, read_manifest, validate_submission

from test_evaluate import TRUTH_CLASSES, truth_zarr, write_processed  # noqa: F401 (fixture)

HEADER = "crop_name,dataset,class_label,voxel_size,translation,shape\n"


def manifest(tmp_path, rows):
    path = tmp_path / "test_crop_manifest.csv"
    path.write_text(HEADER + "".join(rows))
    return path


def test_pack_writes_a_valid_submission(tmp_path, tiny_dataset):
    data_root = tmp_path / "data"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs", "mito"])
    path = manifest(tmp_path, [
        "3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n",
        "3,jrc_tiny-1,mito,[8.0;8.0;8.0],[800.0;864.0;816.0],[48;48;48]\n",
    ])
    out, warnings = pack("fast", path, data_root, tmp_path / "submission.zip")
    assert warnings == []
    validate_submission(out, read_manifest(path))
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert ".zgroup" in names and "crop3/ecs/.zarray" in names
    assert all(name == name.strip("/") and not {"", ".", ".."} & set(name.split("/")) for name in names)  # members relative and clean
    root = zarr.open_group(zarr.ZipStore(str(out), mode="r"), mode="r")
    truth = zarr.open_array(str(tiny_dataset / "recon-1/labels/groundtruth/crop3/ecs/s0"), mode="r")[:]
    assert root["crop3/ecs"].dtype == np.uint8
    assert np.array_equal(root["crop3/ecs"][:] > 0, truth > 0)
    assert root["crop3/mito"].shape == (48, 48, 48)
    assert root["crop3/mito"].attrs["voxel_size"] == [8.0, 8.0, 8.0]
    assert root["crop3/mito"][:].max() >= 1


def test_missing_class_and_uncovered_crop_are_refused(tmp_path, tiny_dataset):
    data_root = tmp_path / "data"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs"])
    missing = manifest(tmp_path, ["3,jrc_tiny-1,nuc,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n"])
    with pytest.raises(ReproError, match="no processed prediction for crop 3 class 'nuc'"):
        pack("fast", missing, data_root, tmp_path / "a.zip")
    too_big = manifest(tmp_path, ["3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[200;96;96]\n"])
    with pytest.raises(ReproError, match="not the crop's"):
        pack("fast", too_big, data_root, tmp_path / "b.zip")
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "b.zip").exists()


def test_validate_catches_a_wrong_shape(tmp_path, tiny_dataset):
    data_root = tmp_path / "data"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs"])
    path = manifest(tmp_path, ["3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n"])
    out, _ = pack("fast", path, data_root, tmp_path / "s.zip")
    wrong = read_manifest(manifest(tmp_path, ["3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[90;96;96]\n"]))
    with pytest.raises(ReproError, match="has shape"):
        validate_submission(out, wrong)


def test_allow_missing_packs_what_exists_with_one_warning_per_missing_item(tmp_path, tiny_dataset, capsys):
    from cellmap_repro.cli import main

    data_root = tmp_path / "data"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs"])
    path = manifest(tmp_path, [
        "3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n",
        "3,jrc_tiny-1,nuc,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n",
        "7,jrc_tiny-1,mito,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n",
    ])
    out, warnings = pack("fast", path, data_root, tmp_path / "partial.zip", allow_missing=True)
    assert len(warnings) == 2
    assert "crop 3 class 'nuc'" in warnings[0] and "crop 7 class 'mito'" in warnings[1]
    root = zarr.open_group(zarr.ZipStore(str(out), mode="r"), mode="r")
    assert list(root.group_keys()) == ["crop3"] and list(root["crop3"].array_keys()) == ["ecs"]
    # through the CLI: one warning line each; without the flag the refusal stays
    assert main(["pack", "-e", "fast", "--data", str(data_root), "--manifest", str(path), "--out", str(tmp_path / "cli.zip"), "--allow-missing"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: ") == 2 and "2 item(s) left out" in printed
    assert main(["pack", "-e", "fast", "--data", str(data_root), "--manifest", str(path), "--out", str(tmp_path / "refused.zip")]) == 2
    assert "no processed prediction for crop 3 class 'nuc'" in capsys.readouterr().err
    assert not (tmp_path / "refused.zip").exists()
    nothing = manifest(tmp_path, ["9,jrc_tiny-1,nuc,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n"])
    with pytest.raises(ReproError, match="nothing to pack"):
        pack("fast", nothing, data_root, tmp_path / "empty.zip", allow_missing=True)


def test_a_packed_zip_scores_as_the_processed_predictions_do(tmp_path, tiny_dataset, truth_zarr):
    from cellmap_repro.evaluate import evaluate_submission

    data_root = tmp_path / "data"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, TRUTH_CLASSES)
    rows = "".join(f"3,jrc_tiny-1,{name},[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n" for name in TRUTH_CLASSES)
    out, _ = pack("fast", manifest(tmp_path, [rows]), data_root, tmp_path / "packed.zip")
    for leaderboard in (False, True):
        result = evaluate_submission(out, truth_zarr, tmp_path / f"scores-{leaderboard}", leaderboard=leaderboard, progress=False)
        assert result["overall_score"] == pytest.approx(1.0)
        assert [w for w in result["warnings"] if "OR-Tools" not in w] == []


# --- manifest fields and zarr attributes that would read outside data/processed/<exp> (issue 13)

OUTSIDE_ROWS = {
    "dataset with ..": "3,../../../elsewhere/jrc_tiny-1,ecs,{geometry}",
    "absolute dataset": "3,{elsewhere}/jrc_tiny-1,ecs,{geometry}",
    "class_label with ..": "3,jrc_tiny-1,../../../../../elsewhere/jrc_tiny-1.zarr/crop3/ecs,{geometry}",
    "class_label with backslashes": "3,jrc_tiny-1,..\\..\\..\\..\\..\\elsewhere\\jrc_tiny-1.zarr\\crop3\\ecs,{geometry}",
    "class_label naming a sibling": "3,jrc_tiny-1,nuc/../ecs,{geometry}",
    "class_label with a folder": "3,jrc_tiny-1,ecs/s0,{geometry}",
}


@pytest.mark.parametrize("row", OUTSIDE_ROWS.values(), ids=OUTSIDE_ROWS.keys())
def test_manifest_fields_that_leave_the_processed_folder_are_refused(tmp_path, tiny_dataset, capsys, row):
    from cellmap_repro.cli import main

    data_root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs", "nuc"])
    write_processed(elsewhere, tiny_dataset, 3, ["ecs"])  # a prediction the manifest must not reach
    path = manifest(tmp_path, [row.format(elsewhere=elsewhere, geometry="[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]") + "\n"])
    assert main(["pack", "-e", "fast", "--data", str(data_root), "--manifest", str(path), "--out", str(tmp_path / "s.zip")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{path}: crop 3" in error[0] and "refused" in error[0]
    assert not (tmp_path / "s.zip").exists()


def test_a_level_path_leaving_the_prediction_group_is_refused(tmp_path, tiny_dataset):
    import json

    data_root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_processed(data_root / "processed" / "fast", tiny_dataset, 3, ["ecs"])
    write_processed(elsewhere, tiny_dataset, 3, ["ecs"])
    attrs_file = data_root / "processed/fast/jrc_tiny-1.zarr/crop3/ecs/.zattrs"
    attrs = json.loads(attrs_file.read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "../../../../../../elsewhere/jrc_tiny-1.zarr/crop3/ecs/s0"
    attrs_file.write_text(json.dumps(attrs))
    path = manifest(tmp_path, ["3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n"])
    with pytest.raises(ReproError, match=f"level path in {attrs_file} '../../../../../../elsewhere/.*' is not a path inside"):
        pack("fast", path, data_root, tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()
