"""Bad input never wins (issue 13): a battery of what careful users get wrong.

Every case runs one command on a scratch sandbox (see ``battery.py``) and must end in one
clear line (`cellmap-repro: error: ...` matching the case's pattern) and a non-zero exit,
with every earlier output intact and nothing written outside the output folders. Kill
cases SIGKILL a forked child between two steps of a write and check what is left.

The counts (tried, clear, tracebacks, wrong successes, unclear, lost outputs, writes
outside folders) are printed at the end of the session; any traceback, wrong success,
lost output or outside write fails its case.

Each case is one end-to-end run of a stage; the gates themselves have their own unit tests
(e.g. ``storage.confined`` in test_confined.py, fetch's hostile keys in test_fetch.py).
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
from dataclasses import dataclass, field
from typing import Callable

import pytest

import battery as b
from battery import CHECKPOINTS, CONTAINER, DECOY, EXP, FAST_FLAGS, LABELS, PREDICTIONS, PROCESSED, RAW, TRAIN
from conftest import BATTERY, FAST_EXPERIMENT, REPO


@dataclass
class Case:
    id: str
    run: list[str] | Callable | None = None  # argv, or argv computed from the sandbox
    expect: str | Callable = ""  # pattern the one error line must match
    setup: Callable | None = None
    needs: str = "fresh"  # fresh | trained | predicted | processed
    env: dict = field(default_factory=dict)
    kind: str = "error"  # error: a clear error is due; ok: must succeed; killed: SIGKILLed mid-write
    inject: Callable | None = None  # faults for an in-process run: (sandbox, monkeypatch)
    action: Callable | None = None  # an API call instead of a command: (sandbox)
    kill: Callable | None = None  # killed cases: arms the kill in the child: (sandbox)
    check: Callable | None = None  # more damage to look for: (sandbox) -> [problems]
    after: list[str] | None = None  # must succeed afterwards
    keep: str = "same"  # same: outputs unchanged in place; anywhere: their bytes still exist; none


CASES: list[Case] = []


def case(*args, **kwargs) -> None:
    CASES.append(Case(*args, **kwargs))


def predict(*extra: str) -> list[str]:
    return ["predict", "-e", "fast", *extra]


def with_manifest(*rows: str, header: str = "crop_name,dataset,class_label,voxel_size,translation,shape"):
    """predict --test-manifest on a manifest of these rows."""

    def setup(sb):
        sb.write("test_crops.csv", "\n".join([header, *rows]) + "\n")

    return setup


MANIFEST_ARGS = predict("--test-manifest", "test_crops.csv")
GOOD_ROW = "3,jrc_tiny-1,mito,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]"


def row(dataset="jrc_tiny-1", voxel="[4.0;4.0;4.0]", translation="[798.0;862.0;814.0]", shape="[96;96;96]", crop="3"):
    return f"{crop},{dataset},mito,{voxel},{translation},{shape}"


# ---------------------------------------------------------------- configuration files

for name, stage, needs in (
    ("train_config", TRAIN, "fresh"),
    ("model", TRAIN, "fresh"),
    ("data", TRAIN, "fresh"),
    ("process_config", ["process", "-e", "fast"], "predicted"),
):
    case(f"config-syntax-error-{name}", stage, rf"{name}\.py:\d+: syntax error", needs=needs,
         setup=lambda sb, n=name: sb.append(f"{EXP}/{n}.py", "\nvalue = (\n"))
case("config-syntax-error-model-in-predict", predict(), r"model\.py:\d+: syntax error", needs="trained",
     setup=lambda sb: sb.append(f"{EXP}/model.py", "\ndef broken(:\n"))
for name, code, stage, needs in (
    ("train_config", "import sys\nsys.exit()", TRAIN, "fresh"),
    ("model", "import sys as _sys\n_sys.exit(0)", TRAIN, "fresh"),
    ("data", "raise SystemExit(3)", TRAIN, "fresh"),
    ("process_config", "exit()", ["process", "-e", "fast"], "predicted"),
    ("model", "import os as _os\n_os._exit if False else None\nimport sys as _sys\n_sys.exit('bye')", predict(), "trained"),
):
    case(f"config-sys-exit-{name}-{stage[0]}", stage, rf"{name}\.py: .*exit", needs=needs,
         setup=lambda sb, n=name, c=code: sb.append(f"{EXP}/{n}.py", f"\n{c}\n"))
case("config-raises-in-model", TRAIN, r"model\.py: failed to load: RuntimeError: boom",
     setup=lambda sb: sb.append(f"{EXP}/model.py", "\nraise RuntimeError('boom')\n"))
case("config-imports-missing-module", TRAIN, r"train_config\.py: failed to load: ModuleNotFoundError",
     setup=lambda sb: sb.append(f"{EXP}/train_config.py", "\nimport not_a_module_xyz\n"))
case("config-misspelt-variable", TRAIN, r"train_config\.py: unknown variable 'epoch'",
     setup=lambda sb: sb.append(f"{EXP}/train_config.py", "\nepoch = 3\n"))
case("config-unknown-class", TRAIN, r"unknown class 'mitochondrion'",
     setup=lambda sb: sb.edit(f"{EXP}/data.py", '"ecs", ', '"ecs", "mitochondrion", '))
for variable, old, new in (
    ("learning_rate", "learning_rate = 1e-3", "learning_rate = -1.0"),
    ("batch_size", "batch_size = 2", "batch_size = 0"),
    ("epochs", "epochs = 2", "epochs = 0"),
    ("iterations_per_epoch", "iterations_per_epoch = 3", "iterations_per_epoch = -3"),
    ("max_grad_norm", "max_grad_norm = 100.0", "max_grad_norm = -1.0"),
):
    case(f"config-bad-{variable}", TRAIN, rf"train_config\.py: .*{variable.replace('_', '.')}",
         setup=lambda sb, o=old, n=new: sb.edit(f"{EXP}/train_config.py", o, n))
case("config-missing-required-variable", TRAIN, r"train_config\.py: required variable 'learning_rate'",
     setup=lambda sb: (sb.edit(f"{EXP}/train_config.py", "learning_rate = 1e-3", "_lr = 1e-3"), sb.edit(f"{EXP}/train_config.py", "lr=learning_rate", "lr=_lr")))
case("config-reduction-mean", TRAIN, r"train_config\.py: criterion_kwargs reduction='mean'",
     setup=lambda sb: sb.edit(f"{EXP}/train_config.py", '{"reduction": "none"}', '{"reduction": "mean"}'))
case("config-model-not-a-module", TRAIN, r"model\.py: variable 'model'",
     setup=lambda sb: sb.append(f"{EXP}/model.py", "\nmodel = 3\n"))
case("config-input-too-small", TRAIN, r"model\.py: .*\(6, 6, 6\)",
     setup=lambda sb: sb.edit(f"{EXP}/model.py", '"shape": (40, 40, 40)', '"shape": (6, 6, 6)'))
case("config-output-shape-not-target-shape", TRAIN, r"model\.py: the model maps input_array_info\.shape \(40, 40, 40\) to \(10, 32, 32, 32\)",
     setup=lambda sb: sb.edit(f"{EXP}/model.py", '"shape": (32, 32, 32)', '"shape": (30, 30, 30)'))
INPUT_16NM = lambda sb: sb.edit(f"{EXP}/model.py", '(40, 40, 40), "scale": (8.0, 8.0, 8.0)', '(40, 40, 40), "scale": (16.0, 16.0, 16.0)')  # noqa: E731
case("config-input-16nm-target-8nm-train", TRAIN, r"model\.py: .*voxel size", setup=INPUT_16NM)
case("config-input-16nm-target-8nm-predict", predict(), r"model\.py: .*voxel size", needs="trained", setup=INPUT_16NM)
case("config-seed-not-a-literal", TRAIN, r"random_seed must be a whole-number literal",
     setup=lambda sb: sb.edit(f"{EXP}/train_config.py", "random_seed = 7", "random_seed = int('7')"))
case("config-seed-negative", TRAIN, r"random_seed: seed -5 is out of range",
     setup=lambda sb: sb.edit(f"{EXP}/train_config.py", "random_seed = 7", "random_seed = -5"))
case("config-file-missing", TRAIN, r"experiment file missing: .*train_config\.py",
     setup=lambda sb: sb.remove(f"{EXP}/train_config.py"))
case("config-unknown-experiment", ["train", "-e", "nope"], r"unknown experiment 'nope'")
case("config-experiment-name-escapes", ["train", "-e", "../fast"], r"unknown experiment '\.\./fast'")
case("config-datasplit-path-missing", TRAIN, r"datasplit not found: .*missing\.csv",
     setup=lambda sb: sb.append(f"{EXP}/data.py", '\ndatasplit_path = "missing.csv"\n'))
case("config-negative-num-workers", TRAIN, r"data\.py: variable 'num_workers'",
     setup=lambda sb: sb.edit(f"{EXP}/data.py", "num_workers = 0", "num_workers = -1"))
case("config-validation-prob-above-one", TRAIN, r"data\.py: variable 'validation_prob'",
     setup=lambda sb: sb.append(f"{EXP}/data.py", "\nvalidation_prob = 2.0\n"))
case("config-unknown-spatial-transform", TRAIN, r"data\.py: .*spatial_transforms.*shear",
     setup=lambda sb: sb.append(f"{EXP}/data.py", '\nspatial_transforms = {"shear": {"axes": {"x": 0.5}}}\n'))
case("config-malformed-spatial-transform", TRAIN, r"data\.py: .*spatial_transforms.*mirror",
     setup=lambda sb: sb.append(f"{EXP}/data.py", '\nspatial_transforms = {"mirror": {"axes": {"x": "often"}}}\n'))
case("config-raw-transform-not-callable", TRAIN, r"data\.py: variable 'train_raw_value_transforms'",
     setup=lambda sb: sb.append(f"{EXP}/data.py", "\ntrain_raw_value_transforms = 3\n"))
case("config-criterion-not-callable", TRAIN, r"train_config\.py: variable 'criterion'",
     setup=lambda sb: sb.append(f"{EXP}/train_config.py", "\ncriterion = 3\n"))
case("config-optimizer-not-an-optimizer", TRAIN, r"train_config\.py: variable 'optimizer'",
     setup=lambda sb: sb.append(f"{EXP}/train_config.py", "\noptimizer = 3\n"))
case("config-optimizer-of-another-model", TRAIN, r"train_config\.py: .*optimizer.*model",
     setup=lambda sb: sb.append(f"{EXP}/train_config.py", "\noptimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)\n"))
case("config-scheduler-not-a-scheduler", TRAIN, r"train_config\.py: variable 'scheduler'",
     setup=lambda sb: sb.append(f"{EXP}/train_config.py", "\nscheduler = 3\n"))
PROCESS = ["process", "-e", "fast", "--overwrite"]
case("config-threshold-text", PROCESS, r"process_config\.py: variable 'threshold", needs="predicted",
     setup=lambda sb: sb.edit(f"{EXP}/process_config.py", "threshold = 0.0", 'threshold = "high"'))
case("config-connectivity-5", PROCESS, r"process_config\.py: variable 'connectivity'", needs="predicted",
     setup=lambda sb: sb.append(f"{EXP}/process_config.py", "\nconnectivity = 5\n"))
case("config-unknown-instance-class", PROCESS, r"unknown class 'mitochondrion'", needs="predicted",
     setup=lambda sb: sb.append(f"{EXP}/process_config.py", '\ninstance_classes = ["mitochondrion"]\n'))
case("config-process-class-not-predicted", PROCESS, r"no prediction for class\(es\) lyso", needs="predicted",
     setup=lambda sb: sb.append(f"{EXP}/process_config.py", '\nclasses = ["lyso"]\n'))
case("config-process-checkpoint-unknown", predict(), r"checkpoint 'nope' not found", needs="trained",
     setup=lambda sb: sb.edit(f"{EXP}/process_config.py", 'checkpoint = "latest"', 'checkpoint = "nope"'))

# ---------------------------------------------------------------- numbers from flags and environment

for variable, value in (("SEED", "abc"), ("SEED", "-1"), ("SEED", "1e3"), ("SEED", "99999999999999999999"),
                        ("CELLMAP_REPRO_THREADS", "abc"), ("CELLMAP_REPRO_THREADS", "0"), ("CELLMAP_REPRO_THREADS", "-1"),
                        ("CELLMAP_REPRO_THREADS", "1.5"), ("CELLMAP_REPRO_SIGKILL_AT_ITERATION", "soon"), ("CELLMAP_REPRO_DEVICE", "gpu")):
    case(f"env-{variable}={value}", TRAIN, rf"{variable}.*'{value}'", env={variable: value})
for flag, value in (("--threads", "0"), ("--threads", "-1"), ("--seed", "-1"), ("--seed", "abc"), ("--batch-size", "0"),
                    ("--batch-size", "-3"), ("--iterations-per-epoch", "0"), ("--epochs", "-1"), ("--epochs", "0"),
                    ("--num-workers", "-1"), ("--validation-batches", "-1"), ("--checkpoint-every", "0"), ("--checkpoint-every", "-1")):
    case(f"flag-train{flag}={value}", [*TRAIN, flag, value], rf"{flag}.*'{value}'")
for flag, value in (("--batch-size", "0"), ("--max-input", "0"), ("--max-input", "-1")):
    case(f"flag-predict{flag}={value}", predict(flag, value), rf"{flag}.*'{value}'", needs="trained")
for flag, value in (("--seed", "-1"), ("--validation-prob", "1.5"), ("--validation-prob", "nan")):
    case(f"flag-datasplit{flag}={value}", ["datasplit", "-e", "fast", "-o", "new-split.csv", flag, value], rf"{flag}.*{value}")
for argv, flag, value in ((["fetch", "--data", "data/fetched"], "--workers", "0"), (["fetch", "--data", "data/fetched"], "--raw-context-nm", "-5"),
                          (["seed-copy", "-e", "fast"], "--seed", "-1"), (["train", "-e", "fast"], "--nproc", "0"),
                          (["view", "-e", "fast"], "--crop", "x"), (["view", "-e", "fast", "--crop", "3"], "--port", "70000"),
                          (["view", "-e", "fast", "--crop", "3"], "--timeout", "0")):
    case(f"flag-{argv[0]}{flag}={value}", [*argv, flag, value], rf"{flag}.*'{value}'")
case("flag-tiny-crop--seed=-1", ["tiny-crop", "-e", "fast", "--data", "new-data", "--seed", "-1"], r"--seed.*'-1'")
case("flag-verify--kill-at=0", ["verify", "-e", "fast", *FAST_FLAGS, "--skip", "repeat", "--kill-at", "0", "--quiet"], r"--kill-at.*'0'")


def occupied_port(sb) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sb.notes.setdefault("closers", []).append(sock.close)
    sb.notes["port"] = sock.getsockname()[1]
    return sb.notes["port"]


def tensorboard(*extra: str):
    """`tensorboard` on a port that is taken (so that a wrong success returns instead of serving)."""
    return lambda sb: ["tensorboard", "--experiments-root", str(sb.path("experiments")), "--port", str(occupied_port(sb)), *extra]


case("tensorboard-port-taken", tensorboard(), lambda sb: rf"port {sb.notes['port']} .*in use")
case("flag-tensorboard--refresh=0", tensorboard("--refresh", "0"), r"--refresh.*'0'")
for value in ("70000", "-1", "abc"):
    case(f"flag-tensorboard--port={value}", ["tensorboard", "--port", value], rf"--port.*'{value}'")
case("env-TENSORBOARD_PORT=abc", ["tensorboard"], r"TENSORBOARD_PORT.*'abc'", env={"TENSORBOARD_PORT": "abc"})

# ---------------------------------------------------------------- datasplits

SPLIT = f"{EXP}/datasplit.csv"
FIRST_ROW = lambda sb: sb.read(SPLIT).splitlines()[0]  # noqa: E731
for case_id, change, pattern in (
    ("three-fields", lambda sb: sb.append(SPLIT, '"train","only","three"\n'), r"datasplit\.csv:4: expected 5 fields"),
    ("usage-test", lambda sb: sb.edit(SPLIT, '"train"', '"test"'), r"datasplit\.csv:1: usage must be"),
    ("unknown-class", lambda sb: sb.edit(SPLIT, "mito]", "mitochondrion]"), r"datasplit\.csv:\d: unknown class 'mitochondrion'"),
    ("empty-class-list", lambda sb: sb.edit(SPLIT, "[ecs,pm,mito_mem,mito_lum,cyto,nuc,mito,cell]", "[]"), r"datasplit\.csv:1: empty class list"),
    ("container-not-zarr", lambda sb: sb.edit(SPLIT, 'jrc_tiny-1.zarr","recon-1/em', 'jrc_tiny-1.n5","recon-1/em'), r"datasplit\.csv:1: raw container must end in \.zarr"),
    ("empty-file", lambda sb: sb.write(SPLIT, ""), r"datasplit\.csv: datasplit has no rows"),
    ("missing-file", lambda sb: sb.remove(SPLIT), r"datasplit not found: .*datasplit\.csv"),
    ("duplicate-row", lambda sb: sb.append(SPLIT, FIRST_ROW(sb) + "\n"), r"datasplit\.csv:4: crop 1 .*line 1"),
    ("crop-in-train-and-validate", lambda sb: sb.append(SPLIT, FIRST_ROW(sb).replace('"train"', '"validate"') + "\n"), r"datasplit\.csv:4: crop 1 .*line 1"),
    ("raw-container-missing", lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace(CONTAINER, "data/gone/jrc_gone.zarr")), r"does not exist: .*jrc_gone\.zarr"),
    ("label-missing", lambda sb: sb.edit(SPLIT, "crop1/[ecs,", "crop1/[golgi,ecs,"), r"label 'golgi' of crop 1 does not exist"),
    ("crop-field-malformed", lambda sb: sb.edit(SPLIT, "groundtruth/crop1/[", "groundtruth/[", 1), r"datasplit\.csv:1: last field must look like"),
    ("not-utf8", lambda sb: sb.write(SPLIT, b'"train","\xff\xfe\xfa"\n'), r"datasplit\.csv: .*UTF-8"),
    ("nul-byte", lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace(CONTAINER, "data/jrc_tiny-1\0/jrc_tiny-1.zarr")), r"datasplit\.csv:1: .*NUL"),
    ("is-a-directory", lambda sb: (sb.remove(SPLIT), sb.path(SPLIT).mkdir()), r"datasplit\.csv"),
    ("raw-path-escapes-container", lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace('"recon-1/em/fibsem-uint8"', '"../../../outside.zarr/recon-1/em/fibsem-uint8"')), r"datasplit\.csv:1: raw path '\.\./\.\./\.\./outside\.zarr.*is not a path inside"),
    ("raw-path-absolute", lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace('"recon-1/em/fibsem-uint8"', f'"{sb.path(DECOY)}/recon-1/em/fibsem-uint8"')), r"datasplit\.csv:1: raw path .*is not a path inside"),
    ("crop-path-escapes-container", lambda sb: sb.edit(SPLIT, "recon-1/labels/groundtruth/crop1/", "recon-1/labels/groundtruth/../../../../outside.zarr/recon-1/labels/groundtruth/crop1/"), r"datasplit\.csv:1: crop path .*is not a path inside"),
    ("no-train-rows", lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace('"train"', '"validate"')), r"no 'train' rows"),
):
    case(f"datasplit-{case_id}", TRAIN, pattern, setup=change)
case("datasplit-no-validate-crops-predict", predict(), r"no 'validate' crops", needs="trained",
     setup=lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace('"validate"', '"train"')))


# ---------------------------------------------------------------- zarr data


def set_level_attr(key, value, level=0):
    def change(attrs):
        dataset = attrs["multiscales"][0]["datasets"][level]
        if key == "path":
            dataset["path"] = value
        else:
            for transform in dataset["coordinateTransformations"]:
                if transform["type"] == key:
                    transform[key] = value

    return change


def truncate_chunks(array: str, keep=lambda size: size // 2, content: bytes | None = None):
    def setup(sb):
        for chunk in sb.chunks(array):
            data = sb.path(chunk).read_bytes()
            sb.write(chunk, content if content is not None else data[: keep(len(data))])

    return setup


def scale_all_levels(group: str, factor: float):
    def change(attrs):
        for dataset in attrs["multiscales"][0]["datasets"]:
            for transform in dataset["coordinateTransformations"]:
                if transform["type"] == "scale":
                    transform["scale"] = [s * factor for s in transform["scale"]]

    return lambda sb: sb.edit_json(f"{group}/.zattrs", change)


LABEL = f"{LABELS}/crop1/ecs"
for case_id, change, pattern in (
    ("raw-zattrs-missing", lambda sb: sb.remove(f"{RAW}/.zattrs"), r"not a multiscale zarr group"),
    ("raw-zattrs-invalid-json", lambda sb: sb.write(f"{RAW}/.zattrs", "{"), r"malformed OME-NGFF multiscales attributes in .*fibsem-uint8/\.zattrs"),
    ("raw-zattrs-no-multiscales", lambda sb: sb.write(f"{RAW}/.zattrs", "{}"), r"malformed OME-NGFF multiscales attributes in .*fibsem-uint8/\.zattrs"),
    ("raw-level-path-escapes", lambda sb: sb.edit_json(f"{RAW}/.zattrs", set_level_attr("path", f"../../../../../../{DECOY}/recon-1/em/fibsem-uint8/s0")), r"fibsem-uint8/\.zattrs.*is not a path inside"),
    ("raw-level-path-absolute", lambda sb: sb.edit_json(f"{RAW}/.zattrs", set_level_attr("path", str(sb.path(f"{DECOY}/recon-1/em/fibsem-uint8/s0")))), r"fibsem-uint8/\.zattrs.*is not a path inside"),
    ("raw-scale-zero", lambda sb: sb.edit_json(f"{RAW}/.zattrs", set_level_attr("scale", [0.0, 8.0, 8.0])), r"fibsem-uint8/\.zattrs.*scale"),
    ("raw-scale-nan", lambda sb: sb.edit_json(f"{RAW}/.zattrs", set_level_attr("scale", [float("nan"), 8.0, 8.0])), r"fibsem-uint8/\.zattrs.*scale"),
    ("raw-zarray-missing", lambda sb: sb.remove(f"{RAW}/s0/.zarray"), r"fibsem-uint8/s0: .*\.zarray"),
    ("raw-zarray-invalid-json", lambda sb: sb.write(f"{RAW}/s0/.zarray", "{"), r"fibsem-uint8/s0/\.zarray"),
    ("raw-2d-array", lambda sb: sb.edit_json(f"{RAW}/s0/.zarray", lambda a: a.update(shape=[256, 256], chunks=[64, 64])), r"fibsem-uint8/s0.*2-d"),
    ("raw-coarser-than-input", scale_all_levels(RAW, 4.0), r"coarser than the model input"),
    ("label-coarser-than-target", scale_all_levels(LABEL, 4.0), r"label 'ecs' of crop 1 is at .* coarser than the target"),
    ("label-zarray-missing", lambda sb: sb.remove(f"{LABEL}/s1/.zarray"), r"ecs/s1: .*\.zarray"),  # s1: the 8 nm level training reads
    ("label-zattrs-invalid-json", lambda sb: sb.write(f"{LABEL}/.zattrs", "{"), r"malformed OME-NGFF multiscales attributes in .*ecs/\.zattrs"),
    ("label-annotation-counts-missing", lambda sb: sb.edit_json(f"{LABEL}/s0/.zattrs", lambda a: a["cellmap"]["annotation"].pop("complement_counts")), r"lacks cellmap\.annotation\.complement_counts"),
    ("raw-chunks-truncated", truncate_chunks(f"{RAW}/s0"), r"fibsem-uint8/s0/\d+/\d+/\d+.*(corrupt|truncated)"),
    ("raw-chunks-garbage", truncate_chunks(f"{RAW}/s0", content=b"not zlib data"), r"fibsem-uint8/s0/\d+/\d+/\d+.*(corrupt|truncated)"),
):
    case(f"zarr-{case_id}", TRAIN, pattern, setup=change)


def read_in_a_loader_worker(sb):
    """A chunk read failing in a DataLoader worker reaches the training process as the worker's
    traceback in the message (torch's ExceptionWrapper); the user still sees one line.
    (The same as `train --num-workers 1` on truncated chunks, without 15 s of worker start-up.)"""
    import sys

    import zarr
    from torch._utils import ExceptionWrapper

    from cellmap_repro.storage import read_region

    try:
        read_region(zarr.open_array(str(sb.path(f"{RAW}/s0")), mode="r"), (slice(0, 64),) * 3)
    except Exception:  # noqa: BLE001
        ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0").reraise()


case("zarr-raw-chunks-truncated-loader-worker", expect=r"^cellmap-repro: error: \S*fibsem-uint8/s0/\d+/\d+/\d+.*(corrupt|truncated)",
     setup=truncate_chunks(f"{RAW}/s0"), action=read_in_a_loader_worker)
case("zarr-raw-chunks-truncated-predict", predict(), r"fibsem-uint8/s0/\d+/\d+/\d+.*(corrupt|truncated)", needs="trained",
     setup=truncate_chunks(f"{RAW}/s0"))
case("zarr-raw-zarray-missing-predict", predict(), r"fibsem-uint8/s0: .*\.zarray", needs="trained",
     setup=lambda sb: sb.remove(f"{RAW}/s0/.zarray"))
PREDICTED_MITO = f"{PREDICTIONS}/jrc_tiny-1.zarr/crop3/mito"
case("zarr-prediction-chunks-truncated-process", PROCESS, r"crop3/mito/s0/\d+/\d+/\d+.*(corrupt|truncated)", needs="predicted",
     setup=truncate_chunks(f"{PREDICTED_MITO}/s0"))
case("zarr-prediction-zattrs-invalid-process", PROCESS, r"malformed OME-NGFF multiscales attributes in .*crop3/mito/\.zattrs", needs="predicted",
     setup=lambda sb: sb.write(f"{PREDICTED_MITO}/.zattrs", "{"))
case("zarr-prediction-level-path-escapes-process", PROCESS, r"crop3/mito/\.zattrs.*is not a path inside", needs="predicted",
     setup=lambda sb: sb.edit_json(f"{PREDICTED_MITO}/.zattrs", set_level_attr("path", f"../../../../../../../{DECOY}/recon-1/em/fibsem-uint8/s0")))


def read_only_data(sb):
    for path in sorted(sb.path("data/jrc_tiny-1").rglob("*"), reverse=True):
        path.chmod(0o444 if path.is_file() else 0o555)


case("zarr-read-only-data-train", TRAIN, kind="ok", setup=read_only_data)
case("zarr-read-only-data-predict", predict(), kind="ok", needs="trained", setup=read_only_data)


# ---------------------------------------------------------------- checkpoints and weights

LATEST = f"{CHECKPOINTS}/latest.pth"


def torch_save(relative: str, obj, sidecar: bool = False):
    def setup(sb):
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        sb.write(relative, buffer.getvalue())
        if not sidecar:
            sb.remove(relative + ".sha256")

    return setup


class Evil:
    def __reduce__(self):
        return (os.system, ("touch outside.zarr/pwned",))


def flip_byte(sb, relative=LATEST):
    data = bytearray(sb.path(relative).read_bytes())
    data[len(data) // 2] ^= 0xFF
    sb.write(relative, bytes(data))


for case_id, change, pattern in (
    ("byte-flipped", flip_byte, r"latest\.pth does not match its sha256 sidecar"),
    ("truncated", lambda sb: sb.write(LATEST, sb.path(LATEST).read_bytes()[:100]), r"latest\.pth does not match its sha256 sidecar"),
    ("truncated-without-sidecar", lambda sb: (sb.write(LATEST, sb.path(LATEST).read_bytes()[:100]), sb.remove(LATEST + ".sha256")), r"latest\.pth is unreadable"),
    ("empty-without-sidecar", lambda sb: (sb.write(LATEST, b""), sb.remove(LATEST + ".sha256")), r"latest\.pth is unreadable"),
    ("malicious-pickle", lambda sb: (sb.write(LATEST, pickle.dumps(Evil(), protocol=2)), sb.remove(LATEST + ".sha256")), r"latest\.pth is unreadable"),
    ("not-a-dict", torch_save(LATEST, [1, 2]), r"latest\.pth is not a cellmap-repro checkpoint"),
    ("format-1", torch_save(LATEST, {"format": 1, "model": {}}), r"latest\.pth is a format-1 checkpoint"),
    ("sidecar-empty", lambda sb: sb.write(LATEST + ".sha256", ""), r"latest\.pth\.sha256 .*malformed"),
    ("sidecar-garbage", lambda sb: sb.write(LATEST + ".sha256", "zzz  latest.pth\n"), r"latest\.pth\.sha256 .*malformed"),
    ("is-a-directory", lambda sb: (sb.remove(LATEST), sb.remove(LATEST + ".sha256"), sb.path(LATEST).mkdir()), r"latest\.pth"),
    ("classes-in-another-order", lambda sb: sb.edit(f"{EXP}/data.py", '"ecs", "pm"', '"pm", "ecs"'), r"latest\.pth has the experiment's classes in another order"),
    ("other-class-count", lambda sb: sb.edit(f"{EXP}/data.py", ', "cell"]', "]"), r"latest\.pth was trained for 10 classes, the experiment has 9"),
    ("other-architecture", lambda sb: (sb.edit(f"{EXP}/model.py", "Conv3d(1, 4, 3)", "Conv3d(1, 6, 3)"), sb.edit(f"{EXP}/model.py", "Conv3d(4, 4, 3)", "Conv3d(6, 4, 3)")), r"latest\.pth was written by another architecture"),
):
    case(f"checkpoint-{case_id}-predict", predict(), pattern, needs="trained", setup=change)
case("checkpoint-missing-predict", predict(), r"checkpoint 'latest' not found")
case("checkpoint-flag-path-missing", predict("--checkpoint", "/nonexistent/x.pth"), r"checkpoint '/nonexistent/x\.pth' not found", needs="trained")
case("checkpoint-flag-epoch-missing", predict("--checkpoint", "99"), r"checkpoint '99' not found", needs="trained")
RESUME = [*TRAIN, "--resume"]
case("checkpoint-byte-flipped-resume", RESUME, r"latest\.pth does not match its sha256 sidecar", needs="trained", setup=flip_byte)
case("checkpoint-classes-changed-resume", RESUME, r"changed since .*data\.py changed", needs="trained",
     setup=lambda sb: sb.edit(f"{EXP}/data.py", '"ecs", "pm"', '"pm", "ecs"'))
case("checkpoint-manifest-corrupt-resume", RESUME, r"manifest\.json is not valid JSON", needs="trained",
     setup=lambda sb: sb.write(f"{CHECKPOINTS}/manifest.json", "{"))
case("checkpoint-manifest-missing-resume", RESUME, r"nothing to resume", needs="trained",
     setup=lambda sb: sb.remove(f"{CHECKPOINTS}/manifest.json"))
case("checkpoint-resume-nothing", RESUME, r"nothing to resume")
case("checkpoint-already-there", TRAIN, r"already holds checkpoints", needs="trained")


def setup04(weights: bytes):
    def setup(sb):
        shutil.copytree(REPO / "experiments" / "setup_04_all", sb.path("experiments/setup_04_all"),
                        ignore=shutil.ignore_patterns("checkpoints", "logs", "__pycache__"))
        sb.write("weights/cosem/setup04/1820500.pth", weights)

    return setup


case("weights-truncated", ["train", "-e", "setup_04_all"], r"weights file .*1820500\.pth is unreadable or truncated",
     setup=setup04(b"PK\x03\x04" + bytes(200)), env={"CELLMAP_REPRO_WEIGHTS": "weights"})
case("weights-garbage", ["train", "-e", "setup_04_all"], r"weights file .*1820500\.pth is unreadable or truncated",
     setup=setup04(os.urandom(4096)), env={"CELLMAP_REPRO_WEIGHTS": "weights"})
case("weights-unknown-checkpoint", ["weights", "--weights", "weights", "--checkpoint", "setup99/1"], r"unknown COSEM checkpoint 'setup99/1'")


# ---------------------------------------------------------------- crashes and full disks while writing


def remember_latest(sb):
    from cellmap_repro import checkpoint

    state = checkpoint.load(sb.path(LATEST))
    sb.notes["old_iteration"] = state["iteration"]
    sb.notes["state"] = {**state, "iteration": state["iteration"] + 1}
    sb.notes["state"].pop("format")


def save_latest(sb):
    from cellmap_repro import checkpoint

    checkpoint.save(sb.path(LATEST), sb.notes["state"])


def checkpoints_whole(sb) -> list[str]:
    """Every checkpoint loads (file and sidecar agree); latest.pth is the old or the new one."""
    from cellmap_repro import checkpoint
    from cellmap_repro.errors import ReproError

    problems = []
    for path in sorted(sb.path(CHECKPOINTS).glob("*.pth")):
        try:
            state = checkpoint.load(path)
        except ReproError as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        if path.name == "latest.pth" and "old_iteration" in sb.notes and state["iteration"] not in (sb.notes["old_iteration"], sb.notes["old_iteration"] + 1):
            problems.append(f"latest.pth holds iteration {state['iteration']}")
    return problems


for step in range(1, 8):
    case(f"write-sigkill-checkpoint-step-{step}", kind="killed", needs="trained", setup=remember_latest, action=save_latest,
         kill=lambda sb, s=step: b.kill_at_write_step(s), check=checkpoints_whole, keep="none")
for step in range(1, 4):  # a save has three fsyncs: checkpoint, transitional and final sidecar
    case(f"write-disk-full-checkpoint-step-{step}", expect=r"latest\.pth.*No space left on device", needs="trained", setup=remember_latest,
         action=save_latest, inject=lambda sb, mp, s=step: b.fail_write_step(mp, s, kinds=("fsync",)), check=checkpoints_whole, keep="none")
for step in (1, 2, 3):
    case(f"write-disk-full-train-step-{step}", TRAIN, r"cannot write .*(checkpoints/|manifest\.json).*No space left on device",
         inject=lambda sb, mp, s=step: b.fail_write_step(mp, s, kinds=("fsync",)), check=checkpoints_whole)
    case(f"write-disk-full-train-overwrite-step-{step}", [*TRAIN, "--overwrite"], r"cannot write .*(checkpoints/|manifest\.json).*No space left on device",
         needs="trained", inject=lambda sb, mp, s=step: b.fail_write_step(mp, s, kinds=("fsync",)), check=checkpoints_whole, keep="anywhere")
case("write-disk-full-predictions", predict("--overwrite"), r"cannot write .*predictions/fast/jrc_tiny-1\.zarr/crop3.*No space left on device",
     needs="predicted", inject=lambda sb, mp: b.fail_zarr_writes(mp))
case("write-disk-full-prediction-progress", predict("--overwrite"), r"cannot write .*crop3.*No space left on device",
     needs="predicted", inject=lambda sb, mp: b.fail_write_step(mp, 1, kinds=("fsync",)))
case("write-disk-full-processed", PROCESS, r"cannot write .*processed/fast/jrc_tiny-1\.zarr/crop3.*No space left on device",
     needs="processed", inject=lambda sb, mp: b.fail_zarr_writes(mp))
case("write-read-only-predictions", predict(), r"Read-only file system.*predictions",
     needs="trained", inject=lambda sb, mp: b.read_only_folder(mp, sb.path("data/predictions")))


def kill_at_zarr_write(n: int):
    def arm(sb):
        import signal

        from zarr.storage import DirectoryStore

        original, counter = DirectoryStore._tofile, {"n": 0}

        def killing(a, fn):
            counter["n"] += 1
            if counter["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(a, fn)

        DirectoryStore._tofile = staticmethod(killing)

    return arm


case("write-sigkill-predict-overwrite", predict("--overwrite"), kind="killed", needs="predicted", kill=kill_at_zarr_write(40), after=predict())
case("write-sigkill-process-overwrite", PROCESS, kind="killed", needs="processed", kill=kill_at_zarr_write(5), after=["process", "-e", "fast"])
case("write-sigkill-train-overwrite", [*TRAIN, "--overwrite"], kind="killed", needs="trained", env={"CELLMAP_REPRO_SIGKILL_AT_ITERATION": "1"},
     keep="anywhere", after=RESUME)
case("write-sigkill-train-overwrite-at-manifest", [*TRAIN, "--overwrite"], kind="killed", needs="trained", kill=lambda sb: b.kill_at_write_step(1, kinds=("fsync",)),
     keep="anywhere", after=[*TRAIN, "--overwrite"])
case("write-sigkill-train-then-resume", TRAIN, kind="killed", env={"CELLMAP_REPRO_SIGKILL_AT_ITERATION": "1"}, after=RESUME)

# ---------------------------------------------------------------- train --overwrite checks everything first

OVERWRITE = [*TRAIN, "--overwrite"]
for case_id, change, pattern, extra_env in (
    ("bad-datasplit", lambda sb: sb.append(SPLIT, '"train","only","three"\n'), r"expected 5 fields", {}),
    ("raw-missing", lambda sb: sb.write(SPLIT, sb.read(SPLIT).replace(CONTAINER, "data/gone/jrc_gone.zarr")), r"does not exist", {}),
    ("config-syntax-error", lambda sb: sb.append(f"{EXP}/train_config.py", "\nvalue = (\n"), r"syntax error", {}),
    ("wrong-voxel-size", lambda sb: sb.write(f"{EXP}/model.py", sb.read(f"{EXP}/model.py").replace('"scale": (8.0, 8.0, 8.0)', '"scale": (4.0, 4.0, 4.0)')), r"coarser than the model input", {}),
    ("unknown-class", lambda sb: sb.edit(SPLIT, "mito]", "mitochondrion]"), r"unknown class 'mitochondrion'", {}),
    ("duplicate-row", lambda sb: sb.append(SPLIT, FIRST_ROW(sb) + "\n"), r"crop 1 .*line 1", {}),
    ("zarray-missing", lambda sb: sb.remove(f"{RAW}/s0/.zarray"), r"fibsem-uint8/s0: .*\.zarray", {}),
    ("input-16nm", INPUT_16NM, r"voxel size", {}),
    ("annotation-counts-missing", lambda sb: sb.edit_json(f"{LABEL}/s0/.zattrs", lambda a: a["cellmap"]["annotation"].pop("complement_counts")), r"complement_counts", {}),
    ("raw-chunks-truncated", truncate_chunks(f"{RAW}/s0"), r"(corrupt|truncated)", {}),
    ("SEED-abc", None, r"SEED.*'abc'", {"SEED": "abc"}),
    ("threads-zero", None, r"CELLMAP_REPRO_THREADS.*'0'", {"CELLMAP_REPRO_THREADS": "0"}),
):
    case(f"overwrite-keeps-run-{case_id}", OVERWRITE, pattern, needs="trained", setup=change, env=extra_env)
case("overwrite-keeps-run-batch-size-0", [*OVERWRITE, "--batch-size", "0"], r"--batch-size.*'0'", needs="trained")

# ---------------------------------------------------------------- two runs writing one experiment

LOCK_PATTERN = lambda sb: rf"in use by another run \(pid {sb.holder.pid}"  # noqa: E731
case("lock-train", TRAIN, LOCK_PATTERN, setup=lambda sb: sb.hold_lock(f"{CHECKPOINTS}/.lock"))
case("lock-train-overwrite", OVERWRITE, LOCK_PATTERN, needs="trained", setup=lambda sb: sb.hold_lock(f"{CHECKPOINTS}/.lock"))
case("lock-train-resume", RESUME, LOCK_PATTERN, needs="trained", setup=lambda sb: sb.hold_lock(f"{CHECKPOINTS}/.lock"))
case("lock-predict", predict("--overwrite"), LOCK_PATTERN, needs="predicted", setup=lambda sb: sb.hold_lock(f"{PREDICTIONS}/.lock"))
case("lock-process", PROCESS, LOCK_PATTERN, needs="processed", setup=lambda sb: sb.hold_lock(f"{PROCESSED}/.lock"))
case("lock-stale-file-is-no-lock", TRAIN, kind="ok", setup=lambda sb: sb.write(f"{CHECKPOINTS}/.lock", "999999"))

# ---------------------------------------------------------------- test-crop manifests in predict

for case_id, dataset, pattern in (
    ("absolute", None, r"test_crops\.csv: .*dataset '/.*outside'"),
    ("dotdot", "../outside", r"test_crops\.csv: .*dataset '\.\./outside'"),
    ("dotdot-inside", "jrc_tiny-1/../../outside", r"test_crops\.csv: .*dataset 'jrc_tiny-1/\.\./\.\./outside'"),
    ("dot", ".", r"test_crops\.csv: .*dataset '\.'"),
    ("empty", "", r"test_crops\.csv: .*dataset ''"),
):
    case(f"manifest-dataset-{case_id}", MANIFEST_ARGS, pattern, needs="trained",
         setup=lambda sb, d=dataset: with_manifest(row(dataset=d if d is not None else str(sb.path("outside"))))(sb))
for case_id, manifest_row, pattern in (
    ("shape-two-values", row(shape="[96;96]"), r"test_crops\.csv: .*shape"),
    ("shape-zero", row(shape="[0;96;96]"), r"test_crops\.csv: .*shape"),
    ("voxel-size-zero", row(voxel="[0;4;4]"), r"test_crops\.csv: .*voxel size"),
    ("translation-text", row(translation="[a;b;c]"), r"test_crops\.csv:2: malformed test-crop row"),
    ("crop-name-text", row(crop="cropX"), r"test_crops\.csv:2: malformed test-crop row"),
    ("raw-missing", row(dataset="jrc_gone"), r"raw of jrc_gone crop 3 does not exist"),
):
    case(f"manifest-{case_id}", MANIFEST_ARGS, pattern, needs="trained", setup=with_manifest(manifest_row))
case("manifest-missing-column", MANIFEST_ARGS, r"test_crops\.csv:2: malformed test-crop row", needs="trained",
     setup=with_manifest("3,jrc_tiny-1,mito,[4.0;4.0;4.0],[798.0;862.0;814.0]", header="crop_name,dataset,class_label,voxel_size,translation"))
case("manifest-header-only", MANIFEST_ARGS, r"test_crops\.csv: no rows", needs="trained", setup=with_manifest())
case("manifest-missing-file", MANIFEST_ARGS, r"test crop manifest not found", needs="trained")
case("predict-crops-unknown-id", predict("--crops", "99"), r"crop\(s\) \[99\] are not in the datasplit", needs="trained")
case("predict-crops-text", predict("--crops", "abc"), r"--crops must be", needs="trained")
case("predict-data-root-is-a-file", lambda sb: predict("--data", str(sb.path("afile"))), r"Not a directory", needs="trained",
     setup=lambda sb: sb.write("afile", "x"))

# ---------------------------------------------------------------- evaluate, TensorBoard logs

case("evaluate-no-processed-predictions", ["evaluate", "-e", "fast"], r"no processed predictions", needs="predicted")
case("evaluate-honours-data-py-datasplit-path", ["evaluate", "-e", "fast"], r"datasplit not found: .*missing\.csv", needs="processed",
     setup=lambda sb: sb.append(f"{EXP}/data.py", '\ndatasplit_path = "missing.csv"\n'))
case("evaluate-truth-chunks-truncated", ["evaluate", "-e", "fast"], r"crop3/mito/s0/\d+/\d+/\d+.*(corrupt|truncated)", needs="processed",
     setup=truncate_chunks(f"{LABELS}/crop3/mito/s0"))
case("unite-logs-no-experiments-folder", ["unite-logs", "--experiments-root", "nowhere"], r"experiments folder does not exist")

# ---------------------------------------------------------------- fetch and pack: paths from data stay in their folders

BUCKET = "cellmap-battery"


def fetch_with_evil_key(sb):
    """A bucket whose crop prefix holds a key with '../' that leads out of the data root."""
    from s3server import LocalS3

    server = LocalS3().start()
    sb.notes.setdefault("closers", []).append(server.stop)
    server.public_bucket(BUCKET)
    crop = "jrc_tiny-1/jrc_tiny-1.zarr/recon-1/labels/groundtruth/crop1"
    server.upload_tree(BUCKET, sb.path(f"{LABELS}/crop1/ecs"), f"{crop}/ecs")
    client = server.client()
    for metadata in sorted(sb.path(RAW).rglob(".z*")):  # raw chunks left out: absent, fill value
        key = f"jrc_tiny-1/jrc_tiny-1.zarr/recon-1/em/fibsem-uint8/{metadata.relative_to(sb.path(RAW)).as_posix()}"
        client.put_object(Bucket=BUCKET, Key=key, Body=metadata.read_bytes(), ACL="public-read")
    client.put_object(Bucket=BUCKET, Key=f"{crop}/../../../../../../../outside/evil", Body=b"x", ACL="public-read")
    base = f"s3://{BUCKET}/jrc_tiny-1/jrc_tiny-1.zarr/recon-1"
    manifest = f"crop_number,collection,alignment,crop_url,em_url\n1,jrc_tiny-1,recon-1,{base}/labels/groundtruth/crop1,{base}/em/fibsem-uint8\n"
    client.put_object(Bucket=BUCKET, Key="manifest.csv", Body=manifest.encode(), ACL="public-read")
    return ["fetch", "--data", "data/fetched", "--endpoint-url", server.endpoint, "--manifest", f"s3://{BUCKET}/manifest.csv", "--crops", "1"]


def decoy_processed_crop(sb):
    b.link_tree(sb.path(f"{PROCESSED}/jrc_tiny-1.zarr/crop3"), sb.path(f"{DECOY}/crop3"))


case("fetch-s3-key-with-dotdot", fetch_with_evil_key, r"evil.*is not a path inside")
PACK = ["pack", "-e", "fast", "--manifest", "test_crops.csv"]
case("pack-manifest-dataset-escapes-processed", PACK, r"dataset '\.\./\.\./\.\./outside'", needs="processed",
     setup=lambda sb: (decoy_processed_crop(sb), with_manifest(row(dataset="../../../outside"))(sb)))
case("pack-manifest-class-escapes-processed", PACK, r"is not a path inside", needs="processed",
     setup=lambda sb: (decoy_processed_crop(sb), with_manifest(f"3,jrc_tiny-1,../../../../../{DECOY}/crop3/mito,[8.0;8.0;8.0],[800.0;864.0;816.0],[48;48;48]")(sb)))

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# ---------------------------------------------------------------- fixtures and the test


@pytest.fixture(scope="session")
def battery_template(tmp_path_factory, tiny_dataset):
    """One trained, predicted and processed fast experiment that sandboxes copy from."""
    from cellmap_repro import predict as predict_stage
    from cellmap_repro import process, tiny_crop, train
    from cellmap_repro.datasplit import write_datasplit

    root = tmp_path_factory.mktemp("battery-template")
    b.link_tree(tiny_dataset, root / CONTAINER)
    shutil.copytree(FAST_EXPERIMENT, root / EXP, ignore=shutil.ignore_patterns("__pycache__", "checkpoints", "logs"))
    classes = [c.strip(' "') for c in (root / EXP / "data.py").read_text().split("classes = [", 1)[1].split("]", 1)[0].split(",")]
    write_datasplit(root / EXP / "datasplit.csv", tiny_crop.datasplit_rows(root / CONTAINER, classes, relative_to=root))
    shutil.copytree(root / EXP, root / "clean-experiment")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("CELLMAP_REPRO_DATA", str(root / "data"))
        mp.setenv("CELLMAP_REPRO_EXPERIMENTS", str(root / "experiments"))
        mp.setenv("CELLMAP_REPRO_THREADS", "1")
        mp.delenv("SEED", raising=False)
        train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
        predict_stage.predict("fast", progress=False)
        process.process("fast", progress=False)
    return root


@pytest.fixture
def sandbox(tmp_path, battery_template, request):
    needs = request.param
    root = tmp_path / "sandbox"
    b.link_tree(battery_template / CONTAINER, root / CONTAINER)
    b.link_tree(battery_template / CONTAINER / "recon-1" / "em", root / DECOY / "recon-1" / "em")  # a raw group to lure writes into
    (root / "outside").mkdir()
    shutil.copytree(battery_template / "clean-experiment", root / EXP)
    if needs in ("trained", "predicted", "processed"):
        for folder in ("checkpoints", "logs"):
            shutil.copytree(battery_template / EXP / folder, root / EXP / folder)
    if needs in ("predicted", "processed"):
        b.link_tree(battery_template / PREDICTIONS, root / PREDICTIONS)
    if needs == "processed":
        b.link_tree(battery_template / PROCESSED, root / PROCESSED)
    sb = b.Sandbox(root)
    yield sb
    for close in sb.notes.get("closers", []):
        close()
    sb.close()


@pytest.mark.parametrize(("case", "sandbox"), [pytest.param(c, c.needs, id=c.id) for c in CASES], indirect=["sandbox"])
def test_bad_input_never_wins(case: Case, sandbox, capsys, monkeypatch):
    from cellmap_repro.cli import main

    sb = sandbox
    monkeypatch.chdir(sb.root)
    env = {"CELLMAP_REPRO_DATA": str(sb.path("data")), "CELLMAP_REPRO_EXPERIMENTS": str(sb.path("experiments")),
           "CELLMAP_REPRO_THREADS": "1", "CELLMAP_REPRO_WEIGHTS": str(sb.path("weights")), "CELLMAP_REPRO_TRACEBACK": None,
           "SEED": None, "EXP": None, "TENSORBOARD_PORT": None, "CELLMAP_REPRO_DEVICE": None, "CELLMAP_REPRO_SIGKILL_AT_ITERATION": None}
    if case.kind != "killed":  # a kill case's environment is its child's alone (the follow-up runs here)
        env.update(case.env)
    for key, value in env.items():
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    if case.setup:
        case.setup(sb)
    argv = case.run(sb) if callable(case.run) else case.run
    capsys.readouterr()
    before = b.snapshot(sb.root)

    if case.kind == "killed":
        def body():
            os.environ.update(case.env)
            if case.kill:
                case.kill(sb)
            return main(argv) if argv else case.action(sb)

        outcome = b.run_killed(body)
        if outcome.raised:
            verdict = ("traceback", outcome.raised)
        else:  # killed, or the write finished before the chosen step came
            verdict = ("clear" if outcome.killed or outcome.code == 0 else "unclear", "killed" if outcome.killed else f"exit status {outcome.code}")
    else:
        with pytest.MonkeyPatch.context() as faults:
            if case.inject:
                case.inject(sb, faults)
            outcome = b.run_cli(argv, capsys) if argv else b.run_action(lambda: case.action(sb), capsys)
        if case.kind == "ok":
            verdict = ("traceback", outcome.raised) if outcome.raised else ("clear" if outcome.code == 0 else "unclear", outcome.stderr.strip()[-300:])
        else:
            pattern = case.expect(sb) if callable(case.expect) else case.expect
            verdict = b.verdict(outcome, pattern)

    after = b.snapshot(sb.root)
    lost = [] if case.keep == "none" else b.lost_outputs(before, after, anywhere=case.keep == "anywhere")
    lost += case.check(sb) if case.check else []
    outside = b.outside_writes(before, after)
    if case.after and not lost:
        follow = b.run_cli(case.after, capsys)
        if follow.code != 0 or follow.raised:
            lost.append(f"`{' '.join(case.after)}` then fails: {(follow.raised or follow.stderr).strip().splitlines()[-1:]} ")
    BATTERY[case.id] = {"verdict": verdict[0], "line": verdict[1], "lost": lost, "outside": outside}
    assert verdict[0] == "clear", f"{verdict[0]}: {verdict[1]}"
    assert not lost, f"lost outputs: {lost}"
    assert not outside, f"written outside the output folders: {outside[:5]}"


def test_battery_counts():
    """The battery is at least 100 cases; print the counts of what ran (also at session end)."""
    from conftest import battery_counts

    assert len(CASES) >= 100
    counts = battery_counts()
    print("\n" + counts["text"])
    if counts["tried"]:
        bad = {k: v for k, v in counts.items() if k in ("tracebacks", "wrong successes", "lost outputs", "outside writes", "unclear")}
        assert not any(bad.values()), counts["text"]
