"""The experiment contract holds for ordinary folders (issue 10 point 3, issue 13 point 3).

Each test names the hole it closes; at 604a76f each of them failed. Test experiments:
``bn_unet`` (a BatchNorm + max-pool UNet from scratch, its architecture in a helper
module ``unet.py``) and ``finetune`` (pretrained layers, one frozen and one trainable,
plus a new head; the pretrained weights are written by the test).
"""

import pytest
import torch

from cellmap_repro import checkpoint, manifest, predict, train
from cellmap_repro.errors import ReproError
from cellmap_repro.experiment import load_experiment

from conftest import REPO, copy_experiment

TEST_EXPERIMENTS = REPO / "tests" / "experiments"
SHORT = train.Overrides(epochs=1, iterations_per_epoch=2, batch_size=2, validation_batches=0)


class Killed(Exception):
    pass


@pytest.fixture
def experiments(tmp_path, tiny_dataset, monkeypatch):
    """Copy a test experiment into a scratch experiments root (datasplit on the tiny crop)."""
    root = tmp_path / "experiments"
    root.mkdir()
    monkeypatch.setenv("CELLMAP_REPRO_EXPERIMENTS", str(root))
    monkeypatch.setenv("CELLMAP_REPRO_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CELLMAP_REPRO_THREADS", "1")
    monkeypatch.delenv("SEED", raising=False)
    return lambda name: copy_experiment(TEST_EXPERIMENTS / name, root, tiny_dataset)


@pytest.fixture
def pretrained(tmp_path, monkeypatch):
    """The finetune experiment's pretrained weights: two convolutions, seeded apart from any run."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(1234)
    body = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 4, 3), torch.nn.ReLU())
    torch.set_rng_state(generator_state)
    path = tmp_path / "pretrained.pth"
    torch.save(body.state_dict(), path)
    monkeypatch.setenv("CELLMAP_REPRO_TEST_PRETRAINED", str(path))
    return path


def train_until_killed(monkeypatch, name: str, overrides: train.Overrides, kill_at: int) -> None:
    """A run SIGKILLed after iteration ``kill_at``, in-process: the kill raises instead."""

    def kill(pid, signal_number):
        raise Killed(signal_number)

    monkeypatch.setenv(train.KILL_AT_ENV, str(kill_at))
    monkeypatch.setattr(train.os, "kill", kill)
    with pytest.raises(Killed):
        train.train(name, overrides=overrides, overwrite=True, progress=False)
    monkeypatch.delenv(train.KILL_AT_ENV)


def hashes(result: train.TrainResult) -> dict:
    return {epoch: entry["sha256"] for epoch, entry in result.checkpoint_hashes.items()}


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


# --- whole model state: buffers in checkpoints, predict with trained statistics -------


def test_batchnorm_unet_checkpoint_holds_running_statistics_and_predicts(experiments, tmp_path):
    """Hole: checkpoints kept only trainable parameters (BatchNorm statistics lost), and a
    pooling UNet crashed in predict without an undocumented ``downsample_factor``."""
    experiments("bn_unet")
    train.train("bn_unet", overrides=SHORT, progress=False)
    latest = tmp_path / "experiments" / "bn_unet" / "checkpoints" / "latest.pth"
    state = checkpoint.load(latest)
    assert int(state["model"]["down.1.num_batches_tracked"]) == 2
    assert state["model"]["down.1.running_mean"].abs().sum() > 0, "running statistics were trained"
    assert state["classes"] == ["ecs", "pm", "mito", "nuc", "cell"]

    fresh = load_experiment("bn_unet", parts=("model",), seed=state["seed"])
    model = fresh.configs["model"].model
    assert model.down[1].running_mean.abs().sum() == 0, "a fresh build has untrained statistics"
    checkpoint.load_into(model, state, latest, checkpoint.identity(model, fresh.classes))
    assert torch.equal(model.down[1].running_var, state["model"]["down.1.running_var"]), "what predict loads"
    assert fresh.input_step() == (2, 2, 2), "derived from the pooling, no downsample_factor"

    out = predict.predict("bn_unet", data_root=tmp_path / "data", progress=False)
    import zarr

    logits = zarr.open_array(str(out / "jrc_tiny-1.zarr" / "crop3" / "mito" / "s0"), mode="r")[:]
    assert logits.shape == (48, 48, 48) and torch.isfinite(torch.from_numpy(logits)).all()


def test_batchnorm_unet_kill_and_resume_is_bitwise_equal(experiments, monkeypatch):
    """Hole: BatchNorm statistics were not restored on resume, so the resumed run differed."""
    experiments("bn_unet")
    overrides = train.Overrides(epochs=2, iterations_per_epoch=2, batch_size=2, validation_batches=1, checkpoint_every=1)
    reference = hashes(train.train("bn_unet", overrides=overrides, progress=False))
    train_until_killed(monkeypatch, "bn_unet", overrides, kill_at=3)
    resumed = hashes(train.train("bn_unet", overrides=overrides, resume=True, progress=False))
    assert resumed == reference


# --- pretrained layers are never re-initialised unless asked --------------------------


def test_finetune_starts_from_the_pretrained_weights_and_checks_the_frozen_ones(experiments, pretrained, tmp_path):
    """Hole: every trainable module was reset, so a fine-tune silently trained from scratch."""
    experiments("finetune")
    train.train("finetune", progress=False)
    state = checkpoint.load(tmp_path / "experiments" / "finetune" / "checkpoints" / "epoch_0001.pth")
    weights = torch.load(pretrained, weights_only=True)
    assert "0.0.weight" not in state["model"], "frozen parameters are not saved, only fingerprinted"
    moved = torch.cat([(state["model"][f"0.2.{k}"] - weights[f"2.{k}"]).flatten() for k in ("weight", "bias")])
    # One SGD step with the gradient norm clipped to 1 moves the weights by at most lr.
    assert 0 < moved.norm() <= 1e-2 * (1 + 1e-4), f"first step is pretrained minus one update, moved {moved.norm()}"

    torch.manual_seed(99)
    other = {k: torch.randn_like(v) for k, v in weights.items()}
    torch.save(other, pretrained)  # e.g. another pretrained weights file
    with pytest.raises(ReproError, match="frozen weights differ from those the checkpoint was trained with: .*epoch_0001.pth"):
        predict.predict("finetune", data_root=tmp_path / "data", which_checkpoint="1", progress=False)
    with pytest.raises(ReproError, match="frozen weights differ from those the checkpoint was trained with: .*latest.pth"):
        train.train("finetune", resume=True, progress=False)


def test_reinitialize_resets_only_the_named_modules_repeatably(experiments, pretrained):
    folder = experiments("finetune")
    weights = torch.load(pretrained, weights_only=True)
    model = load_experiment("finetune", parts=("model",)).configs["model"].model
    assert torch.equal(model[0][2].weight, weights["2.weight"]), "nothing is reset unless asked"
    (folder / "model.py").write_text((folder / "model.py").read_text() + '\nreinitialize = ["0.2"]\n')
    first = load_experiment("finetune", parts=("model",)).configs["model"].model
    second = load_experiment("finetune", parts=("model",)).configs["model"].model
    assert not torch.equal(first[0][2].weight, weights["2.weight"])
    assert torch.equal(first[0][2].weight, second[0][2].weight), "seeded with the run seed"
    assert torch.equal(first[0][0].weight, weights["0.weight"])
    (folder / "model.py").write_text((folder / "model.py").read_text() + '\nreinitialize = ["head"]\n')
    with pytest.raises(ReproError, match=r"model.py: reinitialize names 'head', which is no module of the model"):
        load_experiment("finetune", parts=("model",))


def test_the_model_is_built_seeded_with_the_run_seed(experiments, monkeypatch):
    experiments("fast")
    build = lambda **kw: load_experiment("fast", parts=("model",), **kw).configs["model"].model[0].weight  # noqa: E731
    assert torch.equal(build(), build()), "random_seed = 7 seeds construction"
    assert torch.equal(build(), build(seed=7)) and not torch.equal(build(), build(seed=8))
    monkeypatch.setenv("SEED", "8")
    assert torch.equal(build(), build(seed=8)), "env SEED is the run seed"


@pytest.mark.parametrize(
    ("env", "line", "message"),
    [
        ({}, "random_seed = 6 + 1", "random_seed must be a whole-number literal"),
        ({"SEED": "abc"}, None, "SEED must be a whole number from 0 to 9223372036854775807, got 'abc'"),
        ({"SEED": "-1"}, None, "SEED must be a whole number from 0 to 9223372036854775807, got '-1'"),
        ({}, "random_seed = 18446744073709551616", "seed 18446744073709551616 is out of range"),
    ],
)
def test_bad_seed_is_one_line(experiments, monkeypatch, env, line, message):
    folder = experiments("fast")
    if line:
        edit(folder / "train_config.py", "random_seed = 7", line)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ReproError, match=message) as error:
        train.train("fast", overrides=SHORT, progress=False)
    assert "\n" not in str(error.value)


# --- masking cannot be switched off by a loss keyword --------------------------------


def test_masking_holds_without_criterion_kwargs():
    """Hole: leaving out criterion_kwargs = {"reduction": "none"} averaged over unknown voxels too."""
    from types import SimpleNamespace

    config = SimpleNamespace(criterion=torch.nn.BCEWithLogitsLoss, criterion_kwargs={}, weight_loss=False, classes=["a"])
    criterion = train.make_criterion(config, {})
    logits = torch.tensor([[[[[2.0, -1.0, 3.0, 0.5]]]]])
    target = torch.tensor([[[[[1.0, float("nan"), float("nan"), 0.0]]]]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., [0, 3]], target[..., [0, 3]])
    assert torch.allclose(train.masked_loss(criterion, logits, target), expected)


def test_a_criterion_that_ignores_reduction_is_refused_at_the_first_step():
    class Scalar(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()

        def forward(self, logits, target):
            return (logits - target).abs().mean()

    with pytest.raises(ReproError, match="must honour reduction='none'"):
        train.masked_loss(Scalar(), torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))


_NO_REDUCTION = """
class _Dice(torch.nn.Module):
    def __init__(self, pos_weight=None):
        super().__init__()
criterion = _Dice
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('criterion_kwargs = {"reduction": "none"}', 'criterion_kwargs = {"reduction": "mean"}', "reduction='mean' would switch off true-negative masking"),
        ("criterion = torch.nn.BCEWithLogitsLoss", _NO_REDUCTION, "criterion _Dice does not accept reduction='none'"),
        ("criterion = torch.nn.BCEWithLogitsLoss", "criterion = torch.nn.L1Loss", "criterion L1Loss does not accept pos_weight"),
        ("random_seed = 7", 'random_seed = 7\nload_model = "best"', "unknown variable 'load_model'"),
    ],
)
def test_train_config_refusals_are_one_line(experiments, old, new, message):
    folder = experiments("fast")
    edit(folder / "train_config.py", old, new)
    with pytest.raises(ReproError, match=message) as error:
        load_experiment("fast")
    assert "\n" not in str(error.value) and "train_config.py" in str(error.value)


def test_redundant_reduction_none_is_accepted(experiments):
    folder = experiments("fast")
    assert '{"reduction": "none"}' in (folder / "train_config.py").read_text()
    assert load_experiment("fast").train.criterion_kwargs == {"reduction": "none"}


# --- shapes checked once at load; input step -----------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ('"shape": (32, 32, 32)', '"shape": (30, 30, 30)', ["input_array_info.shape (40, 40, 40) to (10, 32, 32, 32)", "= (10, 30, 30, 30)"]),
        ("torch.nn.Conv3d(4, len(_classes), 3)", "torch.nn.Conv3d(4, 3, 3)", ["to (3, 32, 32, 32)", "= (10, 32, 32, 32)"]),
        ('"shape": (40, 40, 40)', '"shape": (6, 6, 6)', ["fails on an input of input_array_info.shape (6, 6, 6)"]),
    ],
)
def test_shape_mismatch_is_one_line_naming_both_shapes_and_the_file(experiments, old, new, fragments):
    """Hole: a wrong target shape or a too-small input failed with a torch traceback."""
    folder = experiments("fast")
    edit(folder / "model.py", old, new)
    with pytest.raises(ReproError) as error:
        load_experiment("fast")
    message = str(error.value)
    assert "\n" not in message and str(folder / "model.py") in message
    for fragment in fragments:
        assert fragment in message, message


def test_declared_input_step_is_checked_and_used(experiments):
    folder = experiments("bn_unet")
    edit(folder / "model.py", "model_name =", "input_step = 4\nmodel_name =")
    assert load_experiment("bn_unet", parts=("model",)).input_step() == (4, 4, 4)
    edit(folder / "model.py", "input_step = 4", "input_step = (2, 3, 2)")
    with pytest.raises(ReproError, match=r"input_step \(2, 3, 2\) is not valid: input \(46, 47, 46\) gives \(30, 30, 30\), not \(30, 31, 30\)"):
        load_experiment("bn_unet", parts=("model",)).input_step()


# --- checkpoints record classes and model signature ----------------------------------


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        ("data.py", '"ecs", "pm"', '"pm", "ecs"', "has the experiment's classes in another order"),
        ("data.py", ', "golgi"', "", "was trained for 10 classes, the experiment has 9"),
        ("model.py", "torch.nn.Conv3d(1, 4, 3)", "torch.nn.Conv3d(1, 4, 3, bias=False)", "written by another architecture than this experiment's model.py \\(unexpected entry 0.bias\\)"),
    ],
)
def test_predict_refuses_a_checkpoint_of_other_classes_or_architecture(experiments, tmp_path, file, old, new, message):
    """Hole: same classes in another order predicted mislabelled channels; another count gave a traceback."""
    folder = experiments("fast")
    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    edit(folder / file, old, new)
    with pytest.raises(ReproError, match=message) as error:
        predict.predict("fast", data_root=tmp_path / "data", progress=False)
    assert "\n" not in str(error.value) and "latest.pth" in str(error.value)


def test_old_format_checkpoint_is_refused(tmp_path):
    path = tmp_path / "latest.pth"
    torch.save({"format": 1, "model": {"0.weight": torch.zeros(1)}}, path)
    with pytest.raises(ReproError, match=r"latest.pth is a format-1 checkpoint; this version reads format 2"):
        checkpoint.load(path)


# --- every file of the folder is in the config hash ----------------------------------


def test_config_hash_covers_every_file_but_outputs_caches_hidden_files_and_readme(tmp_path):
    folder = tmp_path / "exp"
    for name in ("model.py", "unet.py", "nets/block.py", "datasplit.csv", "README.md", ".notes", "__pycache__/model.cpython-311.pyc", "x.pyc", "checkpoints/latest.pth", "logs/train.log"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    assert set(manifest.config_files(folder)) == {"model.py", "unet.py", "nets/block.py", "datasplit.csv"}
    before = manifest.config_hash(folder, {})
    (folder / "README.md").write_text("results table rewritten by evaluate")
    assert manifest.config_hash(folder, {}) == before
    (folder / "nets/block.py").write_text("changed")
    assert manifest.config_hash(folder, {}) != before


def test_resume_refuses_a_changed_helper_module(experiments, monkeypatch):
    """Hole: helper modules were not in the config hash, so --resume accepted another architecture."""
    folder = experiments("bn_unet")
    train_until_killed(monkeypatch, "bn_unet", SHORT, kill_at=1)
    edit(folder / "unet.py", "width: int = 4", "width: int = 6")
    with pytest.raises(ReproError, match=r"the experiment changed since .* was written \(unet.py changed\)") as error:
        train.train("bn_unet", overrides=SHORT, resume=True, progress=False)
    assert "\n" not in str(error.value)
