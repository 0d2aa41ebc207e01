"""`cellmap-repro gpu-check`: is the GPU usable by this image, and which GPU is it?

PyPI's torch 2.14.1 wheels are CUDA 13.0 builds and need an NVIDIA driver >= 580. The
check reads the driver and devices through NVML (nvidia-ml-py) and then asks torch, so
each failure gets its own message instead of a stack trace: no GPU or driver visible
(in a container: NVIDIA Container Toolkit missing, or the service started without GPUs),
a driver too old for the image's CUDA, or torch unable to initialise CUDA.

With ``CELLMAP_REPRO_REQUIRE_GPU=1`` (set for the GPU services in compose.yaml) the GPU
stages run this check first and stop with its message when it fails.
"""

from __future__ import annotations

import argparse
import os

from cellmap_repro.errors import ReproError

MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525}
GPU_STAGES = {"train", "predict", "verify", "smoke"}


def _nvml():
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ReproError(
            f"no NVIDIA driver visible ({exc}); on the host install the driver, in a container install the "
            "NVIDIA Container Toolkit and start the service with GPUs (compose.yaml reserves them)"
        ) from None
    return pynvml


def describe_gpus() -> list[dict]:
    """Model, driver, compute capability, SM count and memory of every visible GPU."""
    pynvml = _nvml()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                {
                    "index": index,
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "driver": driver,
                    "compute_capability": f"{major}.{minor}",
                    "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    "sm_count": _sm_count(index),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _sm_count(index: int) -> int | None:
    # NVML has no SM count; torch reports it (device order as torch sees it).
    import torch

    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return torch.cuda.get_device_properties(index).multi_processor_count
    return None


def preflight() -> list[dict]:
    import torch

    gpus = describe_gpus()
    if not gpus:
        raise ReproError("the NVIDIA driver is loaded but no GPU is visible (CUDA_VISIBLE_DEVICES or the container's device list excludes them)")
    if not torch.version.cuda:
        raise ReproError(f"torch {torch.__version__} is a CPU-only build: install the locked CUDA build (requirements.txt)")
    cuda_major = int(torch.version.cuda.split(".")[0])
    needed = MIN_DRIVER_FOR_CUDA.get(cuda_major)
    driver_major = int(gpus[0]["driver"].split(".")[0])
    if needed and driver_major < needed:
        raise ReproError(f"NVIDIA driver {gpus[0]['driver']} is too old for this image's CUDA {torch.version.cuda} (needs >= {needed}); update the host driver")
    if not torch.cuda.is_available():
        raise ReproError(f"torch {torch.__version__} cannot initialise CUDA {torch.version.cuda} although driver {gpus[0]['driver']} is visible")
    return gpus


def require_gpu_if_asked(stage: str | None) -> None:
    if stage in GPU_STAGES and os.environ.get("CELLMAP_REPRO_REQUIRE_GPU") == "1":
        preflight()


def run(args: argparse.Namespace) -> int:
    gpus = preflight()
    for gpu in gpus:
        print(f"GPU {gpu['index']}: {gpu['name']}, driver {gpu['driver']}, compute capability {gpu['compute_capability']}, {gpu['sm_count']} SMs, {gpu['memory_bytes'] / 2**30:.0f} GiB")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("gpu-check", help="check that the GPU, driver and CUDA fit this image", description=__doc__.split("\n\n")[0])
    parser.set_defaults(func=run)
