"""The lock files agree with pyproject.toml and with each other, and pin everything by hash."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def locked(path: Path) -> dict[str, dict]:
    """name -> {"version", "hashes"} from a `uv pip compile --generate-hashes` file."""
    entries: dict[str, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if match:
            current = entries.setdefault(normalise(match.group(1)), {"version": match.group(3), "hashes": 0})
        elif current and "--hash=sha256:" in line:
            current["hashes"] += 1
        elif line and not line.startswith((" ", "#")):
            raise AssertionError(f"{path.name}: unpinned line {line!r}")
    return entries


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)$", requirement)
        assert match, f"pyproject dependency not pinned with ==: {requirement}"
        pins[normalise(match.group(1))] = match.group(3)
    return pins


def test_lock_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = locked(REPO / "requirements.txt")
    dev = locked(REPO / "requirements-dev.txt")
    for name, version in direct(project["dependencies"]).items():
        assert name in runtime, f"{name} is in pyproject.toml but not in requirements.txt: run `make lock`"
        assert runtime[name]["version"] == version, f"{name}: pyproject {version}, lock {runtime[name]['version']}: run `make lock`"
    for name, version in direct(project["optional-dependencies"]["test"]).items():
        assert dev.get(name, {}).get("version") == version, f"{name}=={version} missing from requirements-dev.txt: run `make lock`"


def test_every_locked_requirement_has_hashes_and_dev_extends_runtime():
    runtime = locked(REPO / "requirements.txt")
    dev = locked(REPO / "requirements-dev.txt")
    assert len(runtime) > 50
    for name, entry in {**runtime, **dev}.items():
        assert entry["hashes"] > 0, f"{name} has no hash"
    for name, entry in runtime.items():
        assert dev[name]["version"] == entry["version"], f"{name} differs between the runtime and dev locks"


def applicable(path: Path, environment: dict | None = None) -> dict[str, str]:
    """name -> version of the lock entries whose markers hold in ``environment``."""
    from packaging.markers import Marker

    chosen: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)\s*(?:;\s*(.+?))?\s*\\?$", line)
        if match and (match.group(4) is None or Marker(match.group(4)).evaluate(environment)):
            name = normalise(match.group(1))
            assert name not in chosen, f"{path.name}: two versions of {name} apply to {environment}"
            chosen[name] = match.group(3)
    return chosen


def test_lock_gives_one_version_of_everything_on_both_image_pythons():
    # Debian bookworm bases have Python 3.11, the Ubuntu 24.04 CUDA base 3.12.
    for version in ("3.11.2", "3.12.3"):
        environment = {"python_version": version[:4], "python_full_version": version, "sys_platform": "linux",
                       "platform_machine": "x86_64", "platform_system": "Linux", "implementation_name": "cpython",
                       "platform_python_implementation": "CPython", "os_name": "posix"}
        chosen = applicable(REPO / "requirements.txt", environment)
        assert {"torch", "cuda-bindings", "nvidia-cudnn-cu13", "numpy"} <= set(chosen)


def test_this_environment_has_the_locked_versions():
    """`make install` installs exactly the lock (the test tools' lock, a superset)."""
    import importlib.metadata as metadata

    wrong = {}
    for name, version in applicable(REPO / "requirements-dev.txt").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements-dev.txt (locked, installed): {wrong}; run `make install`"
