"""storage.confined: the one gate for paths that come from data (S3 keys, manifest fields, zarr level paths)."""

import pytest

from cellmap_repro.errors import ReproError
from cellmap_repro.storage import confined


@pytest.mark.parametrize("relative", ["s0", "jrc_tiny-1/jrc_tiny-1.zarr/recon-1/em/fibsem-uint8/s0/.zarray", "a//b", "./s0", "crop1/..data"])
def test_paths_inside_are_joined(tmp_path, relative):
    assert confined(tmp_path, relative, "key") == tmp_path / relative


@pytest.mark.parametrize("relative", ["", " ", "/etc/passwd", "\\share\\x", "..", "a/../b", "a/b/../../..", "a\\..\\..\\b", "a/\0"])
def test_paths_leaving_or_unusable_are_refused_naming_what_value_and_base(tmp_path, relative):
    with pytest.raises(ReproError) as refused:
        confined(tmp_path, relative, "test-crop manifest: dataset")
    assert str(refused.value) == f"test-crop manifest: dataset {relative!r} is not a path inside {tmp_path}; refused"


@pytest.mark.parametrize("relative", ["a/b", ".", "a\\b"])
def test_plain_takes_one_name_only(tmp_path, relative):
    assert confined(tmp_path, "jrc_tiny-1", "dataset", plain=True) == tmp_path / "jrc_tiny-1"
    with pytest.raises(ReproError, match="is not a plain name inside"):
        confined(tmp_path, relative, "dataset", plain=True)


def test_a_folder_the_user_linked_in_is_inside(tmp_path):
    # Data chooses only the text; a dataset linked in from other storage is the user's choice.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "jrc_tiny-1").symlink_to(tmp_path / "elsewhere")
    assert confined(tmp_path / "data", "jrc_tiny-1/x", "key").resolve() == tmp_path / "elsewhere" / "x"
