"""End to end on the real setup04 architecture: the README's main job, over the CLI.

Slow (a few minutes on 2 CPU cores): the setup04 UNet has 235 M parameters.
"""

import json
import shutil

import numpy as np
import pytest
import zarr

from cellmap_repro.storage import read_levels, sha256_file

from conftest import REPO, cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    experiments = root / "experiments"
    shutil.copytree(REPO / "experiments" / "setup_04_all", experiments / "setup_04_all", ignore=shutil.ignore_patterns("logs", "checkpoints", "__pycache__"))
    data = root / "data"
    result = cli("smoke", "--data", str(data), "--experiments-root", str(experiments), check=True)
    return {"root": root, "data": data, "experiment": experiments / "setup_04_all", "experiments": experiments, "stdout": result.stdout}


def test_smoke_prints_where_everything_is(smoke_run):
    out = smoke_run["stdout"]
    for key in ("checkpoints", "tensorboard", "predictions", "processed", "manifest"):
        assert f"  {key}" in out
    assert "time" in out


def test_checkpoints_and_tensorboard(smoke_run):
    ckpts = smoke_run["experiment"] / "checkpoints"
    manifest = json.loads((ckpts / "manifest.json").read_text())
    assert manifest["checkpoints"]["2"]["sha256"] == sha256_file(ckpts / "epoch_0002.pth")
    assert manifest["pretrained_weights"]["sha256"] == sha256_file(smoke_run["data"] / "weights/cosem/setup04/1820500.pth")
    events = list((smoke_run["experiment"] / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from cellmap_repro.checkpoint import load

    state = load(ckpts / "best.pth")
    # only the new head is trained: 3 x (72->72, k3) + (72->48, k1)
    head_shapes = sorted(tuple(v.shape) for k, v in state["model"].items() if k.endswith("weight"))
    assert head_shapes == sorted([(72, 72, 3, 3, 3)] * 3 + [(48, 72, 1, 1, 1)])


def test_predictions_and_processed_masks(smoke_run):
    prediction = smoke_run["data"] / "predictions/setup_04_all/jrc_tiny-1.zarr/crop3"
    processed = smoke_run["data"] / "processed/setup_04_all/jrc_tiny-1.zarr/crop3"
    truth = read_levels(smoke_run["data"] / "jrc_tiny-1/jrc_tiny-1.zarr/recon-1/labels/groundtruth/crop3/mito")
    for name, dtype in (("mito", np.uint64), ("ecs", np.uint8), ("nuc", np.uint64), ("pm", np.uint8)):
        logits = zarr.open_array(str(prediction / name / "s0"), mode="r")
        mask = zarr.open_array(str(processed / name / "s0"), mode="r")
        assert logits.dtype == np.float32 and logits.shape == (48, 48, 48)
        assert mask.dtype == dtype and mask.shape == (48, 48, 48)
        (level,) = read_levels(processed / name)
        assert level.scale == (8.0, 8.0, 8.0)
        # the 8 nm grid's voxel centres sit inside the 4 nm crop, half a 4 nm voxel in
        assert level.translation == tuple(t + 2.0 for t in truth[0].translation)
        expected = logits[:] > 0
        assert np.array_equal(mask[:] > 0, expected)
    assert len(list(prediction.iterdir())) >= 48


def test_evaluation_of_the_tiny_crop(smoke_run):
    out = smoke_run["experiment"] / "logs" / "evaluation"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["crops"] == [3]
    assert set(scores["classes"]) == {"ecs", "pm", "mito_mem", "mito_lum", "cyto", "nuc", "ves", "mito", "cell"}
    assert 0.0 <= scores["overall_score"] <= 1.0
    assert "| class |" in (out / "scores.md").read_text()
    assert (out / "scores.png").stat().st_size > 1000


def test_retraining_reproduces_the_checkpoints_bit_for_bit(smoke_run):
    ckpts = smoke_run["experiment"] / "checkpoints"
    first = json.loads((ckpts / "manifest.json").read_text())
    overrides = []
    for key, value in first["overrides"].items():
        overrides += [f"--{key.replace('_', '-')}", str(value)]
    cli("train", "-e", "setup_04_all", "--experiments-root", str(smoke_run["experiments"]), "--data", str(smoke_run["data"]), *overrides, "--overwrite", check=True)
    second = json.loads((ckpts / "manifest.json").read_text())
    assert {k: v["sha256"] for k, v in first["checkpoints"].items()} == {k: v["sha256"] for k, v in second["checkpoints"].items()}
