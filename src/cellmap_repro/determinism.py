"""Deterministic execution: one seed, fixed threads, deterministic kernels.

What makes a run bit-for-bit repeatable here:

* every RNG (Python, NumPy, torch CPU and CUDA) seeded from the run seed;
* each training sample's augmentation drawn from torch's RNG reseeded from
  ``(seed, sample position)`` just before the sample is read (cellmap-data draws its
  spatial augmentations from torch's global RNG), so results depend neither on the
  number of loader workers nor on where a run was interrupted and resumed;
* ``torch.use_deterministic_algorithms(True)``: an op without a deterministic kernel
  raises instead of silently varying; cuDNN benchmark off (its timing-based algorithm
  choice varies between runs); ``CUBLAS_WORKSPACE_CONFIG`` set before CUDA initialises;
* TF32 (cuDNN convolutions, cuBLAS matmuls) stays on by default, as PyTorch's default
  and the baseline had it: it rounds inputs to a 10-bit mantissa, but the same kernel on
  the same hardware rounds the same way every time, so it costs no reproducibility,
  only agreement with strict FP32 (``allow_tf32 = False`` / ``--no-tf32``: several times
  slower convolutions). Both settings are recorded in the manifest;
* a fixed intra-op thread count (results on CPU change with it), recorded in the manifest.
"""

from __future__ import annotations

import os
import re
import random

import numpy as np

CUBLAS_WORKSPACE = ":4096:8"


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def configure(seed: int, threads: int, deterministic: bool = True, allow_tf32: bool = True) -> None:
    # cuBLAS reads this once, when the CUDA context is created.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic and torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def derived_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for a (seed, keys...) tuple, e.g. a sample position."""
    high, low = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


def rng_states() -> dict:
    """Every RNG's state, in types ``torch.load(weights_only=True)`` accepts."""
    import torch

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    states = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def device():
    """CUDA when a GPU is usable (and not disabled with CELLMAP_REPRO_DEVICE=cpu), else CPU."""
    import torch

    wanted = os.environ.get("CELLMAP_REPRO_DEVICE", "").strip() or "auto"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", wanted):
        from cellmap_repro.errors import ReproError

        raise ReproError(f"CELLMAP_REPRO_DEVICE must be auto, cpu, cuda or cuda:<index>, got {wanted!r}")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if wanted == "auto" else wanted)


def flags() -> dict:
    """The settings that decide determinism, for the run manifest."""
    import torch

    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "num_threads": torch.get_num_threads(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
    }
