"""predict and process on the fast experiment: test-crop manifests, resume, skip when up to date."""

import re
import shutil

import numpy as np
import pytest
import zarr

from cellmap_repro import predict, process, train
from cellmap_repro.storage import read_levels


def test_predict_test_manifest_then_process(fast_experiment, tiny_dataset, tmp_path):
    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    data = tmp_path / "data"
    (data / "jrc_tiny-1").mkdir(parents=True)
    (data / "jrc_tiny-1" / "jrc_tiny-1.zarr").symlink_to(tiny_dataset)
    manifest = tmp_path / "test_crop_manifest.csv"
    manifest.write_text(
        "crop_name,dataset,class_label,voxel_size,translation,shape\n"
        "3,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n"
        "3,jrc_tiny-1,mito,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]\n"
    )
    out = predict.predict("fast", data_root=data, test_manifest=manifest, progress=False)
    crop = out / "jrc_tiny-1.zarr" / "crop3"
    logits = zarr.open_array(str(crop / "mito" / "s0"), mode="r")
    assert logits.shape == (48, 48, 48) and logits.dtype == np.float32
    (level,) = read_levels(crop / "mito")
    assert level.translation == (800.0, 864.0, 816.0) and level.scale == (8.0, 8.0, 8.0)
    assert np.isfinite(logits[:]).all() and logits[:].std() > 0, "every tile was written"
    # a second run finds the crop up to date and leaves it untouched
    before = (crop / "mito" / "s0" / ".zarray").stat().st_mtime_ns
    predict.predict("fast", data_root=data, test_manifest=manifest, progress=False)
    assert (crop / "mito" / "s0" / ".zarray").stat().st_mtime_ns == before
    processed = process.process("fast", data_root=data, progress=False)
    mito = zarr.open_array(str(processed / "jrc_tiny-1.zarr" / "crop3" / "mito" / "s0"), mode="r")
    ecs = zarr.open_array(str(processed / "jrc_tiny-1.zarr" / "crop3" / "ecs" / "s0"), mode="r")
    assert mito.dtype == np.uint64 and ecs.dtype == np.uint8
    assert np.array_equal(ecs[:] > 0, zarr.open_array(str(crop / "ecs" / "s0"), mode="r")[:] > 0)


def test_interrupted_prediction_resumes_tile_by_tile(fast_experiment, tiny_dataset, tmp_path, monkeypatch):
    import torch

    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    data = tmp_path / "data"
    reference = predict.predict("fast", data_root=data, max_input=24, progress=False)
    crop = reference / "jrc_tiny-1.zarr" / "crop3"
    expected = zarr.open_array(str(crop / "mito" / "s0"), mode="r")[:]
    shutil.rmtree(crop)  # predict it again from nothing

    calls = []
    original_forward = torch.nn.Sequential.forward

    def failing_forward(self, x):
        if x.device.type == "meta":  # the shape check and input-step probes at load
            return original_forward(self, x)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the fifth tile
        return original_forward(self, x)

    monkeypatch.setattr(torch.nn.Sequential, "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        predict.predict("fast", data_root=data, max_input=24, progress=False)
    partial = crop.with_name("crop3.partial")
    assert partial.exists() and not crop.exists(), "an interrupted crop is never presented as complete"
    calls.clear()
    monkeypatch.setattr(torch.nn.Sequential, "forward", lambda self, x: (x.device.type == "meta" or calls.append(1), original_forward(self, x))[1])
    predict.predict("fast", data_root=data, max_input=24, progress=False)
    tiles = 2 * 2 * 2  # 48 voxels per axis in tiles of the smallest output, 32
    assert len(calls) == tiles - 4, "only the tiles not finished before the interruption are predicted"
    assert np.array_equal(zarr.open_array(str(crop / "mito" / "s0"), mode="r")[:], expected)


def test_batched_tiles_predict_what_single_tiles_do(fast_experiment, tmp_path):
    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    single = predict.predict("fast", data_root=tmp_path / "one", progress=False, batch_size=1)
    batched = predict.predict("fast", data_root=tmp_path / "three", progress=False, batch_size=3)
    for name in ("ecs", "mito", "nuc"):
        one = zarr.open_array(str(single / "jrc_tiny-1.zarr" / "crop3" / name / "s0"), mode="r")[:]
        three = zarr.open_array(str(batched / "jrc_tiny-1.zarr" / "crop3" / name / "s0"), mode="r")[:]
        assert one.shape == (48, 48, 48) and np.allclose(one, three, atol=1e-5)


@pytest.mark.parametrize("dataset", ["../elsewhere", "/tmp/elsewhere", "jrc_tiny-1/../../elsewhere", "a\\..\\..\\b"])
def test_a_test_manifest_dataset_outside_the_data_root_is_refused(tmp_path, dataset):
    from cellmap_repro.errors import ReproError

    manifest = tmp_path / "test_crop_manifest.csv"
    manifest.write_text(f"crop_name,dataset,class_label,voxel_size,translation,shape\n3,{dataset},ecs,[4;4;4],[798;862;814],[96;96;96]\n")
    with pytest.raises(ReproError, match=re.escape(f"{manifest}: crop 3 dataset {dataset!r}") + " is not a (plain name|path) inside"):
        predict.targets_from_manifest(manifest, tmp_path / "data")
