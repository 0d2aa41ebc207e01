import pytest

from cellmap_repro.datasplit import format_datasplit, make_datasplit, parse_datasplit, read_datasplit, write_datasplit
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
    moved = make_datasplit(data_root, classes, validation_prob=0.0, seed=3, force_all_classes="validate")
    assert [r.usage for r in moved] == ["validate", "validate", "train"]
    out = tmp_path / "split.csv"
    write_datasplit(out, first)
    assert format_datasplit(read_datasplit(out)) == format_datasplit(first)


def test_different_seed_can_change_the_split(tiny_dataset):
    data_root = tiny_dataset.parent.parent
    usages = {tuple(r.usage for r in make_datasplit(data_root, ["ecs"], validation_prob=0.5, seed=s)) for s in range(12)}
    assert len(usages) > 1
