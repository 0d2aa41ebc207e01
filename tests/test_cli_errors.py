"""Bad input gets one clear error line, exit status 2, no traceback, nothing half-written."""

import pytest

from conftest import REPO, cli, copy_experiment


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cellmap-repro: error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def test_unknown_experiment(fast_experiment):
    assert_one_line_error(cli("train", "-e", "setup_05_nope"), "unknown experiment 'setup_05_nope'")


def test_malformed_datasplit_row(fast_experiment):
    split = fast_experiment / "datasplit.csv"
    split.write_text(split.read_text() + '"train","only","three"\n')
    assert_one_line_error(cli("train", "-e", "fast"), "datasplit.csv:4", "expected 5 fields")


def test_unknown_class_in_datasplit(fast_experiment):
    split = fast_experiment / "datasplit.csv"
    split.write_text(split.read_text().replace("mito]", "mitochondrion]", 1))
    assert_one_line_error(cli("train", "-e", "fast"), "unknown class 'mitochondrion'", "datasplit.csv:")


def test_missing_checkpoint(fast_experiment):
    assert_one_line_error(cli("predict", "-e", "fast"), "checkpoint 'latest' not found")


@pytest.mark.parametrize(
    ("stage", "message"),
    [(("predict",), "checkpoint 'best' not found"), (("train", "--resume"), "nothing to resume")],
)
def test_missing_run_is_reported_before_setup04_weights_are_fetched(fast_experiment, tmp_path, stage, message):
    copy_experiment(REPO / "experiments" / "setup_04_all", fast_experiment.parent, fast_experiment.parent.parent / "unused.zarr")
    weights = tmp_path / "no-weights"
    weights.mkdir()
    # An unreachable proxy: were the weights fetched first, the error would be about the download.
    offline = {"CELLMAP_REPRO_WEIGHTS": str(weights), "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    assert_one_line_error(cli(stage[0], "-e", "setup_04_all", *stage[1:], env=offline), message)
    assert not any(weights.iterdir())


def test_data_path_that_does_not_exist(fast_experiment, tmp_path):
    split = fast_experiment / "datasplit.csv"
    first = split.read_text().splitlines()[0]
    container = first.split('","')[1]
    split.write_text(split.read_text().replace(container, str(tmp_path / "gone" / "jrc_gone.zarr")))
    assert_one_line_error(cli("train", "-e", "fast"), "does not exist", "jrc_gone.zarr")
    assert not (fast_experiment / "checkpoints" / "latest.pth").exists()


def test_wrong_voxel_size(fast_experiment):
    model = fast_experiment / "model.py"
    model.write_text(model.read_text().replace('"scale": (8.0, 8.0, 8.0)}', '"scale": (4.0, 4.0, 4.0)}'))
    assert_one_line_error(cli("train", "-e", "fast"), "coarser than the model input's [4.0, 4.0, 4.0] nm")


def test_output_voxel_size_other_than_the_input_is_refused_at_load(fast_experiment):
    """Was accepted by train and refused only by predict (issue 13)."""
    model = fast_experiment / "model.py"
    model.write_text(model.read_text().replace('"scale": (8.0, 8.0, 8.0)}\ntarget', '"scale": (16.0, 16.0, 16.0)}\ntarget'))
    assert_one_line_error(cli("train", "-e", "fast"), "model.py", "voxel sizes must be equal")


def test_misspelt_config_variable(fast_experiment):
    config = fast_experiment / "train_config.py"
    config.write_text(config.read_text() + "\nepoch = 3\n")
    assert_one_line_error(cli("train", "-e", "fast"), "unknown variable 'epoch'", "train_config.py")


def test_missing_annotation_counts_refused_before_cellmap_data_writes_them(fast_experiment, tmp_path):
    import json
    import shutil

    split = fast_experiment / "datasplit.csv"
    container = split.read_text().splitlines()[0].split('","')[1]
    copy = tmp_path / "copy" / "jrc_tiny-1.zarr"
    shutil.copytree(container, copy)
    attrs_file = copy / "recon-1/labels/groundtruth/crop1/ecs/s0/.zattrs"
    attrs = json.loads(attrs_file.read_text())
    del attrs["cellmap"]["annotation"]["complement_counts"]
    attrs_file.write_text(json.dumps(attrs))
    before = attrs_file.read_text()
    split.write_text(split.read_text().replace(container, str(copy)))
    assert_one_line_error(cli("train", "-e", "fast"), "lacks cellmap.annotation.complement_counts")
    assert attrs_file.read_text() == before


@pytest.mark.parametrize("stage", ["process", "evaluate"])
def test_stages_without_inputs(fast_experiment, stage):
    result = cli(stage, "-e", "fast")
    if "invalid choice" in result.stderr:
        pytest.skip(f"{stage} stage not installed")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_a_bug_is_one_line_and_the_traceback_is_one_variable_away(monkeypatch, capsys):
    """An error nobody foresaw: one line and exit status 1, unless CELLMAP_REPRO_TRACEBACK=1."""
    from cellmap_repro import cli
    from cellmap_repro.errors import ReproError

    def broken(args):
        raise KeyError("surprise")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda *stage: parser)
    parser._subparsers._group_actions[0].choices["unite-logs"].set_defaults(func=broken)
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["unite-logs"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cellmap-repro: internal error: KeyError: 'surprise'") and cli.TRACEBACK_ENV in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(KeyError):
        cli.main(["unite-logs"])

    def refused(args):
        raise ReproError("bad input")

    parser._subparsers._group_actions[0].choices["unite-logs"].set_defaults(func=refused)
    with pytest.raises(ReproError):
        cli.main(["unite-logs"])
    monkeypatch.delenv(cli.TRACEBACK_ENV)
    assert cli.main(["unite-logs"]) == cli.EXIT_USER_ERROR
    assert capsys.readouterr().err == "cellmap-repro: error: bad input\n"


def test_flags_reach_the_environment_only_for_the_stage_run(tmp_path, monkeypatch, capsys):
    """`--data`/`--experiments-root` are published to the stage (and its subprocesses) and
    taken back afterwards: an in-process call must not steer later ones."""
    import os

    from cellmap_repro import cli

    monkeypatch.delenv("CELLMAP_REPRO_DATA", raising=False)
    monkeypatch.setenv("CELLMAP_REPRO_EXPERIMENTS", "/before")
    seen = {}

    def stage(args):
        seen.update({k: os.environ.get(k) for k in ("CELLMAP_REPRO_DATA", "CELLMAP_REPRO_EXPERIMENTS")})
        return 0

    monkeypatch.setattr(cli, "build_parser", _parser_with(stage))
    assert cli.main(["probe", "--data", str(tmp_path / "d"), "--experiments-root", str(tmp_path / "e")]) == 0
    assert seen == {"CELLMAP_REPRO_DATA": str(tmp_path / "d"), "CELLMAP_REPRO_EXPERIMENTS": str(tmp_path / "e")}
    assert "CELLMAP_REPRO_DATA" not in os.environ and os.environ["CELLMAP_REPRO_EXPERIMENTS"] == "/before"


def _parser_with(stage):
    from cellmap_repro import cli

    def build(_verb):
        parser = cli.Parser(prog="cellmap-repro")
        parser.add_argument("--verbose", action="store_true")
        sub = parser.add_subparsers(dest="stage")
        probe = sub.add_parser("probe")
        probe.add_argument("--data")
        probe.add_argument("--experiments-root")
        probe.set_defaults(func=stage)
        return parser

    return build
