"""`cellmap-repro verify` on the fast experiment: equal runs pass, a changed factor is named."""

import json

from conftest import cli

FAST = ["--epochs", "1", "--iterations-per-epoch", "3", "--batch-size", "1", "--validation-batches", "1", "--checkpoint-every", "1"]


def test_verify_repeat_and_resume_pass(fast_experiment, tmp_path):
    report_path = tmp_path / "verify.json"
    result = cli("verify", "-e", "fast", *FAST, "--kill-at", "2", "--quiet", "--report", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["equal"] is True
    assert report["checks"]["repeat"]["equal"] and report["checks"]["resume"]["equal"]
    assert report["checks"]["resume"]["killed_at_iteration"] == 2
    # The exact verdict line: "NOT bitwise equal" contains "bitwise equal" too.
    assert "bitwise equal" in result.stdout.splitlines() and "NOT bitwise equal" not in result.stdout
    assert not (fast_experiment / "checkpoints").exists(), "verify must not touch the experiment's own run"


def test_verify_against_names_the_differing_factor(fast_experiment, tmp_path):
    cli("train", "-e", "fast", *FAST, "--overwrite", check=True)
    recorded = json.loads((fast_experiment / "checkpoints" / "manifest.json").read_text())
    assert recorded["overrides"]["iterations_per_epoch"] == 3
    same = tmp_path / "same.json"
    same.write_text(json.dumps(recorded))
    ok = cli("verify", "-e", "fast", "--against", str(same), "--skip", "repeat", "--skip", "resume", "--quiet", "--report", str(tmp_path / "r1.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    recorded["software"]["packages"]["torch"] = "1.0.0"
    recorded["hardware"]["gpus"] = [{"name": "NVIDIA H100 80GB HBM3", "driver": "580.1"}]
    recorded["checkpoints"]["1"]["sha256"] = "0" * 64
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(recorded))
    result = cli("verify", "-e", "fast", "--against", str(changed), "--skip", "repeat", "--skip", "resume", "--quiet", "--report", str(tmp_path / "r2.json"))
    assert result.returncode == 1
    report = json.loads((tmp_path / "r2.json").read_text())
    factors = {f["factor"] for f in report["checks"]["against"]["differing_factors"]}
    assert "software.packages.torch" in factors
    assert "hardware.gpus" in factors
    assert "software.packages.torch" in result.stdout
    assert "NOT bitwise equal" in result.stdout.splitlines() and "bitwise equal" not in result.stdout.splitlines()
