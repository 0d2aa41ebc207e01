"""A read-only installation (an Apptainer image, a shared site-wide venv) is enough.

The installed environment (the interpreter's prefix, site-packages, and the project's own
code) is mounted read-only in a private mount namespace (`unshare`, a user namespace
where not root), as HPC container images are; then the weights go into the cache, the
setup04 network is loaded from it, and the fast experiment trains and predicts. Any
write into the installation fails there with EROFS, even as root.
"""

import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import cellmap_repro
from conftest import REPO


def installed_paths() -> list[str]:
    paths = {sys.prefix, sys.base_prefix, *site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(Path(cellmap_repro.__file__).parent)}
    resolved = {str(Path(p).resolve()) for p in paths if Path(p).is_dir()}
    # a folder inside another read-only one needs no mount of its own
    return sorted(p for p in resolved if not any(p != q and p.startswith(q + "/") for q in resolved))


# Mount each argument up to "--" read-only onto itself, check that it refuses a write,
# then run the rest.
READ_ONLY = textwrap.dedent(
    """
    while [ "$1" != -- ]; do
      mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"
      if touch "$1/.cellmap-repro-write-probe" 2>/dev/null; then rm -f "$1/.cellmap-repro-write-probe"; echo "still writable: $1"; exit 97; fi
      shift
    done
    shift
    exec "$@"
    """
)


def run_read_only(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-ec", READ_ONLY, "sh", *installed_paths(), "--", *command],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def read_only_works():
    probe = run_read_only(["true"], cwd=REPO)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount namespace here (unshare: {probe.stderr.strip() or probe.stdout.strip()})")


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cellmap_repro.cli import main
    from cellmap_repro.model import load_pretrained

    source, cache = sys.argv[1], sys.argv[2]
    assert main(["weights", "--weights", cache, "--from", source]) == 0
    network = load_pretrained(weights_dir=Path(cache), download=False)
    print("setup04 parameters:", sum(p.numel() for p in network.parameters()))
    del network
    fast = ["-e", "fast", "--epochs", "1", "--iterations-per-epoch", "2", "--batch-size", "1", "--validation-batches", "1"]
    assert main(["train", *fast]) == 0
    assert main(["predict", "-e", "fast"]) == 0
    print("read-only run done")
    """
)


def test_weights_setup04_train_and_predict_with_the_installation_read_only(read_only_works, fast_experiment, setup04_data, tmp_path):
    cache = tmp_path / "cache"
    weights = setup04_data / "weights" / "cosem" / "setup04" / "1820500.pth"
    result = run_read_only([sys.executable, "-c", SCRIPT, str(weights), str(cache)], cwd=tmp_path, env={"CELLMAP_REPRO_DATA": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "setup04 parameters: 234967826" in result.stdout and "read-only run done" in result.stdout
    assert (cache / "cosem" / "setup04" / "1820500.pth").stat().st_size == weights.stat().st_size
    assert (fast_experiment / "checkpoints" / "best.pth").exists()
    assert list((tmp_path / "data" / "predictions" / "fast").rglob("s0/.zarray"))


def test_the_namespace_really_refuses_writes(read_only_works, tmp_path):
    """The test above can fail: a write into site-packages is refused in the namespace."""
    target = Path(sysconfig.get_paths()["purelib"]).resolve() / "cellmap_repro_write_probe.txt"
    result = run_read_only([sys.executable, "-c", f"open({str(target)!r}, 'w')"], cwd=tmp_path)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert not target.exists()
