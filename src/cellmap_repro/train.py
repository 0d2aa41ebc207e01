"""`cellmap-repro train`: train an experiment, resumable and bit-for-bit repeatable.

The loop is deliberately small; data, checkpoints, logs, determinism and the run
manifest each live in their own module. Loss: the experiment's criterion (BCE with
logits) per voxel with ``pos_weight`` = background/foreground ratio per class, averaged
over the voxels whose target is known (NaN = unknown, see true-negative masking).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from cellmap_repro import checkpoint, determinism, distributed, manifest, settings
from cellmap_repro.errors import ReproError

# Fault injection for `verify` and the tests: SIGKILL this process right after the
# optimizer step of the given iteration, as a crash or a killed job would.
KILL_AT_ENV = "CELLMAP_REPRO_SIGKILL_AT_ITERATION"


@dataclass
class Overrides:
    """Command-line changes to the experiment's training settings (recorded in the manifest)."""

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    batch_size: int | None = None
    validation_batches: int | None = None
    seed: int | None = None
    checkpoint_every: int | None = None
    num_workers: int | None = None
    augment_device: str | None = None
    allow_tf32: bool | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def result_deciding(self) -> dict:
        """The overrides that can change a run's bytes (the worker count cannot)."""
        return {k: v for k, v in self.as_dict().items() if k != "num_workers"}


@dataclass
class Settings:
    epochs: int
    iterations_per_epoch: int
    batch_size: int
    validation_batches: int
    seed: int
    checkpoint_every: int
    num_workers: int
    threads: int
    augment_device: str = "cpu"
    allow_tf32: bool = True

    @classmethod
    def resolve(cls, config, overrides: Overrides, threads: int, seed: int, processes: int = 1) -> "Settings":
        pick = lambda name: getattr(overrides, name) if getattr(overrides, name) is not None else getattr(config, name)  # noqa: E731
        iterations = pick("iterations_per_epoch")
        return cls(
            epochs=pick("epochs"),
            iterations_per_epoch=iterations,
            batch_size=pick("batch_size"),
            validation_batches=pick("validation_batches"),
            seed=seed,
            checkpoint_every=overrides.checkpoint_every or min(100, iterations),
            num_workers=_workers(pick("num_workers"), processes),
            threads=threads,
            augment_device=overrides.augment_device or "cpu",
            allow_tf32=pick("allow_tf32"),
        )


def _workers(configured: int | None, processes: int) -> int:
    from cellmap_repro.data import default_workers

    return default_workers(processes) if configured is None else configured


@dataclass
class TrainResult:
    iteration: int
    epoch: int
    checkpoints_dir: Path
    tensorboard_dir: Path
    manifest_path: Path
    checkpoint_hashes: dict = field(default_factory=dict)


def masked_loss(criterion, logits, target, world=None):
    """Mean loss over known voxels; NaN targets (unknown) contribute nothing.

    With several processes, the global batch's mean (see distributed.global_masked_mean).
    """
    import torch

    known = ~torch.isnan(target)
    per_voxel = criterion(logits, torch.nan_to_num(target, nan=0.0))
    if per_voxel.shape != logits.shape:
        raise ReproError(f"the criterion returned shape {tuple(per_voxel.shape)} for logits of shape {tuple(logits.shape)}: it must honour reduction='none' (per-voxel losses) for masking")
    return distributed.global_masked_mean((per_voxel * known).sum(), known.sum(), world)


def make_criterion(config, class_weights: dict[str, float]):
    import torch

    # Per-voxel values always (checked at load: no other reduction is accepted), so that
    # masked_loss can leave the unknown voxels out.
    kwargs = {**config.criterion_kwargs, "reduction": "none"}
    if config.weight_loss:
        weights = torch.tensor([class_weights.get(c, 1.0) for c in config.classes], dtype=torch.float32)
        kwargs["pos_weight"] = weights.view(-1, 1, 1, 1)
    return config.criterion(**kwargs)


def _refuse_bad_start(checkpoints_dir: Path, resume: bool, overwrite: bool) -> None:
    existing = any(checkpoints_dir.glob("*.pth")) if checkpoints_dir.exists() else False
    if existing and not resume and not overwrite:
        raise ReproError(
            f"{checkpoints_dir} already holds checkpoints; pass --resume to continue that run or --overwrite to start again"
        )
    if resume and not (checkpoints_dir / manifest.MANIFEST_NAME).exists():
        raise ReproError(f"nothing to resume: no run was started in {checkpoints_dir}")


def _clear_previous_run(checkpoints_dir: Path, tensorboard_run: Path) -> None:
    if checkpoints_dir.exists():
        for path in sorted(checkpoints_dir.glob("*.pth")) + sorted(checkpoints_dir.glob("*.sha256")) + [checkpoints_dir / manifest.MANIFEST_NAME]:
            if path.exists():
                path.unlink()
    # A new run's curves must not mix with the old run's.
    shutil.rmtree(tensorboard_run, ignore_errors=True)


def train(
    experiment_name: str,
    experiments_root=None,
    overrides: Overrides | None = None,
    resume: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> TrainResult:
    import torch
    from tqdm import tqdm

    from cellmap_repro import data as data_module
    from cellmap_repro.experiment import experiment_checkpoints_dir, experiment_dir, load_experiment, run_seed
    from cellmap_repro.runlog import NoLog, RunLog

    overrides = overrides or Overrides()
    world = distributed.current()
    explicit_threads = threads or (int(os.environ["CELLMAP_REPRO_THREADS"]) if os.environ.get("CELLMAP_REPRO_THREADS") else None)
    torch.set_num_threads(explicit_threads or distributed.cores(world))
    # Checked before the config is loaded: loading builds the model, which may download weights.
    checkpoints_dir = experiment_checkpoints_dir(experiment_name, experiments_root)
    if world.main:  # the other ranks stop with it when it fails (torchrun ends the group)
        _refuse_bad_start(checkpoints_dir, resume, overwrite)
    seed = run_seed(experiment_dir(experiment_name, experiments_root), overrides.seed)
    experiment = load_experiment(experiment_name, experiments_root, parts=("train_config",), seed=seed)
    config = experiment.train
    run = Settings.resolve(config, overrides, explicit_threads or config.num_threads or distributed.cores(world), seed, world.size)
    distributed.local_batch(run.batch_size, world)  # refuses a batch that does not split over the ranks
    device = distributed.device(world)
    if run.augment_device == "cuda" and device.type != "cuda":
        raise ReproError("--augment-device cuda needs a GPU, and this run trains on the CPU")
    if overwrite and not resume and world.main:
        _clear_previous_run(checkpoints_dir, experiment.logs_dir / "tensorboard" / config.model_name)

    determinism.configure(run.seed, run.threads, config.deterministic, run.allow_tf32)
    model = config.model
    identity = checkpoint.identity(model, config.classes)  # once: the frozen weights never change
    # In place: the optimizer built by the config keeps pointing at these parameters.
    model.to(device)
    model = distributed.prepare(model, device, world)
    optimizer = config.optimizer
    scheduler = config.scheduler
    training_data = data_module.build(experiment)
    class_weights = training_data.class_weights()
    criterion = make_criterion(config, class_weights).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    manifest_path = checkpoints_dir / manifest.MANIFEST_NAME
    run_overrides = overrides.as_dict()
    # Rank 0 alone hashes the data and checks a resumed run's settings.
    run_manifest = _start_manifest(experiment, training_data, run, run_overrides, class_weights, config, world) if world.main else None
    iteration, best = 0, float("inf")
    if resume and world.main:
        recorded = manifest.read(manifest_path)
        distributed.check_resume(recorded, world, checkpoints_dir)
        if recorded.get("config_sha256") != run_manifest["config_sha256"]:
            changed = manifest.changed_files(recorded.get("config_files", {}), run_manifest["config_files"])
            what = f"{', '.join(changed)} changed" if changed else "the overrides or seed changed"
            raise ReproError(
                f"the experiment changed since {checkpoints_dir} was written ({what}); "
                "resume with the same settings, or --overwrite to start again"
            )
        run_manifest["checkpoints"] = recorded.get("checkpoints", {})
    if resume:
        latest = checkpoints_dir / "latest.pth"
        # A run killed before its first checkpoint resumes from the start.
        if latest.exists():
            state = checkpoint.load(latest)
            checkpoint.load_into(model, state, latest, identity)
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            distributed.restore_rng_states(state["rng"], device)
            iteration, best = int(state["iteration"]), float(state["best_validation"])
    if world.main:
        manifest.write(manifest_path, run_manifest)

    # Steps after the resumed iteration were logged by the interrupted run: purge them.
    log = (RunLog if world.main else NoLog)(experiment.logs_dir, config.model_name, resume_step=iteration + 1 if resume else None)
    processes = f"; {world.size} processes ({world.backend})" if world.size > 1 else ""
    log.line(f"{'resume' if resume else 'start'} at iteration {iteration}; settings {run.__dict__}{processes}")
    total = run.epochs * run.iterations_per_epoch
    kill_at = int(os.environ[KILL_AT_ENV]) if os.environ.get(KILL_AT_ENV) else None
    batches = _training_batches(training_data, run, config, iteration, device, world)
    validation = Validation(training_data, run, device, world)
    trained = distributed.wrap(model, device, world)
    bar = tqdm(total=total, initial=iteration, desc=f"train {experiment_name}", unit="it", disable=not progress or not world.main, dynamic_ncols=True)

    def state_dict(epoch_done: bool) -> dict:
        return {
            **identity,
            "model": checkpoint.model_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": determinism.rng_states(),
            "iteration": iteration,
            "epoch": iteration // run.iterations_per_epoch,
            "epoch_complete": epoch_done,
            "best_validation": best,
            "seed": run.seed,
        }

    try:
        for epoch in range(iteration // run.iterations_per_epoch, run.epochs):
            model.train()
            while iteration < (epoch + 1) * run.iterations_per_epoch:
                started = time.perf_counter()
                inputs, target = next(batches)
                waited = time.perf_counter() - started
                optimizer.zero_grad(set_to_none=True)
                loss = masked_loss(criterion, trained(inputs), target, world)
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                iteration += 1
                if kill_at is not None and iteration == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                value = float(distributed.mean_over_ranks(loss.detach(), world))  # waits for the step to finish
                log.scalar("loss", value, iteration)
                log.scalar("lr", optimizer.param_groups[0]["lr"], iteration)
                # what a data path that keeps up with the device looks like: wait near 0
                log.scalar("time/data_wait_s", waited, iteration)
                log.scalar("time/iteration_s", time.perf_counter() - started, iteration)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}")
                if iteration % run.checkpoint_every == 0 and iteration % run.iterations_per_epoch and world.main:
                    checkpoint.save(checkpoints_dir / "latest.pth", state_dict(epoch_done=False))
            score = validation.score(model, criterion)
            if scheduler is not None:
                scheduler.step()
            if score is not None:
                log.scalar("validation", score, iteration)
            improved = score is not None and score < best
            if improved:
                best = score
            if not world.main:  # rank 0 writes the run's files
                continue
            state = state_dict(epoch_done=True)
            digest = checkpoint.save(checkpoints_dir / checkpoint.epoch_name(epoch + 1), state)
            checkpoint.save(checkpoints_dir / "latest.pth", state)
            if improved or score is None:
                checkpoint.save(checkpoints_dir / "best.pth", state)
            run_manifest["checkpoints"][str(epoch + 1)] = {"file": checkpoint.epoch_name(epoch + 1), "sha256": digest, "iteration": iteration, "validation": score}
            manifest.write(manifest_path, run_manifest)
            log.line(f"epoch {epoch + 1} iteration {iteration} validation {score} sha256 {digest}")
    finally:
        bar.close()
        log.close()
    return TrainResult(iteration, iteration // run.iterations_per_epoch, checkpoints_dir, log.tensorboard_dir, manifest_path, run_manifest["checkpoints"] if world.main else {})


def _training_batches(training_data, run: Settings, config, iteration: int, device, world):
    """This rank's share of the run's (input, target) batches on ``device`` from ``iteration`` on (one loader for the whole run)."""
    from cellmap_repro import data as data_module

    per_epoch = run.iterations_per_epoch * run.batch_size
    weights = training_data.crop_weights() if config.weighted_sampler else None
    samples = data_module.RunSamples(training_data.train, run.seed, per_epoch, run.epochs * per_epoch, weights, defer_raw=run.augment_device != "cpu")
    shard = (world.rank, world.size)
    batches = data_module.loader(samples, distributed.local_batch(run.batch_size, world), run.num_workers, start=iteration * run.batch_size, pin_memory=device.type == "cuda", shard=shard)
    return data_module.on_device(batches, training_data.train, device)


class Validation:
    """Mean masked loss over a fixed set of validation batches (lower is better).

    Its loader (at most 2 workers: a few batches per epoch) is built on first use and
    kept, so its workers start once per run.
    """

    def __init__(self, training_data, run: Settings, device, world=None):
        self.plan, self.run, self.device = training_data.validate, run, device
        self.world = world or distributed.World()
        self.batches = None

    def score(self, model, criterion) -> float | None:
        import torch

        from cellmap_repro import data as data_module

        if self.run.validation_batches == 0 or len(self.plan) == 0:
            return None
        if self.batches is None:
            indices = data_module.validation_indices(self.run.seed, self.run.validation_batches * self.run.batch_size, len(self.plan))
            samples = data_module.FixedSamples(self.plan, indices, self.run.seed)
            local = distributed.local_batch(self.run.batch_size, self.world)
            self.batches = data_module.loader(samples, local, min(self.run.num_workers, 2), pin_memory=self.device.type == "cuda", shard=(self.world.rank, self.world.size))
        model.eval()
        losses = []
        with torch.no_grad():
            for inputs, target in data_module.on_device(self.batches, self.plan, self.device):
                losses.append(masked_loss(criterion, model(inputs), target, self.world))
        losses = [float(value) for value in distributed.mean_over_ranks(torch.stack(losses), self.world)]
        return sum(losses) / len(losses)


def _start_manifest(experiment, training_data, run: Settings, overrides: dict, class_weights: dict, config, world) -> dict:
    from cellmap_repro.model import weights_file
    from cellmap_repro.storage import read_levels, sha256_file

    raw_levels = {}
    for row in training_data.rows:
        levels = read_levels(row.raw_group)
        finest = min(levels, key=lambda l: sum(abs(a - b) for a, b in zip(l.scale, config.input_array_info.scale)))
        raw_levels[str(row.raw_group)] = finest.path
    weights_path = weights_file(settings.weights_root(), config.pretrained_checkpoint) if config.pretrained_checkpoint else None
    return {
        "experiment": experiment.name,
        "model_name": config.model_name,
        "seed": run.seed,
        "settings": run.__dict__,
        "device": str(determinism.device()),
        "overrides": overrides,
        # the worker count changes no byte of the run, so it may differ on resume
        "config_sha256": manifest.config_hash(experiment.directory, {"overrides": {k: v for k, v in overrides.items() if k != "num_workers"}, "seed": run.seed, **distributed.config_hash_extra(world)}),
        "distributed": world.record(),
        "config_files": manifest.config_files(experiment.directory),
        "datasplit_sha256": sha256_file(experiment.datasplit_path),
        "data_sha256": manifest.data_hashes(training_data.rows, raw_levels),
        "pretrained_weights": {
            "checkpoint": config.pretrained_checkpoint,
            "sha256": sha256_file(weights_path) if weights_path and weights_path.exists() else None,
        },
        "class_weights": class_weights,
        "git": manifest.git_state(),
        "software": manifest.software(),
        "determinism": determinism.flags(),
        "hardware": manifest.hardware(),
        "checkpoints": {},
    }


def overrides_from_args(args: argparse.Namespace) -> Overrides:
    return Overrides(
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        batch_size=args.batch_size,
        validation_batches=args.validation_batches,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        num_workers=args.num_workers,
        augment_device=args.augment_device,
        allow_tf32=args.tf32,
    )


def should_resume(args: argparse.Namespace) -> bool:
    """--resume, or --auto-resume where a run was started (a requeued cluster job)."""
    if not args.auto_resume:
        return args.resume
    from cellmap_repro.experiment import experiment_checkpoints_dir

    return (experiment_checkpoints_dir(args.experiment, args.experiments_root) / manifest.MANIFEST_NAME).exists()


def run_cli(args: argparse.Namespace) -> int:
    status = distributed.relaunch_if_asked(args.nproc, args.command_line)
    if status is not None:  # trained by processes torchrun started
        return status
    overrides = overrides_from_args(args)
    with distributed.session() as world:
        result = train(args.experiment, args.experiments_root, overrides, resume=should_resume(args), overwrite=args.overwrite, threads=args.threads)
    if not world.main:
        return 0
    print(f"checkpoints: {result.checkpoints_dir}")
    print(f"tensorboard: {result.tensorboard_dir}")
    print(f"manifest:    {result.manifest_path}")
    return 0


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    from cellmap_repro.data import AUGMENT_DEVICES

    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--iterations-per-epoch", type=int, default=None, help="override iterations_per_epoch")
    parser.add_argument("--batch-size", type=int, default=None, help="override batch_size")
    parser.add_argument("--validation-batches", type=int, default=None, help="override validation_batches")
    parser.add_argument("--seed", type=int, default=None, help="override the seed (also: env SEED)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="refresh latest.pth every N iterations (default: min(100, iterations per epoch))")
    parser.add_argument("--num-workers", type=int, default=None, help="loader worker processes (default: data.py's num_workers, else one per core but one); changes no result")
    parser.add_argument("--augment-device", choices=AUGMENT_DEVICES, default=None, help="where rotated raw windows are interpolated: cpu (in the loader workers, default) or cuda (the workers only read blocks)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None, help="allow TF32 in cuDNN/cuBLAS (default: train_config's allow_tf32, True); deterministic either way")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $CELLMAP_REPRO_THREADS or all cores); part of the reproducibility contract")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an experiment (resumable, deterministic)", description=__doc__.split("\n\n")[0])
    settings.add_experiment_argument(parser)
    settings.add_data_argument(parser)
    add_override_arguments(parser)
    parser.add_argument(
        distributed.NPROC_FLAG,
        type=int,
        default=None,
        help="train with N processes through torchrun (one per GPU; on CPU, N gloo processes); the global batch stays batch_size (divisible by N)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from checkpoints/latest.pth")
    group.add_argument("--overwrite", action="store_true", help="delete the experiment's checkpoints and start again")
    group.add_argument("--auto-resume", action="store_true", help="resume the run if one was started, else start one (for requeued cluster jobs)")
    parser.set_defaults(func=run_cli)
