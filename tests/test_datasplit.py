import shutil

import numpy as np
import pytest

from cellmap_repro.datasplit import format_datasplit, make_datasplit, parse_datasplit, read_datasplit, split_advice, write_datasplit
from cellmap_repro.errors import ReproError

GOOD = '"train","/d/jrc_a/jrc_a.zarr","recon-1/em/fibsem-uint8","/d/jrc_a/jrc_a.zarr","recon-1/labels/groundtruth/crop234/[ecs,mito,nuc]"\n'


def test_parses_the_toolbox_format():
    (row,) = parse_datasplit(GOOD, "ds.csv")
    assert row.usage == "train" and row.crop_id == 234 and row.dataset == "jrc_a"
    assert row.classes == ["ecs", "mito", "nuc"]
    assert str(row.crop_group) == "/d/jrc_a/jrc_a.zarr/recon-1/labels/groundtruth/crop234"
    assert format_datasplit([row]) == GOOD


@pytest.mark.parametrize(
    "line, message",
    [
        ('"train","/d/a.zarr","recon-1/em/fibsem-uint8","/d/a.zarr"\n', "expected 5 fields"),
        (GOOD.replace('"train"', '"test"'), "usage must be"),
        (GOOD.replace("[ecs,mito,nuc]", "[ecs,mitochondria]"), "unknown class 'mitochondria'"),
        (GOOD.replace("/[ecs,mito,nuc]", ""), "last field must look like"),
        (GOOD.replace("[ecs,mito,nuc]", "[]"), "empty class list"),
        (GOOD.replace("jrc_a.zarr\",\"recon-1/em", "jrc_a\",\"recon-1/em"), "must end in .zarr"),
    ],
)
def test_malformed_rows_name_the_file_and_line(line, message):
    with pytest.raises(ReproError) as error:
        parse_datasplit(GOOD + line, "exp/datasplit.csv")
    assert message in str(error.value)
    assert "exp/datasplit.csv:2" in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ReproError, match="datasplit not found"):
        read_datasplit(tmp_path / "nope.csv")


def test_make_datasplit_is_reproducible_and_complete(tiny_dataset, tmp_path):
    data_root = tiny_dataset.parent.parent
    classes = ["ecs", "nuc", "ves"]
    first = make_datasplit(data_root, classes, validation_prob=0.5, seed=3)
    second = make_datasplit(data_root, classes, validation_prob=0.5, seed=3)
    assert format_datasplit(first) == format_datasplit(second)
    assert [r.crop_id for r in first] == [1, 2, 3]
    assert first[0].classes == ["ecs", "nuc"]  # crop 1 has no ves
    assert first[1].classes == ["ecs", "ves"]  # crop 2 has no nuc
    dropped = make_datasplit(data_root, classes, seed=3, force_all_classes=True)
    assert [r.crop_id for r in dropped] == [3]
    # as the toolbox: "validate" keeps crops lacking a class out of validation (and "train" out of training)
    complete_validation = make_datasplit(data_root, classes, validation_prob=1.0, seed=3, force_all_classes="validate")
    assert [r.usage for r in complete_validation] == ["train", "train", "validate"]
    complete_training = make_datasplit(data_root, classes, validation_prob=0.0, seed=3, force_all_classes="train")
    assert [r.usage for r in complete_training] == ["validate", "validate", "train"]
    out = tmp_path / "split.csv"
    write_datasplit(out, first)
    assert format_datasplit(read_datasplit(out)) == format_datasplit(first)


def test_different_seed_can_change_the_split(tiny_dataset):
    data_root = tiny_dataset.parent.parent
    usages = {tuple(r.usage for r in make_datasplit(data_root, ["ecs"], validation_prob=0.5, seed=s)) for s in range(12)}
    assert len(usages) > 1


@pytest.mark.parametrize("probability", [0.0, 0.15, 0.3, 0.5, 0.7])
def test_two_or_more_crops_always_give_a_validation_crop(tiny_dataset, probability):
    data_root = tiny_dataset.parent.parent
    draws = np.random.default_rng(13).random(3)  # 0.86, 0.86, 0.81: none below 0.7
    rows = make_datasplit(data_root, ["ecs"], validation_prob=probability, seed=13)
    assert [r.usage for r in rows].count("validate") == 1
    # the crop drawn closest to validation is the one moved there
    assert rows[int(np.argmin(draws))].usage == "validate"
    assert split_advice(rows, False) is None


def test_every_crop_drawn_for_validation_still_leaves_one_to_train_on(tiny_dataset):
    rows = make_datasplit(tiny_dataset.parent.parent, ["ecs"], validation_prob=1.0, seed=13)
    assert [r.usage for r in rows] == ["train", "validate", "validate"]  # crop 1 drew the highest


def test_advice_names_a_fix_that_works(tiny_dataset, tmp_path):
    data_root = tiny_dataset.parent.parent
    blocked = make_datasplit(data_root, ["ecs", "nuc", "ves"], validation_prob=0.5, seed=13, force_all_classes="validate")
    # crops 1 and 2 lack a class and may not validate; crop 3 is complete and drew 0.81
    assert [r.usage for r in blocked] == ["train", "train", "validate"]
    forced = make_datasplit(data_root, ["ecs", "golgi"], validation_prob=0.5, seed=13, force_all_classes="validate")
    advice = split_advice(forced, "validate")
    assert [r.usage for r in forced] == ["train"] * 3 and "no validate crop" in advice and "--force-all-classes false" in advice
    followed = make_datasplit(data_root, ["ecs", "golgi"], validation_prob=0.5, seed=13, force_all_classes=False)
    assert "validate" in [r.usage for r in followed] and split_advice(followed, False) is None
    one = tmp_path / "one" / "jrc_one" / "jrc_one.zarr"
    one.parent.mkdir(parents=True)
    shutil.copytree(tiny_dataset, one, ignore=lambda folder, names: [n for n in names if n in ("crop2", "crop3", "em")])
    single = make_datasplit(tmp_path / "one", ["ecs"])
    assert len(single) == 1 and "only one crop" in split_advice(single, False) and "cellmap-repro fetch" in split_advice(single, False)


def test_datasplit_and_tiny_crop_use_the_experiment_settings(fast_experiment, tiny_dataset, tmp_path, capsys):
    from cellmap_repro import cli, tiny_crop

    (fast_experiment / "data.py").write_text((fast_experiment / "data.py").read_text() + 'validation_prob = 0.9\nforce_all_classes = "validate"\n')
    out = tmp_path / "split.csv"
    assert cli.main(["datasplit", "-e", "fast", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation_prob 0.9 from data.py, force_all_classes 'validate' from data.py, seed 13" in printed
    # every tiny crop lacks golgi (a class of the fast experiment): none may validate
    assert {r.usage for r in read_datasplit(out)} == {"train"}
    assert "--force-all-classes false" in printed
    assert cli.main(["datasplit", "-e", "fast", "-o", str(out), "--force-all-classes", "false"]) == 0
    assert "force_all_classes False from --force-all-classes" in capsys.readouterr().out
    # all three drew below 0.9; the highest draw (crop 1) is moved to training
    assert [r.usage for r in read_datasplit(out)] == ["train", "validate", "validate"]
    path, described = tiny_crop.write_experiment_datasplit("fast", fast_experiment.parent, tiny_dataset)
    assert "from data.py" in described and {r.usage for r in read_datasplit(path)} == {"train"}
