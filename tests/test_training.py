"""Training machinery on the fast experiment: outputs, determinism, resume after SIGKILL."""

import json

import pytest

from cellmap_repro import checkpoint, train
from cellmap_repro.storage import sha256_file

from conftest import cli

FAST = train.Overrides(epochs=2, iterations_per_epoch=3, batch_size=2, validation_batches=1, checkpoint_every=1)
CLI_FAST = ["--epochs", "2", "--iterations-per-epoch", "3", "--batch-size", "2", "--validation-batches", "1", "--checkpoint-every", "1"]


def epoch_hashes(checkpoints_dir):
    recorded = json.loads((checkpoints_dir / "manifest.json").read_text())
    return {epoch: entry["sha256"] for epoch, entry in recorded["checkpoints"].items()}


def scalar_tags(tensorboard_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    return {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_training_writes_checkpoints_logs_and_manifest(fast_experiment):
    result = train.train("fast", overrides=FAST, progress=False)
    ckpts = fast_experiment / "checkpoints"
    assert result.iteration == 6
    for name in ("epoch_0001.pth", "epoch_0002.pth", "latest.pth", "best.pth"):
        assert (ckpts / name).exists()
        assert checkpoint.recorded_digest(ckpts / name) == sha256_file(ckpts / name)
    manifest = json.loads((ckpts / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["settings"]["threads"] == 1
    assert set(manifest["checkpoints"]) == {"1", "2"}
    assert manifest["checkpoints"]["2"]["sha256"] == sha256_file(ckpts / "epoch_0002.pth")
    assert set(manifest["data_sha256"]) == {"jrc_tiny-1/crop1", "jrc_tiny-1/crop2", "jrc_tiny-1/crop3"}
    assert manifest["determinism"]["use_deterministic_algorithms"] is True
    assert manifest["class_weights"]["mito"] > 1 and manifest["class_weights"]["golgi"] == 1.0
    state = checkpoint.load(ckpts / "latest.pth")
    assert state["iteration"] == 6 and state["epoch"] == 2 and "optimizer" in state and "rng" in state
    assert set(state["model"]) == {name for name, p in result_model_parameters(fast_experiment)}
    tags = scalar_tags(result.tensorboard_dir)
    assert tags["loss"] == [1, 2, 3, 4, 5, 6]
    assert tags["validation"] == [3, 6]
    assert "lr" in tags


def result_model_parameters(experiment_dir):
    from cellmap_repro.experiment import load_experiment

    model = load_experiment("fast", parts=("model",)).configs["model"].model
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def test_two_runs_are_bitwise_identical_and_seed_matters(fast_experiment):
    first = train.train("fast", overrides=FAST, progress=False).checkpoint_hashes
    second = train.train("fast", overrides=FAST, overwrite=True, progress=False).checkpoint_hashes
    assert {k: v["sha256"] for k, v in first.items()} == {k: v["sha256"] for k, v in second.items()}
    other_seed = train.train("fast", overrides=train.Overrides(**{**FAST.as_dict(), "seed": 8}), overwrite=True, progress=False).checkpoint_hashes
    assert other_seed["2"]["sha256"] != first["2"]["sha256"]


def test_loader_workers_give_the_same_checkpoints(fast_experiment):
    """Samples depend only on (seed, position): 0 and 2 spawned workers train the same bytes."""
    in_process = train.train("fast", overrides=FAST, progress=False).checkpoint_hashes
    workers = train.train("fast", overrides=train.Overrides(**{**FAST.as_dict(), "num_workers": 2}), overwrite=True, progress=False).checkpoint_hashes
    assert {k: v["sha256"] for k, v in in_process.items()} == {k: v["sha256"] for k, v in workers.items()}
    recorded = json.loads((fast_experiment / "checkpoints" / "manifest.json").read_text())
    assert recorded["settings"]["num_workers"] == 2


def test_refuses_to_overwrite_or_resume_nothing(fast_experiment):
    from cellmap_repro.errors import ReproError

    with pytest.raises(ReproError, match="nothing to resume: no run was started"):
        train.train("fast", overrides=FAST, resume=True, progress=False)
    train.train("fast", overrides=FAST, progress=False)
    with pytest.raises(ReproError, match="already holds checkpoints"):
        train.train("fast", overrides=FAST, progress=False)


@pytest.fixture
def uninterrupted(fast_experiment):
    result = cli("train", "-e", "fast", *CLI_FAST, "--overwrite", check=True)
    assert result.returncode == 0
    hashes = epoch_hashes(fast_experiment / "checkpoints")
    return hashes


@pytest.mark.parametrize("kill_at", [1, 3, 5])
def test_sigkill_then_resume_equals_the_uninterrupted_run(fast_experiment, uninterrupted, kill_at):
    killed = cli("train", "-e", "fast", *CLI_FAST, "--overwrite", env={train.KILL_AT_ENV: str(kill_at)})
    assert killed.returncode == -9, killed.stderr
    # latest.pth is refreshed after each iteration; the killed iteration itself is lost.
    latest_path = fast_experiment / "checkpoints" / "latest.pth"
    saved_iteration = checkpoint.load(latest_path)["iteration"] if latest_path.exists() else 0
    assert saved_iteration == kill_at - 1
    resumed = cli("train", "-e", "fast", *CLI_FAST, "--resume", check=True)
    assert resumed.returncode == 0
    assert epoch_hashes(fast_experiment / "checkpoints") == uninterrupted
    log = (fast_experiment / "logs" / "train.log").read_text()
    assert f"resume at iteration {saved_iteration}" in log
    tags = scalar_tags(fast_experiment / "logs" / "tensorboard" / "fast")
    assert tags["loss"] == [1, 2, 3, 4, 5, 6], "resumed curves must not repeat steps"


def test_resume_with_changed_settings_is_refused(fast_experiment):
    cli("train", "-e", "fast", *CLI_FAST, "--overwrite", env={train.KILL_AT_ENV: "4"})
    changed = cli("train", "-e", "fast", *CLI_FAST[:-2], "--checkpoint-every", "2", "--resume")
    assert changed.returncode == 2
    assert "changed since" in changed.stderr


def test_auto_resume_starts_a_run_then_continues_it(fast_experiment):
    """What a requeued cluster job runs: the same command first and after being killed.

    (That a resumed run equals the uninterrupted one is tested above; this is the choice.)
    """
    killed = cli("train", "-e", "fast", *CLI_FAST, "--auto-resume", env={train.KILL_AT_ENV: "4"})
    assert killed.returncode == -9, killed.stderr
    cli("train", "-e", "fast", *CLI_FAST, "--auto-resume", check=True)
    log = (fast_experiment / "logs" / "train.log").read_text()
    assert "start at iteration 0" in log and "resume at iteration 3" in log
    assert set(epoch_hashes(fast_experiment / "checkpoints")) == {"1", "2"}
    # a changed configuration is not silently continued
    changed = cli("train", "-e", "fast", *CLI_FAST[:-2], "--checkpoint-every", "2", "--auto-resume")
    assert changed.returncode == 2 and "changed since" in changed.stderr
