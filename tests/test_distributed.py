"""Training with several processes (torchrun, DDP, gloo on CPU) on the fast experiment.

Three launches of two processes in all (each costs two interpreters importing torch):
an uninterrupted run A, and a run B killed with SIGKILL in epoch 2, then resumed.
B's epoch 1 was written before the kill by a run from scratch: A and B are two
2-process runs that must give the same bytes; B's epoch 2 comes from the resume.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from cellmap_repro import checkpoint, data, distributed, train
from cellmap_repro.errors import ReproError

from conftest import FAST_EXPERIMENT, REPO, copy_experiment

FAST = train.Overrides(epochs=2, iterations_per_epoch=3, batch_size=2, validation_batches=1, checkpoint_every=1)
CLI_FAST = ["--epochs", "2", "--iterations-per-epoch", "3", "--batch-size", "2", "--validation-batches", "1", "--checkpoint-every", "1"]
KILL_AT = 5  # mid-epoch 2: latest.pth then holds iteration 4
# Max abs parameter difference between the 2-process and the 1-process run after 6 steps:
# 3.7e-8 measured (parameters up to 0.19, i.e. about 2 float32 ulps); see docs/benchmarks.md.
AGREEMENT = 1e-7


def run(command: list[str], experiments_root: Path, data_root: Path, extra_env: dict | None = None):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != train.KILL_AT_ENV}
    env.update({"CELLMAP_REPRO_EXPERIMENTS": str(experiments_root), "CELLMAP_REPRO_DATA": str(data_root), "CELLMAP_REPRO_THREADS": "1", **(extra_env or {})})
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)


def torchrun(*args: str) -> list[str]:
    launcher = Path(sys.executable).parent / "torchrun"
    return [str(launcher), "--standalone", "--nproc-per-node=2", "-m", "cellmap_repro", *args]


def hashes(checkpoints_dir: Path) -> dict:
    recorded = json.loads((checkpoints_dir / "manifest.json").read_text())
    return {epoch: entry["sha256"] for epoch, entry in recorded["checkpoints"].items()}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_dataset):
    """Run A (uninterrupted, launched by torchrun) and run B (`train --nproc 2`, killed, resumed)."""
    data_root = tiny_dataset.parent.parent
    roots = {}
    for name in ("a", "b"):
        roots[name] = tmp_path_factory.mktemp(f"ddp-{name}")
        copy_experiment(FAST_EXPERIMENT, roots[name], tiny_dataset)
    a = run(torchrun("train", "-e", "fast", *CLI_FAST, "--overwrite"), roots["a"], data_root)
    assert a.returncode == 0, a.stderr[-3000:]
    nproc = [sys.executable, "-m", "cellmap_repro", "train", "-e", "fast", *CLI_FAST, "--nproc", "2"]
    killed = run([*nproc, "--overwrite"], roots["b"], data_root, {train.KILL_AT_ENV: str(KILL_AT)})
    b_dir = roots["b"] / "fast" / "checkpoints"
    saved = {"epoch_1": hashes(b_dir), "latest_iteration": checkpoint.load(b_dir / "latest.pth")["iteration"]}
    resumed = run([*nproc, "--resume"], roots["b"], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"roots": roots, "data": data_root, "killed": killed, "before_resume": saved, "resumed": resumed}


def test_two_2_process_runs_give_the_same_checkpoints(two_process_runs):
    a_dir = two_process_runs["roots"]["a"] / "fast" / "checkpoints"
    first = hashes(a_dir)
    assert set(first) == {"1", "2"}
    # B's epoch 1, written before B was killed, by a second run from scratch
    assert two_process_runs["before_resume"]["epoch_1"] == {"1": first["1"]}
    manifest = json.loads((a_dir / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert manifest["settings"]["batch_size"] == 2, "batch_size is the global batch"


def test_a_killed_rank_ends_the_group_and_the_run_resumes_to_the_same_bytes(two_process_runs):
    killed = two_process_runs["killed"]
    # torchrun stops the group; the launcher exits as the first failed process did
    assert killed.returncode == 128 + 9, killed.stderr[-2000:]
    assert "cellmap-repro: torchrun --standalone --nproc-per-node=2 -m cellmap_repro train" in killed.stderr
    assert "(of 2) failed first (killed by SIGKILL)" in killed.stderr.splitlines()[-1]
    assert "Traceback" not in killed.stderr
    assert two_process_runs["before_resume"]["latest_iteration"] == KILL_AT - 1
    b = two_process_runs["roots"]["b"] / "fast"
    assert hashes(b / "checkpoints") == hashes(two_process_runs["roots"]["a"] / "fast" / "checkpoints")
    # rank 0 alone writes the logs: one start and one resume line, curves without repeats
    lines = (b / "logs" / "train.log").read_text().splitlines()
    assert sum("start at iteration 0" in line for line in lines) == 1
    assert sum(f"resume at iteration {KILL_AT - 1}" in line for line in lines) == 1
    assert all("2 processes (gloo)" in line for line in lines if " at iteration " in line and "settings" in line)
    from test_training import scalar_tags

    assert scalar_tags(b / "logs" / "tensorboard" / "fast")["loss"] == [1, 2, 3, 4, 5, 6]
    assert two_process_runs["resumed"].stdout.count("checkpoints:") == 1, "only rank 0 reports"


def test_two_processes_agree_with_one_and_their_checkpoints_load_in_one(two_process_runs, tiny_dataset, tmp_path, monkeypatch):
    from cellmap_repro.experiment import load_experiment

    root = tmp_path / "experiments"
    root.mkdir()
    copy_experiment(FAST_EXPERIMENT, root, tiny_dataset)
    monkeypatch.setenv("CELLMAP_REPRO_DATA", str(two_process_runs["data"]))
    monkeypatch.setenv("CELLMAP_REPRO_THREADS", "1")
    single = train.train("fast", experiments_root=root, overrides=FAST, progress=False).checkpoint_hashes
    a_dir = two_process_runs["roots"]["a"] / "fast" / "checkpoints"
    two = json.loads((a_dir / "manifest.json").read_text())["checkpoints"]
    for epoch in ("1", "2"):
        one_state = checkpoint.load(root / "fast" / "checkpoints" / checkpoint.epoch_name(int(epoch)))["model"]
        two_state = checkpoint.load(a_dir / checkpoint.epoch_name(int(epoch)))["model"]
        assert set(one_state) == set(two_state) and not any(k.startswith("module.") for k in two_state)
        difference = max(float((one_state[k] - two_state[k]).abs().max()) for k in one_state)
        assert difference <= AGREEMENT, f"epoch {epoch}: max abs parameter difference {difference:.3g}"
        assert single[epoch]["validation"] == pytest.approx(two[epoch]["validation"], rel=1e-6)
    # verify --against names the process count among the factors that differ
    from cellmap_repro.repro import differing_factors

    one_manifest = json.loads((root / "fast" / "checkpoints" / "manifest.json").read_text())
    factors = {f["factor"] for f in differing_factors(json.loads((a_dir / "manifest.json").read_text()), one_manifest)}
    assert {"distributed.world_size", "distributed.backend", "config_sha256"} <= factors
    # a 2-process checkpoint loads into the model one process builds (as predict does)
    model = load_experiment("fast", root, parts=("model",)).configs["model"].model
    state = checkpoint.load(a_dir / "latest.pth")
    checkpoint.load_into(model, state, a_dir / "latest.pth", checkpoint.identity(model, state["classes"]))
    assert torch.equal(model.state_dict()["6.weight"], state["model"]["6.weight"])


def test_resume_with_another_process_count_is_refused(two_process_runs, monkeypatch):
    root = two_process_runs["roots"]["a"]
    monkeypatch.setenv("CELLMAP_REPRO_DATA", str(two_process_runs["data"]))
    monkeypatch.setenv("CELLMAP_REPRO_THREADS", "1")
    before = hashes(root / "fast" / "checkpoints")
    with pytest.raises(ReproError, match=r"trained by 2 processes, this one has 1 process: resume it with --nproc 2"):
        train.train("fast", experiments_root=root, overrides=FAST, resume=True, progress=False)
    assert hashes(root / "fast" / "checkpoints") == before


def test_ranks_split_each_global_batch_by_position():
    """Rank r takes positions r, r+W, ...: the ranks' batches together are the 1-process batch."""

    class Positions:
        def __len__(self):
            return 48

        def __getitem__(self, position):
            value = torch.tensor([float(position)])
            return {data.INPUT_KEY: value, data.TARGET_KEY: value, "augmentation": None}

    def batches(batch, start, shard):
        return [b[data.INPUT_KEY].flatten().int().tolist() for b in data.loader(Positions(), batch, 0, start=start, shard=shard)]

    for world, start in ((2, 0), (4, 24)):  # 24: resumed at iteration 3 of a batch of 8
        whole = batches(8, start, (0, 1))
        shards = [batches(8 // world, start, (rank, world)) for rank in range(world)]
        assert all(len(s) == len(whole) for s in shards)
        for step, expected in enumerate(whole):
            assert sorted(p for s in shards for p in s[step]) == expected
        assert shards[1][0] == [start + 1 + k * world for k in range(8 // world)]


def test_process_count_checks():
    with pytest.raises(ReproError, match="batch_size 3 cannot be split over 2 processes"):
        distributed.local_batch(3, distributed.World(size=2))
    assert distributed.local_batch(4, distributed.World(size=2)) == 2
    bn = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    with pytest.raises(ReproError, match="BatchNorm .* only on GPUs"):
        distributed.prepare(bn, torch.device("cpu"), distributed.World(size=2))
    assert distributed.prepare(bn, torch.device("cpu"), distributed.World()) is bn
    arguments = distributed.torchrun_arguments(4, ["-v", "train", "-e", "x", "--nproc", "4", "--resume", "--nproc=4"])
    assert arguments == ["--standalone", "--nproc-per-node=4", "-m", "cellmap_repro", "-v", "train", "-e", "x", "--resume"]


def test_make_and_compose_start_one_process_per_gpu(tmp_path):
    from test_container_files import compose_config, make

    common = ["-n", "-o", ".venv/.installed", "EXP=exp_x", "ARGS=--flag", "DOCKER=true"]
    last_line = lambda *args: make(*common, *args, "train").strip().splitlines()[-1].split()  # noqa: E731
    assert last_line("RUNNER=local", "GPUS=2") == [".venv/bin/cellmap-repro", "train", "-e", "exp_x", "--nproc", "2", "--flag"]
    assert last_line("RUNNER=docker", "GPUS=2") == ["docker", "compose", "run", "--rm", "train", "train", "-e", "exp_x", "--nproc", "2", "--flag"]
    for one in ((), ("GPUS=1",)):
        assert last_line("RUNNER=local", *one) == [".venv/bin/cellmap-repro", "train", "-e", "exp_x", "--flag"]
    for variables, count in (({}, 1), ({"GPUS": "4"}, 4)):
        service = compose_config(tmp_path, "compose.yaml", EXP="exp_x", **variables)["services"]["train"]
        assert service["command"] == ["train", "--nproc", str(count), "-e", "exp_x"]
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == count
