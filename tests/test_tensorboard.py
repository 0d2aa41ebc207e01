"""unite-logs: every experiment's runs in one logdir, labelled by experiment, live-linked."""

import os

from cellmap_repro.tensorboard import unite_logs


def make_run(root, experiment, run, content=b"events"):
    folder = root / experiment / "logs" / "tensorboard" / run
    folder.mkdir(parents=True)
    (folder / "events.out.tfevents.1").write_bytes(content)
    return folder


def test_runs_are_united_under_their_experiment(tmp_path):
    root = tmp_path / "experiments"
    make_run(root, "setup_04_all", "setup04.1820500_8nmOut.all", b"a")
    other = make_run(root, "my_copy", "run1", b"b")
    out = root / ".tensorboard"
    found = unite_logs(root, out)
    assert found == {"my_copy": ["run1"], "setup_04_all": ["setup04.1820500_8nmOut.all"]}
    link = out / "my_copy" / "run1" / "events.out.tfevents.1"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.read_bytes() == b"b"
    # the link follows the run as it grows
    (other / "events.out.tfevents.1").write_bytes(b"bb")
    assert link.read_bytes() == b"bb"


def test_deleted_runs_disappear_and_hidden_folders_are_ignored(tmp_path):
    root = tmp_path / "experiments"
    gone = make_run(root, "old", "run")
    make_run(root, ".tensorboard", "not-an-experiment")
    out = tmp_path / "united"
    unite_logs(root, out)
    assert (out / "old" / "run" / "events.out.tfevents.1").exists()
    assert not (out / ".tensorboard").exists()
    (gone / "events.out.tfevents.1").unlink()
    gone.rmdir()
    unite_logs(root, out)
    assert not (out / "old").exists()
