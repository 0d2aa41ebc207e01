"""The container files, checked without Docker: pinning in the Dockerfile, the build
context, one definition per command in the Makefile, the compose services as Compose
resolves them, and the GPU preflight's messages."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import REPO

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
COMPOSE = Path(sys.executable).parent / "docker-compose"
GPU_SERVICES = {"train", "predict", "verify"}

# The CLI contract: make target -> (compose service, CLI words after the runner).
STAGES = {
    "smoke": ("train", "smoke --flag"),
    "tiny-crop": ("train", "tiny-crop -e exp_x --flag"),
    "download": ("download", "fetch --flag"),
    "datasplit": ("train", "datasplit -e exp_x --flag"),
    "train": ("train", "train -e exp_x --flag"),
    "predict": ("predict", "predict -e exp_x --flag"),
    "process": ("process", "process -e exp_x --flag"),
    "evaluate": ("evaluate", "evaluate -e exp_x --flag"),
    "pack": ("process", "pack -e exp_x --flag"),
    "verify": ("verify", "verify -e exp_x --flag"),
    "gpu-check": ("train", "gpu-check"),
}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (REPO / "docker" / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest))
            pending = ""
    return instructions


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value)
    return defaults


def test_every_from_is_pinned_by_digest_and_the_label_digest_matches():
    defaults = arg_defaults()
    bases = [rest.split()[0] for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert bases
    for base in bases:
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), ""), base)
        assert DIGEST.search(resolved), f"FROM {base} resolves to {resolved!r}, not pinned by digest"
    assert defaults["BASE_IMAGE"].endswith("@" + defaults["BASE_DIGEST"])


def test_packages_come_only_from_the_hash_lock_and_the_os_is_not_upgraded():
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    pip_installs = [run for run in runs if re.search(r"\bpip3? install\b", run)]
    assert pip_installs
    for run in pip_installs:
        for flag in ("--require-hashes", "--no-deps", "-r /tmp/requirements.txt"):
            assert flag in run, f"pip install without {flag}: {run}"
    copies = [rest for keyword, rest in dockerfile_instructions() if keyword == "COPY"]
    assert "requirements.txt /tmp/requirements.txt" in copies
    for run in runs:
        assert not re.search(r"apt(-get)? +(\S+ +)*(dist-|full-)?upgrade", run), f"OS upgrade in {run}"
        if re.search(r"apt-get\b.*\binstall\b", run):
            assert "--no-install-recommends" in run


def test_extra_ca_is_only_a_build_secret():
    for keyword, rest in dockerfile_instructions():
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.(crt|pem)\b|\bca\b", rest), f"{keyword} {rest} would bake a certificate into the image"
        if "extra_ca" in rest:
            assert keyword == "RUN" and "--mount=type=secret,id=extra_ca" in rest


def test_image_runs_the_cli_as_the_build_users_uid_with_deterministic_settings():
    instructions = dockerfile_instructions()
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] == "${UID}:${GID}"
    entrypoint = json.loads([rest for keyword, rest in instructions if keyword == "ENTRYPOINT"][-1])
    assert entrypoint == ["python", "-m", "cellmap_repro"]
    environment = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "PYTHONHASHSEED=0" in environment
    assert re.search(r"CUBLAS_WORKSPACE_CONFIG=:(4096|16):8", environment)
    labels = " ".join(rest for keyword, rest in instructions if keyword == "LABEL")
    for key in ("source", "revision", "base.name", "base.digest"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert "lock-sha256=" in labels


def test_build_context_leaves_out_data_checkpoints_logs_and_the_venv(tmp_path):
    from docker.utils.build import exclude_paths

    wanted = ["pyproject.toml", "README.md", "requirements.txt", "src/cellmap_repro/cli.py",
              "experiments/setup_04_all/model.py", "experiments/setup_04_all/datasplit.csv"]
    unwanted = ["data/jrc_tiny-1/jrc_tiny-1.zarr/.zgroup", "data/weights/cosem/setup04/1820500.pth",
                "experiments/setup_04_all/checkpoints/best.pth",
                "experiments/setup_04_all/logs/tensorboard/run/events.out.tfevents.1",
                "experiments/.tensorboard/setup_04_all/events.out.tfevents.1",
                ".venv/bin/python", ".git/HEAD", "src/cellmap_repro/__pycache__/cli.cpython-311.pyc",
                "src/cellmap_repro.egg-info/PKG-INFO", ".env"]
    for name in wanted + unwanted:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = set(exclude_paths(str(tmp_path), patterns, dockerfile="docker/Dockerfile"))
    assert set(wanted) <= context
    assert not set(unwanted) & context


def make(*args: str, path_prefix: Path | None = None) -> str:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RUNNER", "EXP", "ARGS", "DOCKER", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    if path_prefix:
        environment["PATH"] = f"{path_prefix}{os.pathsep}{environment['PATH']}"
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("target", sorted(STAGES))
def test_each_target_runs_one_command_natively_or_in_its_compose_service(target):
    service, words = STAGES[target]
    common = ["-n", "-o", ".venv/.installed", "EXP=exp_x", "ARGS=--flag", "DOCKER=true", target]
    native = make("RUNNER=local", *common).strip().splitlines()[-1]
    container = make("RUNNER=docker", *common).strip().splitlines()[-1]
    assert native.split() == [".venv/bin/cellmap-repro", *words.split()]
    assert container.split() == ["docker", "compose", "run", "--rm", service, *words.split()]


def test_runner_is_docker_only_when_an_engine_answers(tmp_path):
    for answers, expected in ((True, "RUNNER=docker"), (False, "RUNNER=local")):
        fake = tmp_path / ("up" if answers else "down")
        fake.mkdir()
        (fake / "docker").write_text(f"#!/bin/sh\nexit {0 if answers else 1}\n")
        (fake / "docker").chmod(stat.S_IRWXU)
        assert expected in make("help", path_prefix=fake)


def compose_config(tmp_path, *files: str, **variables: str) -> dict:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **variables}
    command = [str(COMPOSE), "--project-directory", str(REPO), "--env-file", str(env_file)]
    for name in files:
        command += ["-f", str(REPO / name)]
    result = subprocess.run([*command, "config", "--format", "json"], env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_services_mount_the_host_folders_and_reserve_gpus(tmp_path):
    config = compose_config(tmp_path, "compose.yaml", EXP="exp_x", SEED="13")
    services = config["services"]
    assert set(services) == {"download", "train", "predict", "process", "evaluate", "verify", "tensorboard"}
    for name, service in services.items():
        mounts = {volume["target"]: volume for volume in service["volumes"]}
        assert mounts["/workspace/data"]["source"] == str(REPO / "data")
        assert mounts["/workspace/experiments"]["source"] == str(REPO / "experiments")
        assert mounts["/workspace/.cache"]["type"] == "volume"
        assert service["working_dir"] == "/workspace"
        assert int(service["shm_size"]) >= 2**30
        assert service["environment"]["EXP"] == "exp_x" and service["environment"]["SEED"] == "13"
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_SERVICES:
            assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
            assert service["environment"]["CELLMAP_REPRO_REQUIRE_GPU"] == "1"
            assert service["command"][-2:] == ["-e", "exp_x"]
        else:
            assert not devices
        # unset build arguments leave the Dockerfile's pinned base in charge
        assert "BASE_IMAGE" not in service["build"]["args"]


def test_gpu_services_run_on_a_read_only_image_with_a_private_tmp(tmp_path):
    # what the container smoke (train service) then proves works: nothing writes into the image
    for files in (("compose.yaml",), ("compose.yaml", "compose.cpu.yaml")):
        services = compose_config(tmp_path, *files)["services"]
        for name in GPU_SERVICES:
            assert services[name].get("read_only") is True, (files, name)
            assert "/tmp" in services[name].get("tmpfs", []), (files, name)


def test_tensorboard_is_published_on_loopback_only(tmp_path):
    service = compose_config(tmp_path, "compose.yaml")["services"]["tensorboard"]
    assert service["command"][:3] == ["tensorboard", "--host", "0.0.0.0"]
    [port] = service["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "6006", 6006)


def test_cpu_override_drops_gpu_reservations_and_the_preflight(tmp_path):
    services = compose_config(tmp_path, "compose.yaml", "compose.cpu.yaml", BASE_IMAGE="local/debian:bookworm")["services"]
    for name in GPU_SERVICES:
        assert "deploy" not in services[name] or not services[name]["deploy"].get("resources")
        assert services[name]["environment"]["CELLMAP_REPRO_REQUIRE_GPU"] == "0"
    assert services["train"]["build"]["args"]["BASE_IMAGE"] == "local/debian:bookworm"


def test_env_example_names_only_settings_that_are_used():
    used = (REPO / "compose.yaml").read_text() + (REPO / "Makefile").read_text()
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            assert match.group(1) in used, f".env.example sets {match.group(1)}, which nothing reads"
            # build arguments shown with the Dockerfile's defaults must show them exactly
            if match.group(1) in ("BASE_IMAGE", "BASE_DIGEST", "APT_SNAPSHOT"):
                assert match.group(2) == arg_defaults()[match.group(1)]


# ---------------------------------------------------------------- GPU preflight


class FakeNVML(types.ModuleType):
    """pynvml with one configurable GPU, or no driver at all."""

    class NVMLError(Exception):
        """pynvml's one error type."""

    def __init__(self, driver: str | None, name: str = "NVIDIA H100 80GB HBM3"):
        super().__init__("pynvml")
        self.driver, self.name = driver, name

    def nvmlInit(self):
        if self.driver is None:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        """Nothing to release in the fake."""

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return 9, 0

    def nvmlDeviceGetName(self, handle):
        return self.name

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=80 * 2**30)


@pytest.fixture
def gpu_host(monkeypatch):
    """Install a fake driver and a torch that reports CUDA 13.0; returns a setter."""
    import torch

    def configure(driver, cuda_usable=True):
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(driver))
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_usable)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda_usable else 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(multi_processor_count=132))

    return configure


def gpu_check(capsys, *argv) -> tuple[int, str, str]:
    from cellmap_repro.cli import main

    code = main(list(argv) or ["gpu-check"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("driver", "cuda_usable", "expected"),
    [
        (None, True, "NVIDIA Container Toolkit"),
        ("535.104.05", True, "driver 535.104.05 is too old for this image's CUDA 13.0 (needs >= 580)"),
        ("580.65.06", False, "cannot initialise CUDA 13.0"),
    ],
)
def test_gpu_check_explains_each_failure_in_one_line(gpu_host, capsys, driver, cuda_usable, expected):
    gpu_host(driver, cuda_usable)
    code, out, err = gpu_check(capsys)
    assert code == 2
    assert err.startswith("cellmap-repro: error:") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_gpu_check_reports_model_and_driver(gpu_host, capsys):
    gpu_host("580.65.06")
    code, out, err = gpu_check(capsys)
    assert code == 0
    assert "NVIDIA H100 80GB HBM3, driver 580.65.06, compute capability 9.0, 132 SMs, 80 GiB" in out


def test_gpu_stages_stop_before_running_when_the_preflight_fails(gpu_host, capsys, monkeypatch, tmp_path):
    gpu_host("535.104.05")
    monkeypatch.setenv("CELLMAP_REPRO_REQUIRE_GPU", "1")
    code, out, err = gpu_check(capsys, "train", "-e", "no_such_experiment", "--experiments-root", str(tmp_path))
    # the preflight's message, not the missing experiment's
    assert code == 2 and "too old" in err
    monkeypatch.setenv("CELLMAP_REPRO_REQUIRE_GPU", "0")
    code, out, err = gpu_check(capsys, "train", "-e", "no_such_experiment", "--experiments-root", str(tmp_path))
    assert code == 2 and "too old" not in err
