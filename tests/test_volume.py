"""Whole-volume predict and process on daisy: equal to the crop path, resumable, merged across blocks."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellmap_repro import cli, predict, process, train, volume
from cellmap_repro.errors import ReproError
from cellmap_repro.storage import ScaleLevel, multiscale_attrs, read_levels

CROP3_ROI = "796:1180,860:1244,812:1196"  # crop 3's box: its 8 nm grid is raw voxels 100:148, 108:156, 102:150


def fails_with_one_line(capsys, *argv) -> str:
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # a flag argparse refused
        status = exc.code
    assert status == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err  # may hold progress bars before the error
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("cellmap-repro: error: ") and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_volume_predict_equals_crop_predict(fast_experiment, tiny_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    line = fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--roi", CROP3_ROI)
    assert "checkpoint 'latest' not found" in line
    line = fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--workers", "2")
    assert "--workers apply to whole volumes: add --roi and/or --dataset" in line
    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    crop = predict.predict("fast", data_root=data, crops="3", progress=False) / "jrc_tiny-1.zarr" / "crop3"

    line = fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--roi", "0:1000,0:1000,1000:2100")
    assert "reaches outside the raw of jrc_tiny-1, which covers -4:2044,-4:2044,-4:2044 nm" in line
    line = fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--dataset", "jrc_nowhere-1")
    assert "dataset 'jrc_nowhere-1': no raw array at" in line
    assert fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--roi", "1:2,3:4").endswith("got '1:2,3:4'")
    assert not (data / "predictions" / "fast" / "jrc_nowhere-1.zarr").exists()

    line = fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--roi", CROP3_ROI, "--workers", "0")
    assert "argument --workers: must be a whole number >= 1, got '0'" in line
    line = fails_with_one_line(capsys, "predict", "-e", "fast", "--data", str(data), "--roi", CROP3_ROI, "--block-tiles", "0")
    assert "argument --block-tiles: must be a whole number >= 1, got '0'" in line

    # The same raw under another name, found through the data-root layout; two workers,
    # one block per tile (2x2x2 blocks), as CELLMAP_REPRO_THREADS=1 (the fixture's) crop
    # prediction ran. Raw chunk 1/1/1 (voxels 64:128) is read by block (0, 0, 0) only: with
    # it corrupt, that block fails and the seven others finish, as a run killed part-way.
    copy = data / "jrc_copy-1" / "jrc_copy-1.zarr"
    shutil.copytree(tiny_dataset, copy)
    chunk = copy / "recon-1" / "em" / "fibsem-uint8" / "s0" / "1" / "1" / "1"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a blosc frame")
    argv = ["predict", "-e", "fast", "--data", str(data), "--roi", CROP3_ROI, "--dataset", "jrc_copy-1", "--workers", "2", "--block-tiles", "1"]
    line = fails_with_one_line(capsys, *argv)
    assert "predict: 1 of 8 blocks failed (worker logs: " in line and "run the same command again" in line
    final = data / "predictions" / "fast" / "jrc_copy-1.zarr" / "roi_796-1180_860-1244_812-1196"
    partial = final.with_name(final.name + ".partial")
    assert partial.exists() and not final.exists(), "an interrupted volume is never presented as complete"
    done = {p.relative_to(partial / "mito" / "s0"): p.stat().st_mtime_ns for p in (partial / "mito" / "s0").glob("*/*/*")}
    assert len(done) == 7 and Path("0/0/0") not in done

    chunk.write_bytes(good)
    assert cli.main(argv) == 0
    assert not partial.exists()
    assert all((final / "mito" / "s0" / p).stat().st_mtime_ns == t for p, t in done.items()), "finished blocks are not predicted again"
    for name in ("ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "ves", "golgi", "mito", "cell"):
        blockwise = zarr.open_array(str(final / name / "s0"), mode="r")
        assert blockwise.chunks == (32, 32, 32), "one chunk per block: no two workers write the same chunk"
        assert np.array_equal(blockwise[:], zarr.open_array(str(crop / name / "s0"), mode="r")[:]), f"{name} differs from crop predict"
        assert read_levels(final / name) == read_levels(crop / name)
    assert sorted(p.name for p in final.iterdir() if p.name.startswith(".")) == [".zattrs", ".zgroup"], "no scratch left"

    # Killed after the last block but before the rename: the rerun only renames.
    final.rename(partial)
    before = (partial / "mito" / "s0" / ".zarray").stat().st_mtime_ns
    assert volume.predict_volume("fast", data_root=data, roi=CROP3_ROI, dataset="jrc_copy-1", workers=2, block_tiles=1, progress=False) == final
    assert (final / "mito" / "s0" / ".zarray").stat().st_mtime_ns == before and not partial.exists()
    assert "up to date, skipped" in capsys.readouterr().out
    volume.predict_volume("fast", data_root=data, roi=CROP3_ROI, dataset="jrc_copy-1", workers=2, block_tiles=1, progress=False)
    assert (final / "mito" / "s0" / ".zarray").stat().st_mtime_ns == before
    assert "up to date, skipped" in capsys.readouterr().out


def synthetic_logits(shape=(24, 20, 20), seed=3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mito = np.where(rng.random(shape) < 0.06, 1.0, -1.0).astype(np.float32)  # small clusters, many across borders
    mito[3, 3, :] = 1.0  # a rod through two block borders along x
    mito[5:8, 7, 7] = 1.0  # touches the next one only at a block corner (26-connected)
    mito[8:11, 8, 8] = 1.0
    return {"ecs": rng.normal(size=shape).astype(np.float32), "mito": mito}


def write_volume_prediction(folder, logits: dict[str, np.ndarray], block) -> None:
    group = zarr.open_group(str(folder), mode="w")
    shape = next(iter(logits.values())).shape
    group.attrs[volume.ATTRS_KEY] = {"shape": list(shape), "block": list(block)}
    for name, values in logits.items():
        sub = group.create_group(name)
        sub.attrs.update(multiscale_attrs([ScaleLevel("s0", (8.0,) * 3, (4.0,) * 3)], name=name))
        sub.create_dataset("s0", data=values, chunks=block, dimension_separator="/")


def test_blockwise_process_labels_across_block_borders_and_resumes(fast_experiment, tmp_path, capsys):
    with open(fast_experiment / "process_config.py", "a") as config:
        config.write("min_instance_size = 3\n")
    data = tmp_path / "data"
    logits = synthetic_logits()
    source = data / "predictions" / "fast" / "jrc_synth-1.zarr" / "roi_all"
    write_volume_prediction(source, logits, block=(8, 8, 8))
    marks = tmp_path / "launched"
    argv = ["process", "-e", "fast", "--data", str(data), "--dataset", "jrc_synth-1", "--workers", "2"]
    argv_launched = [*argv, "--launcher", f"sh -c 'echo x >> {marks}; exec \"$@\"' launcher"]

    # One corrupt chunk of logits: its block fails, the other 26 are labelled and kept.
    chunk = source / "mito" / "s0" / "1" / "1" / "1"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a blosc frame")
    line = fails_with_one_line(capsys, *argv_launched)
    assert "label: 1 of 27 blocks failed (worker logs: " in line and "run the same command again" in line
    out = data / "processed" / "fast" / "jrc_synth-1.zarr" / "roi_all"
    partial = out.with_name("roi_all.partial")
    assert partial.exists() and not out.exists(), "an interrupted volume is never presented as complete"
    assert 1 <= len(marks.read_text().splitlines()) <= 2, "workers started through the launcher"
    assert len(list((partial / volume.SCRATCH / "stats").glob("*.npz"))) == 26
    done = {p: p.stat().st_mtime_ns for p in (partial / "ecs" / "s0").glob("*/*/*") if p.relative_to(partial / "ecs" / "s0") != Path("1/1/1")}
    assert len(done) == 26

    chunk.write_bytes(good)
    assert cli.main(argv) == 0
    assert not partial.exists()
    assert all((out / p.relative_to(partial)).stat().st_mtime_ns == t for p, t in done.items()), "finished blocks are not labelled again"
    ecs = zarr.open_array(str(out / "ecs" / "s0"), mode="r")[:]
    mito = zarr.open_array(str(out / "mito" / "s0"), mode="r")[:]
    assert ecs.dtype == np.uint8 and mito.dtype == np.uint64
    assert np.array_equal(ecs, process.process_volume(logits["ecs"], 0.0, False))
    whole = process.process_volume(logits["mito"], 0.0, True, connectivity=26, min_size=3)
    assert np.array_equal(mito, whole), "ids equal labelling the whole array at once, numbering included"
    rod = np.unique(mito[3, 3, :])
    assert len(rod) == 1 and rod[0] > 0, "a component crossing block borders has one id"
    assert mito[7, 7, 7] == mito[8, 8, 8] > 0, "a contact at a block corner joins two fragments"
    assert mito.max() > 5 and len(np.unique(mito)) == mito.max() + 1
    assert read_levels(out / "mito") == read_levels(source / "mito")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".zattrs", ".zgroup"], "no scratch left"


def test_blockwise_process_needs_a_finished_prediction(fast_experiment, tmp_path, capsys):
    data = tmp_path / "data"
    line = fails_with_one_line(capsys, "process", "-e", "fast", "--data", str(data), "--dataset", "jrc_synth-1", "--roi", "0:64,0:64,0:64")
    assert "the prediction of jrc_synth-1 roi_0-64_0-64_0-64 does not exist" in line
    (data / "predictions" / "fast" / "jrc_synth-1.zarr" / "roi_0-64_0-64_0-64.partial").mkdir(parents=True)
    line = fails_with_one_line(capsys, "process", "-e", "fast", "--data", str(data), "--dataset", "jrc_synth-1", "--roi", "0:64,0:64,0:64")
    assert "is incomplete (run the same predict command again" in line
    line = fails_with_one_line(capsys, "process", "-e", "fast", "--data", str(data), "--dataset", "../jrc_synth-1")
    assert "--dataset '../jrc_synth-1' is not a" in line and line.endswith("; refused")


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_touching_pairs_follow_the_connectivity(connectivity):
    fragments = np.zeros((2, 2, 2), np.uint64)
    fragments[0, 0, 0], fragments[1, 0, 0], fragments[1, 1, 0], fragments[1, 1, 1] = 1, 2, 3, 4
    pairs = {tuple(p) for p in volume.touching_pairs(fragments, connectivity).tolist()}
    face, edge, corner = {(1, 2), (2, 3), (3, 4)}, {(1, 3), (2, 4)}, {(1, 4)}
    assert pairs == {6: face, 18: face | edge, 26: face | edge | corner}[connectivity]


def test_roi_names_and_malformed_rois():
    assert volume.parse_roi("0:2048,0:2048,-8:12.5") == ((0, 2048), (0, 2048), (-8, 12.5))
    assert volume.roi_name(volume.parse_roi("0:2048,0:2048,-8:12.5")) == "roi_0-2048_0-2048_m8-12.5"
    for bad in ("0:10,0:10", "0:10,0:10,a:b", "0:10,0:10,5:5", "0:10,0:10,0-10"):
        with pytest.raises(ReproError, match="--roi must be z0:z1,y0:y1,x0:x1"):
            volume.parse_roi(bad)
