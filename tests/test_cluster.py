"""Cluster pieces without a scheduler: seed copies and their report, and the job templates.

The templates themselves run on a real Slurm in CI (`.ci/slurm-smoke`).
"""

import json
import re
import subprocess

import pytest

from cellmap_repro import seeds
from cellmap_repro.cli import main
from cellmap_repro.errors import ReproError

from conftest import FAST_EXPERIMENT, REPO

SLURM = sorted((REPO / "cluster" / "slurm").glob("*.sbatch"))
LSF = sorted((REPO / "cluster" / "lsf").glob("*.bsub"))


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "experiments"
    shutil.copytree(FAST_EXPERIMENT, root / "fast", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "fast" / "datasplit.csv").write_text("a,b\n")
    monkeypatch.setenv("CELLMAP_REPRO_EXPERIMENTS", str(root))
    return root


def test_seed_copy_is_the_experiment_with_its_seed_and_is_reused(experiments, capsys):
    from cellmap_repro.experiment import load_experiment

    assert main(["seed-copy", "-e", "fast", "--seed", "3"]) == 0
    assert capsys.readouterr().out == "fast_seed3\n"
    copy = experiments / "fast_seed3"
    assert (copy / "datasplit.csv").read_text() == "a,b\n"
    assert load_experiment("fast_seed3", parts=("data", "model", "train_config")).train.random_seed == 3
    assert load_experiment("fast", parts=("data", "model", "train_config")).train.random_seed == 7
    # git leaves copies alone; checkpoints of a run in the copy survive a second seed-copy
    assert (copy / ".gitignore").read_text() == "*\n"
    (copy / "checkpoints").mkdir()
    (copy / "checkpoints" / "latest.pth").write_bytes(b"run")
    assert main(["seed-copy", "-e", "fast", "--seed", "3"]) == 0
    assert (copy / "checkpoints" / "latest.pth").read_bytes() == b"run"


def test_seed_copy_refuses_a_stale_copy_and_copies_of_copies(experiments):
    seeds.seed_copy("fast", 1)
    with (experiments / "fast" / "train_config.py").open("a") as config:
        config.write("learning_rate = 1e-2\n")
    with pytest.raises(ReproError, match=r"fast_seed1 exists but differs from fast with seed 1 \(train_config.py\)"):
        seeds.seed_copy("fast", 1)
    with pytest.raises(ReproError, match="is itself a seed copy"):
        seeds.seed_copy("fast_seed1", 2)
    with pytest.raises(ReproError, match="unknown experiment"):
        seeds.seed_copy("nope", 2)


def write_scores(folder, overall, mito, ecs):
    scores = {"overall_score": overall, "overall_instance_score": mito, "overall_semantic_score": ecs,
              "classes": {"mito": {"score": mito, "type": "instance"}, "ecs": {"score": ecs, "type": "semantic"}}}
    (folder / "logs" / "evaluation").mkdir(parents=True)
    (folder / "logs" / "evaluation" / "scores.json").write_text(json.dumps(scores))


def test_seeds_report_gives_mean_and_spread_over_evaluated_seeds(experiments, capsys):
    for seed in (0, 1, 2, 5):
        seeds.seed_copy("fast", seed)
    write_scores(experiments / "fast_seed0", 0.5, 0.4, 0.6)
    write_scores(experiments / "fast_seed1", 0.7, 0.6, 0.8)
    write_scores(experiments / "fast_seed5", 0.6, 0.5, None)
    # a folder that looks like a copy but is none is not counted
    (experiments / "fast_seed9").mkdir()
    assert main(["seeds-report", "-e", "fast"]) == 0
    out = capsys.readouterr().out
    result = json.loads((experiments / "fast" / "logs" / "seeds.json").read_text())
    assert result["seeds"] == [0, 1, 5] and result["missing_seeds"] == [2]
    overall = result["overall"]["overall_score"]
    assert overall["n"] == 3 and overall["mean"] == pytest.approx(0.6) and overall["std"] == pytest.approx(0.1)
    assert (overall["median"], overall["min"], overall["max"]) == (0.6, 0.5, 0.7)
    assert result["classes"]["ecs"]["n"] == 2 and result["classes"]["ecs"]["mean"] == pytest.approx(0.7)
    assert "| overall | 3 | 0.6000 | 0.1000 | 0.6000 | 0.5000 | 0.7000 |" in out
    assert "| class ecs | 2 | 0.7000 | 0.1414 |" in out
    assert "seeds 2 have no scores.json yet" in out
    assert (experiments / "fast" / "logs" / "seeds.md").read_text() in out


def test_seeds_report_without_scores_is_one_line(experiments, capsys):
    assert main(["seeds-report", "-e", "fast"]) == 2
    assert "no seed copies of fast" in capsys.readouterr().err
    seeds.seed_copy("fast", 0)
    assert main(["seeds-report", "-e", "fast"]) == 2
    assert "has been evaluated yet" in capsys.readouterr().err


@pytest.mark.parametrize("path", SLURM + LSF + [REPO / "cluster" / "common.sh"], ids=lambda p: p.name)
def test_templates_parse_and_call_only_the_cli(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if path.name == "common.sh":
        return
    text = path.read_text()
    assert 'source "$CELLMAP_REPRO_ROOT/cluster/common.sh"' in text
    # every command after the set-up is a CLI call (cli / train) or shell plumbing
    body = text.split("cluster/common.sh\"", 1)[1]
    commands = [line.strip() for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for command in commands:
        assert re.match(r"(cli |run_requeueable train |log_to |copy=\$\(cli |unset SEED$|if |fi$)", command), command


def test_every_slurm_template_has_an_lsf_twin_with_the_same_cli_calls():
    assert [p.stem for p in SLURM] == [p.stem for p in LSF]
    for slurm, lsf in zip(SLURM, LSF):
        stages = lambda path: re.findall(r"(?:\bcli|run_requeueable) ([a-z-]+)", path.read_text())  # noqa: E731
        assert stages(slurm) == stages(lsf) and stages(slurm), slurm.name


def test_apptainer_definition_has_the_dockerfiles_pins():
    from test_container_files import arg_defaults

    definition = (REPO / "cluster" / "apptainer" / "cellmap-repro.def").read_text()
    defaults = arg_defaults()
    assert re.search(r"^From: (\S+)$", definition, re.M).group(1) == defaults["BASE_IMAGE"]
    assert set(re.findall(r"--snapshot (\S+)", definition)) == {defaults["APT_SNAPSHOT"]}
    assert "pip install --require-hashes --no-deps -r /opt/cellmap-repro/requirements.txt" in definition
    assert "requirements.txt /opt/cellmap-repro/requirements.txt" in definition
