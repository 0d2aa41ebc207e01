"""fetch against a real S3-compatible server on 127.0.0.1 (moto), never the internet."""

import json

import pytest

from conftest import cli
from s3server import LocalS3

BUCKET = "janelia-cosem-datasets"
DATASET = "jrc_tiny-1"


@pytest.fixture(scope="module")
def s3(tiny_dataset):
    server = LocalS3().start()
    client = server.client()
    server.public_bucket(BUCKET)
    server.upload_tree(BUCKET, tiny_dataset, f"{DATASET}/{DATASET}.zarr")
    rows = ["crop_number,collection,alignment,crop_url,em_url"]
    for crop in (1, 2, 3):
        base = f"s3://{BUCKET}/{DATASET}/{DATASET}.zarr/recon-1"
        rows.append(f"{crop},{DATASET},recon-1,{base}/labels/groundtruth/crop{crop},{base}/em/fibsem-uint8")
    rows.append(f"77,{DATASET},recon-1,s3://{BUCKET}/{DATASET}/{DATASET}.zarr/recon-1/labels/groundtruth/crop77,s3://{BUCKET}/{DATASET}/{DATASET}.zarr/recon-1/em/fibsem-uint8")
    client.put_object(Bucket=BUCKET, Key="manifest.csv", Body="\n".join(rows).encode() + b"\n", ACL="public-read")
    yield server
    server.stop()


def fetch_cli(s3, data, *args, env=None):
    return cli("fetch", "--data", str(data), "--endpoint-url", s3.endpoint, "--manifest", f"s3://{BUCKET}/manifest.csv", *args, env=env)


def local_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_full_fetch_is_identical_to_the_source(s3, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    result = fetch_cli(s3, data, "--crops", "1,2,3")
    assert result.returncode == 0, result.stderr
    fetched = data / DATASET / f"{DATASET}.zarr"
    source, copy = local_files(tiny_dataset), local_files(fetched)
    # every label object is copied; raw chunks only where the crops are
    assert {k: v for k, v in source.items() if "/labels/" in k} == {k: v for k, v in copy.items() if "/labels/" in k}
    for key, payload in copy.items():
        assert source[key] == payload
    raw_s0 = [k for k in copy if k.startswith("recon-1/em/fibsem-uint8/s0/") and not k.endswith((".zarray", ".zattrs"))]
    assert raw_s0, "the 8 nm raw chunks around the crops are fetched"
    assert "recon-1/em/fibsem-uint8/s1/.zarray" in copy
    assert "transferred" in result.stdout


def test_fetched_data_is_trainable_by_the_pipeline(s3, tmp_path, monkeypatch):
    from cellmap_repro import data as data_module
    from cellmap_repro.datasplit import make_datasplit, write_datasplit
    from cellmap_repro.experiment import load_experiment

    from conftest import FAST_EXPERIMENT
    import shutil

    data = tmp_path / "data"
    assert fetch_cli(s3, data, "--crops", "1,2,3").returncode == 0
    root = tmp_path / "experiments"
    shutil.copytree(FAST_EXPERIMENT, root / "fast", ignore=shutil.ignore_patterns("__pycache__"))
    classes = load_experiment("fast", root, parts=("data",)).classes
    write_datasplit(root / "fast" / "datasplit.csv", make_datasplit(data, classes, validation_prob=0.4, seed=1))
    training = data_module.build(load_experiment("fast", root))
    sample = training.train[0]
    assert sample["input"].shape[-3:] == (40, 40, 40) and sample["output"].shape[0] == len(classes)


def test_interrupted_fetch_continues_with_only_the_rest(s3, tmp_path):
    data = tmp_path / "data"
    killed = fetch_cli(s3, data, "--crops", "1", "--workers", "1", env={"CELLMAP_REPRO_SIGKILL_AFTER_OBJECTS": "10"})
    assert killed.returncode == -9
    recorded = json.loads((data / ".cellmap-repro-fetch.json").read_text())
    assert len(recorded) >= 10
    rerun = fetch_cli(s3, data, "--crops", "1", "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    complete = fetch_cli(s3, data, "--crops", "1")
    assert "0 objects transferred" in complete.stdout
    # the rerun transferred exactly what the killed run had not
    transferred = int(rerun.stdout.split(" objects transferred")[0].rsplit(" ", 1)[1])
    skipped = int(rerun.stdout.split(" already complete")[0].rsplit(" ", 1)[1])
    assert skipped >= 10 and transferred > 0


def test_corrupt_chunk_found_by_verify_and_repaired(s3, tmp_path):
    data = tmp_path / "data"
    assert fetch_cli(s3, data, "--crops", "3").returncode == 0
    assert cli("fetch", "--data", str(data), "--verify").returncode == 0
    chunk = next(p for p in sorted((data / DATASET).rglob("*")) if p.is_file() and "/crop3/mito/s0/" in p.as_posix())
    original = chunk.read_bytes()
    chunk.write_bytes(original[: len(original) // 2])
    verify = cli("fetch", "--data", str(data), "--verify")
    assert verify.returncode == 1 and chunk.name in verify.stdout
    repair = fetch_cli(s3, data, "--crops", "3")
    assert repair.returncode == 0 and "1 objects transferred" in repair.stdout
    assert chunk.read_bytes() == original
    assert cli("fetch", "--data", str(data), "--verify").returncode == 0


def test_dry_run_writes_nothing(s3, tmp_path):
    data = tmp_path / "data"
    result = fetch_cli(s3, data, "--crops", "1,3", "--dry-run")
    assert result.returncode == 0 and "would fetch 2 crop(s)" in result.stdout and "MB" in result.stdout
    assert not data.exists()


def one_line_error(result, fragment):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr.strip().splitlines()[-1]


def test_bad_crop_id_missing_object_and_server_down(s3, tmp_path):
    data = tmp_path / "data"
    one_line_error(fetch_cli(s3, data, "--crops", "999"), "unknown crop id(s) 999")
    one_line_error(fetch_cli(s3, data, "--crops", "77"), "object missing")
    down = cli("fetch", "--data", str(data), "--endpoint-url", "http://127.0.0.1:9", "--manifest", f"s3://{BUCKET}/manifest.csv")
    one_line_error(down, "cannot reach S3")


def test_disk_full_is_one_clear_error_and_leaves_no_partial_file(s3, tmp_path, monkeypatch):
    import errno
    import pathlib

    from cellmap_repro import fetch
    from cellmap_repro.errors import ReproError

    data = tmp_path / "data"
    real_write = pathlib.Path.write_bytes
    written = []

    def fill_up(self, payload):
        if len(written) >= 5:
            real_write(self, payload[: len(payload) // 2])  # a partial temporary file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(self)
        return real_write(self, payload)

    monkeypatch.setattr(pathlib.Path, "write_bytes", fill_up)
    with pytest.raises(ReproError, match="disk full while writing"):
        fetch.fetch(data, manifest=f"s3://{BUCKET}/manifest.csv", crops="1", endpoint=s3.endpoint, workers=1, progress=False)
    monkeypatch.setattr(pathlib.Path, "write_bytes", real_write)
    leftovers = [p for p in data.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert not leftovers, "no temporary file survives"
    recorded = json.loads((data / ".cellmap-repro-fetch.json").read_text())
    assert len(recorded) == 5, "what was fetched before the disk filled is kept and recorded"
    assert cli("fetch", "--data", str(data), "--verify").returncode == 0
