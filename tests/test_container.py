"""The built image: installed distributions equal the lock, labels carry the lock hash.

Needs a Docker engine and the image (`make image`); skipped otherwise. CI builds the
image before running the tests.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from test_lock import normalise

IMAGE = os.environ.get("IMAGE", "cellmap-repro:latest")
pytestmark = pytest.mark.docker


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image():
    if shutil.which("docker") is None or docker("info").returncode != 0:
        pytest.skip("no Docker engine")
    if docker("image", "inspect", IMAGE).returncode != 0:
        pytest.skip(f"image {IMAGE} not built (make image)")
    return IMAGE


def run_in(image: str, *command: str) -> str:
    result = docker("run", "--rm", "--entrypoint", command[0], image, *command[1:])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_installed_distributions_equal_the_lock(image):
    from packaging.markers import Marker

    environment = json.loads(run_in(image, "python", "-c", "import json, platform, sys; print(json.dumps({'python_version': '%d.%d' % sys.version_info[:2], 'python_full_version': platform.python_version(), 'sys_platform': sys.platform, 'platform_machine': platform.machine(), 'platform_system': platform.system(), 'implementation_name': sys.implementation.name, 'platform_python_implementation': platform.python_implementation()}))"))
    expected = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)\s*(?:;\s*(.+?))?\s*\\?$", line)
        if match and (match.group(4) is None or Marker(match.group(4)).evaluate(environment)):
            expected[normalise(match.group(1))] = match.group(3)
    installed = {}
    for line in run_in(image, "pip", "list", "--format=freeze", "--disable-pip-version-check").splitlines():
        name, _, version = line.partition("==")
        installed[normalise(name)] = version
    for tool in ("pip", "setuptools", "wheel"):
        installed.pop(tool, None)
        expected.pop(tool, None)
    assert installed == expected


def test_labels_record_the_lock_and_revision(image):
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout)
    assert labels["io.cellmap-repro.lock-sha256"] == hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()
    assert labels["org.opencontainers.image.revision"] not in ("", None)
    assert labels["org.opencontainers.image.base.name"]


def test_cli_is_the_entrypoint_and_gpu_check_explains(image):
    help_text = docker("run", "--rm", image, "--help")
    assert help_text.returncode == 0 and "cellmap-repro" in help_text.stdout
    check = docker("run", "--rm", image, "gpu-check")
    assert check.returncode == 2 and "cellmap-repro: error:" in check.stderr and "Traceback" not in check.stderr
