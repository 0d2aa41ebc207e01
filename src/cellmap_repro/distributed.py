"""Many processes, one run: torchrun starts them, DistributedDataParallel keeps them in step.

``cellmap-repro train --nproc N`` runs torchrun, PyTorch's launcher, as ``torchrun
--standalone --nproc-per-node=N -m cellmap_repro train ...`` would, and it starts N
training processes: one per GPU (``LOCAL_RANK``'s device, NCCL), or N CPU processes
(gloo) on a machine without GPUs. The run they train together is the single-process run, sharded by rank:

* **samples**: the global batch ``B`` (``batch_size``) and the stream of sample positions
  are the single-process run's. Rank ``r`` of ``W`` takes positions ``r, r+W, r+2W, ...``,
  so step ``s``'s global batch (positions ``sB .. sB+B-1``) is split into ``W``
  interleaved local batches of ``B/W``, whose union is exactly that batch. ``B`` must be
  divisible by ``W``.
* **loss**: the single-process loss is the mean over the *known* voxels of the global
  batch. DDP averages the ranks' gradients, and a mean of per-rank means would weigh a
  rank with few known voxels as much as one with many. So each rank divides its masked
  sum by the global known-voxel count (one all-reduce of a scalar per step) and
  multiplies it by ``W``, which DDP's averaging divides out again: the gradient is the
  global batch's. For ``W`` a power of two both scalings are exact.
* **validation**: sharded the same way; each batch's score is its global masked mean,
  so the score is the single-process one up to the order of floating-point sums.
* **BatchNorm**: batch statistics must be the global batch's. On GPUs BatchNorm layers
  become SyncBatchNorm (same parameters and state-dict keys, so checkpoints stay
  loadable in one process); PyTorch has no SyncBatchNorm on CPU, so there a model with
  BatchNorm is refused for more than one process.
* **outputs**: only rank 0 writes checkpoints (the plain model's state, no ``module.``
  prefixes), logs and the manifest, which records the world size and backend. The world
  size changes a run's bytes (other sums), so it is part of the config hash and a run
  resumes only with the world size it was started with.
* **cores**: by default each process gets ``cores // W`` torch threads and
  ``cores // W - 1`` loader workers (at least 0).

Every rank builds the model seeded identically and consumes its RNGs identically (same
local batch shape), so rank 0's RNG states in a checkpoint are every rank's; DDP also
broadcasts rank 0's parameters when it wraps the model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

from cellmap_repro.errors import ReproError

# Rank 0 alone hashes the data for the manifest while the other ranks wait in the first
# collective; hashing real crops can take long, longer than the default timeouts.
TIMEOUT = timedelta(hours=1)
NPROC_FLAG = "--nproc"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run's files."""
        return self.rank == 0

    def record(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


def launched() -> bool:
    """True in a process started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> World:
    """This process's place in the run (one process unless a process group is up)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size(), dist.get_backend())


@contextlib.contextmanager
def session():
    """The process group of a torchrun launch (nothing for one process), torn down after."""
    import torch
    import torch.distributed as dist

    from cellmap_repro.determinism import device

    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        yield World()
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = device().type == "cuda"
    if on_gpu:
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ReproError(f"{os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])} processes on this machine but {visible} GPU(s) visible: start one process per GPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=TIMEOUT)
    yield current()
    # Only on success: after a failure torchrun tears the group down, and waiting for
    # peers that are gone would hang.
    dist.destroy_process_group()


def device(world: World):
    """The device this rank trains on: its own GPU, or the CPU."""
    import torch

    from cellmap_repro.determinism import device as chosen

    base = chosen()
    if world.size == 1 or base.type != "cuda":
        return base
    return torch.device("cuda", world.local_rank)


def cores(world: World) -> int:
    """This process's share of the machine's cores."""
    from cellmap_repro.determinism import available_cores

    return max(1, available_cores() // world.size)


def local_batch(batch_size: int, world: World) -> int:
    if batch_size % world.size:
        raise ReproError(f"batch_size {batch_size} cannot be split over {world.size} processes: use a batch size divisible by {world.size}, or another process count")
    return batch_size // world.size


def config_hash_extra(world: World) -> dict:
    """What the world size adds to the config hash (nothing for one process: older runs keep their hash)."""
    return {"world_size": world.size} if world.size > 1 else {}


def check_resume(recorded: dict, world: World, checkpoints_dir) -> None:
    """A run resumes with the world size it started with: another one changes its bytes."""
    was = int((recorded.get("distributed") or {}).get("world_size", 1))
    if was != world.size:
        raise ReproError(
            f"{checkpoints_dir} holds a run trained by {_processes(was)}, this one has {_processes(world.size)}: "
            f"resume it with {NPROC_FLAG} {was} (make: GPUS={was}), or --overwrite to start again (the process count changes the run's bytes)"
        )


def _processes(count: int) -> str:
    return f"{count} process{'es' if count != 1 else ''}"


def prepare(model, device, world: World):
    """The model ready to be trained by ``world``: BatchNorm synchronised across ranks."""
    import torch

    if world.size == 1 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        raise ReproError(
            f"the model has BatchNorm layers, whose statistics must be the global batch's: PyTorch synchronises them (SyncBatchNorm) "
            f"only on GPUs, so on the CPU train this experiment in one process, not {world.size}"
        )
    # Same parameter objects (the optimizer keeps pointing at them), same state-dict keys.
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model, device, world: World):
    """The module the training step calls: ``model`` itself, or ``model`` under DDP."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def global_masked_mean(total, count, world: World | None):
    """The loss each rank backpropagates for the global batch's mean over known voxels.

    One process: ``total / count``. ``W`` processes: ``W * total / global count``, so that
    DDP's average of the ranks' gradients is the gradient of the global masked mean.
    """
    import torch
    import torch.distributed as dist

    if world is None or world.size == 1:
        return total / count.clamp(min=1)
    counts = count.to(torch.float64)  # exact: voxel counts outgrow float32's 2**24
    dist.all_reduce(counts)
    return total * world.size / counts.clamp(min=1).to(total.dtype)


def mean_over_ranks(values, world: World | None):
    """The global value of per-rank losses from :func:`global_masked_mean` (for logging and validation)."""
    import torch.distributed as dist

    if world is None or world.size == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / world.size


def restore_rng_states(states: dict, device) -> None:
    """Every RNG as rank 0 saved it; this rank's GPU gets the state of rank 0's GPU."""
    import torch

    from cellmap_repro.determinism import restore_rng_states as restore

    restore(states)
    if device.type == "cuda" and device.index and states.get("cuda"):
        torch.cuda.set_rng_state(states["cuda"][0], device)


def torchrun_arguments(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for this same command line, without the process-count flag."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == NPROC_FLAG:
            skip = True
        elif not arg.startswith(NPROC_FLAG + "="):
            rest.append(arg)
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "cellmap_repro", *rest]


def relaunch_if_asked(nproc: int | None, argv: list[str]) -> int | None:
    """Run this command as ``nproc`` processes through torchrun and return their exit status.

    None (nothing launched) for one process, or inside a launch: then train here.
    """
    if nproc is None:
        return None
    if nproc < 1:
        raise ReproError(f"{NPROC_FLAG} must be 1 or more, not {nproc}")
    if launched():
        started = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if nproc != started:
            raise ReproError(f"{NPROC_FLAG} {nproc} inside a torchrun launch of {started} processes")
        return None
    return launch(nproc, argv) if nproc > 1 else None


def launch(nproc: int, argv: list[str]) -> int:
    """torchrun, run in this process (its own ``run``, what the ``torchrun`` script calls).

    Its workers print their own errors; instead of torchrun's traceback this says in one
    line which process failed first, and exits with that process's status (2 for a
    cellmap-repro error, 128 + the signal for a killed one).
    """
    import logging

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from cellmap_repro.determinism import device

    if device().type == "cuda" and nproc > torch.cuda.device_count():
        raise ReproError(f"{nproc} processes need {nproc} GPUs, {torch.cuda.device_count()} visible: one process per GPU")
    arguments = torchrun_arguments(nproc, argv)
    # each process's share of the cores (torchrun would set 1, with a warning)
    os.environ.setdefault("OMP_NUM_THREADS", str(cores(World(size=nproc))))
    print(f"cellmap-repro: torchrun {' '.join(arguments)}", file=sys.stderr, flush=True)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(parse_args(arguments))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit {failure.exitcode}"
        print(f"cellmap-repro: error: the training process of rank {rank} (of {nproc}) failed first ({how}); the processes' messages are above", file=sys.stderr)
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    except SignalException as stopped:  # SIGTERM/SIGINT to the launcher: torchrun has stopped the processes
        print(f"cellmap-repro: stopped by {stopped.sigval.name}; continue with --resume", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0
