"""fetch against a real S3-compatible server on 127.0.0.1 (moto), never the internet.

The bucket holds the tiny dataset (``jrc_tiny-1``: crops 1-3, raw 256^3 at 8 nm in 64^3
chunks, so one chunk spans 512 nm) and ``jrc_holes-1``, the same raw EM with one chunk the
bucket never wrote. Crop 77 is in the manifest but not in the bucket. The test-crop
manifest has crop 101 (crop 3's box), 102 (its low edge on a chunk boundary) and 201
(in the dataset with the hole).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli
from s3server import LocalS3, Proxy

BUCKET = "janelia-cosem-datasets"
DATASET = "jrc_tiny-1"
HOLES = "jrc_holes-1"
HOLE = "recon-1/em/fibsem-uint8/s0/2/2/2"
RAW_S0 = f"{DATASET}/{DATASET}.zarr/recon-1/em/fibsem-uint8/s0"
TEST_MANIFEST = """crop_name,dataset,class_label,voxel_size,translation,shape
101,jrc_tiny-1,ecs,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]
101,jrc_tiny-1,mito,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]
102,jrc_tiny-1,mito,[8.0;8.0;8.0],[1536.0;1536.0;1536.0],[32;32;32]
201,jrc_holes-1,mito,[4.0;4.0;4.0],[798.0;862.0;814.0],[96;96;96]
"""


@pytest.fixture(scope="module")
def s3(tiny_dataset):
    server = LocalS3().start()
    client = server.client()
    server.public_bucket(BUCKET)
    server.upload_tree(BUCKET, tiny_dataset, f"{DATASET}/{DATASET}.zarr")
    server.upload_tree(BUCKET, tiny_dataset, f"{HOLES}/{HOLES}.zarr", skip=lambda path: "/labels/" in path or path == HOLE)
    rows = ["crop_number,collection,alignment,crop_url,em_url"]
    for crop in (1, 2, 3, 77):
        base = f"s3://{BUCKET}/{DATASET}/{DATASET}.zarr/recon-1"
        rows.append(f"{crop},{DATASET},recon-1,{base}/labels/groundtruth/crop{crop},{base}/em/fibsem-uint8")
    client.put_object(Bucket=BUCKET, Key="manifest.csv", Body="\n".join(rows).encode() + b"\n", ACL="public-read")
    client.put_object(Bucket=BUCKET, Key="test_crop_manifest.csv", Body=TEST_MANIFEST.encode(), ACL="public-read")
    yield server
    server.stop()


def manifests(endpoint):
    return ["--endpoint-url", endpoint, "--manifest", f"s3://{BUCKET}/manifest.csv", "--test-manifest", f"s3://{BUCKET}/test_crop_manifest.csv"]


def fetch_cli(s3, data, *args, endpoint=None):
    return cli("fetch", "--data", str(data), *manifests(endpoint or s3.endpoint), *args)


def fetch_popen(endpoint, data, *args, workers=2):
    command = [sys.executable, "-m", "cellmap_repro", "fetch", "--data", str(data), *manifests(endpoint), "--workers", str(workers), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def fetch_here(s3, data, crops, **options):
    from cellmap_repro import fetch

    return fetch.fetch(data, manifest=f"s3://{BUCKET}/manifest.csv", test_manifest=f"s3://{BUCKET}/test_crop_manifest.csv", crops=crops, endpoint=s3.endpoint, progress=False, **options)


def local_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def chunk_files(data, level="s0"):
    root = data / DATASET / f"{DATASET}.zarr/recon-1/em/fibsem-uint8" / level
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def one_line_error(result, fragment):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr.strip().splitlines()[-1], result.stderr


def record_matches_files(data, temporaries=False):
    """Every recorded object is on disk as recorded (re-hashed); no temporary file unless allowed."""
    from cellmap_repro.fetch import verify_local
    from cellmap_repro.fetch_record import load_entries

    assert verify_local(data)[0] == []
    assert temporaries or not list(data.rglob("*.tmp"))
    return load_entries(data)


def journal_lines(data):
    return sum(p.read_bytes().count(b"\n") for p in data.glob(".cellmap-repro-fetch.*.journal"))


def wait_for_lines(data, count, process, timeout=60):
    deadline = time.monotonic() + timeout
    while journal_lines(data) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_full_fetch_is_identical_to_the_source(s3, tiny_dataset, tmp_path):
    data = tmp_path / "data"
    result = fetch_cli(s3, data, "--crops", "1,2,3")
    assert result.returncode == 0, result.stderr
    fetched = data / DATASET / f"{DATASET}.zarr"
    source, copy = local_files(tiny_dataset), local_files(fetched)
    assert {k: v for k, v in source.items() if "/labels/" in k} == {k: v for k, v in copy.items() if "/labels/" in k}
    for key, payload in copy.items():
        assert source[key] == payload
    # setup_04_all (the repository's experiment) reads 216^3 voxels of 8 nm, rotated:
    # 1504 nm around the crops covers the whole tiny volume, at 8 nm (s0) only.
    assert "1504 nm" in result.stdout and "setup_04_all" in result.stdout
    assert len(chunk_files(data, "s0")) == 64 and not chunk_files(data, "s1")
    assert "recon-1/em/fibsem-uint8/s1/.zarray" in copy


def test_default_context_comes_from_the_experiments_input_windows(s3, tmp_path):
    from cellmap_repro.fetch_record import voxel_box

    experiments = tmp_path / "experiments"
    (experiments / "big").mkdir(parents=True)
    # never imported: importing it would fail
    (experiments / "big" / "model.py").write_text('raise RuntimeError("imported")\ninput_array_info = {"shape": (20, 40, 40), "scale": (8.0, 8.0, 8.0)}\n')
    (experiments / "big" / "data.py").write_text('spatial_transforms = {"mirror": {"axes": {"x": 0.5}}}\n')
    data = tmp_path / "data"
    summary = fetch_here(s3, data, "1", experiments_root=experiments)
    assert summary["context"].startswith("168 nm") and "big" in summary["context"]  # 40 x 8 / 2 + one voxel
    low, high = np.array([828.0] * 3) - 168, np.array([828.0 + 384] * 3) + 168  # crop 1's box +- context
    start, stop = voxel_box(low, high, (0, 0, 0), (8, 8, 8))
    expected = {f"{z}/{y}/{x}" for z in range(start[0] // 64, (stop[0] - 1) // 64 + 1) for y in range(start[1] // 64, (stop[1] - 1) // 64 + 1) for x in range(start[2] // 64, (stop[2] - 1) // 64 + 1)}
    assert chunk_files(data) == expected and len(expected) < 64
    (experiments / "big" / "data.py").write_text('spatial_transforms = {"rotate": {"axes": {"z": [-180, 180]}}}\n')
    rotated = fetch_here(s3, tmp_path / "dry", "1", experiments_root=experiments, dry_run=True)
    assert rotated["context"].startswith(f"{0.5 * 8 * np.sqrt(20**2 + 40**2 + 40**2) + 8:.0f} nm")
    assert not (tmp_path / "dry").exists()


def test_training_stops_on_never_fetched_raw_with_the_command_that_fetches_it(s3, tmp_path, tiny_dataset):
    from cellmap_repro.data import check_rows
    from cellmap_repro.datasplit import make_datasplit
    from cellmap_repro.errors import ReproError

    data = tmp_path / "data"
    fetch_here(s3, data, "1", raw_context_nm=0)
    rows = make_datasplit(data, ["ecs", "mito"])
    window = {"input_scale": (8.0, 8.0, 8.0), "target_scale": (8.0, 8.0, 8.0), "where": "datasplit.csv", "input_shape": (216, 216, 216), "rotates": True}
    with pytest.raises(ReproError) as error:
        check_rows(rows, **window)
    message = str(error.value)
    assert "never fetched" in message and "crop 1" in message
    command = message.split("run `")[1].rstrip("`")
    assert command == "cellmap-repro fetch --crops 1 --raw-context-nm 1505"
    assert fetch_cli(s3, data, *command.split()[2:]).returncode == 0
    check_rows(rows, **window)  # now complete
    # data that no fetch wrote (the generated tiny crop) is taken as complete
    check_rows(make_datasplit(tiny_dataset.parent.parent, ["ecs", "mito"]), **window)


def test_fetched_data_is_trainable_by_the_pipeline(s3, tmp_path):
    import shutil

    from cellmap_repro import data as data_module
    from cellmap_repro.datasplit import make_datasplit, write_datasplit
    from cellmap_repro.experiment import load_experiment
    from conftest import FAST_EXPERIMENT

    root = tmp_path / "experiments"
    shutil.copytree(FAST_EXPERIMENT, root / "fast", ignore=shutil.ignore_patterns("__pycache__"))
    data = tmp_path / "data"
    assert fetch_cli(s3, data, "--crops", "1,2,3", "--experiments-root", str(root)).returncode == 0
    classes = load_experiment("fast", root, parts=("data",)).classes
    write_datasplit(root / "fast" / "datasplit.csv", make_datasplit(data, classes, validation_prob=0.4, seed=1))
    training = data_module.build(load_experiment("fast", root))
    sample = training.train.read(0, seed=0)
    assert sample["input"].shape[-3:] == (40, 40, 40) and sample["output"].shape[0] == len(classes)


def test_test_crops_are_fetched_and_predicted_right_after(s3, fast_experiment, tmp_path, capsys):
    from cellmap_repro import predict, train
    from cellmap_repro.errors import ReproError

    train.train("fast", overrides=train.Overrides(epochs=1, iterations_per_epoch=1, batch_size=1, validation_batches=0), progress=False)
    manifest = tmp_path / "test_crop_manifest.csv"
    manifest.write_text(TEST_MANIFEST)
    data = tmp_path / "data"
    summary = fetch_here(s3, data, "test", raw_context_nm=0)
    assert summary["crops"] == 3 and summary["absent"] == 1
    assert not (data / DATASET / f"{DATASET}.zarr/recon-1/labels").exists(), "test crops have no labels"
    # crop 102's low edge lies on a chunk boundary: the tiles read 32 nm below it, never fetched
    with pytest.raises(ReproError, match=r"around crop 102 was never fetched .*run `cellmap-repro fetch --crops 102 --raw-context-nm 40`"):
        predict.predict("fast", data_root=data, test_manifest=manifest, progress=False)
    fetch_here(s3, data, "102", raw_context_nm=40)
    out = predict.predict("fast", data_root=data, test_manifest=manifest, progress=False)
    for dataset, crop in ((DATASET, 101), (DATASET, 102), (HOLES, 201)):
        assert (out / f"{dataset}.zarr" / f"crop{crop}" / "mito" / "s0" / ".zarray").exists()
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "crop 201" in warnings[0] and "does not exist in the bucket" in warnings[0]
    # A whole volume of a fetched dataset: fetch brought only the crops, the rest would read as zeros.
    from cellmap_repro import volume

    with pytest.raises(ReproError, match=r"raw of jrc_holes-1: \d+% of the raw that the model reads around roi_all was never fetched .*crops and their context only"):
        volume.predict_volume("fast", data_root=data, dataset=HOLES, progress=False)
    assert not (out / f"{HOLES}.zarr" / "roi_all.partial").exists()


def test_a_rerun_over_a_complete_copy_reads_no_data(s3, tmp_path, monkeypatch):
    from cellmap_repro import fetch_record

    data = tmp_path / "data"
    first = fetch_here(s3, data, "3", raw_context_nm=0)
    assert first["transferred"] == first["objects"] > 0
    hashed = []
    monkeypatch.setattr(fetch_record, "md5_file", lambda path: hashed.append(path) or "")
    again = fetch_here(s3, data, "3", raw_context_nm=0)
    assert again["transferred"] == 0 and again["complete"] == first["objects"] and hashed == []


def test_a_record_written_before_issue_12_is_read_without_refetching(s3, tmp_path):
    from cellmap_repro.fetch_record import RECORD_NAME, load_entries

    data = tmp_path / "data"
    first = fetch_here(s3, data, "3", raw_context_nm=0)
    # the old record: one flat JSON object, ETags with their quotes, no mtimes
    old = {key: {"size": e["size"], "md5": e["md5"], "etag": f'"{e["etag"]}"'} for key, e in load_entries(data).items()}
    (data / RECORD_NAME).write_text(json.dumps(old, indent=2))
    again = fetch_here(s3, data, "3", raw_context_nm=0)
    assert again["transferred"] == 0 and again["changed"] == [] and again["complete"] == first["objects"]
    assert all("mtime_ns" in entry for entry in load_entries(data).values()), "hashed once, then known by mtime"


def test_dry_run_reports_the_bytes_and_writes_nothing(s3, tmp_path):
    data = tmp_path / "data"
    result = fetch_cli(s3, data, "--crops", "1,3", "--raw-context-nm", "100", "--dry-run")
    assert result.returncode == 0 and "would fetch 2 crop(s)" in result.stdout and "raw s0 (8x8x8 nm): " in result.stdout
    assert not data.exists()
    planned = fetch_here(s3, tmp_path / "dry", "1,3", raw_context_nm=100, dry_run=True)
    fetched = fetch_here(s3, data, "1,3", raw_context_nm=100)
    written = {p: p.stat().st_size for p in data.rglob("*") if p.is_file() and not p.name.startswith(".cellmap-repro-fetch")}
    assert planned["bytes"] == sum(written.values()) == fetched["transferred_bytes"] and planned["objects"] == len(written)
    assert f"{planned['bytes'] / 1e6:,.1f} MB in {planned['objects']} objects" in result.stdout


def test_sigkilled_fetch_continues_with_only_the_rest(s3, tmp_path):
    data = tmp_path / "data"
    proxy = Proxy(s3.port, delay=0.02)
    process = fetch_popen(proxy.endpoint, data, "--crops", "1")
    wait_for_lines(data, 10, process)
    process.kill()
    process.wait()
    proxy.cut()
    recorded = record_matches_files(data, temporaries=True)  # a SIGKILL leaves hidden .tmp files
    assert len(recorded) >= 10
    rerun = fetch_here(s3, data, "1")
    assert rerun["complete"] >= len(recorded) and rerun["transferred"] > 0
    assert rerun["complete"] + rerun["transferred"] == rerun["objects"]
    record_matches_files(data)  # the rerun, alone in the data root, removed them
    assert fetch_here(s3, data, "1")["transferred"] == 0


@pytest.mark.parametrize("fault", ["ctrl-c", "server lost"])
def test_fault_stops_within_5_s_leaving_a_record_that_matches_the_files(s3, tmp_path, fault):
    data = tmp_path / "data"
    proxy = Proxy(s3.port, delay=0.02)
    process = fetch_popen(proxy.endpoint, data, "--crops", "1", workers=4)
    wait_for_lines(data, 5, process)
    began = time.monotonic()
    if fault == "ctrl-c":
        process.send_signal(signal.SIGINT)
    else:
        proxy.cut()
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - began < 5, stderr
    proxy.cut()
    if fault == "ctrl-c":
        assert process.returncode == 130 and "interrupted" in stderr
    else:
        assert process.returncode == 2 and "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert "S3" in last and "run the same command again" in last, last
    record_matches_files(data)
    again = fetch_here(s3, data, "1")
    assert again["transferred"] > 0 and again["complete"] >= 5


def test_disk_full_names_the_object_and_keeps_what_was_fetched(s3, tmp_path):
    data = tmp_path / "small-disk"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(data)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        result = fetch_cli(s3, data, "--crops", "1")  # ~13 MB of raw and labels
        one_line_error(result, "disk full while writing")
        last = result.stderr.strip().splitlines()[-1]
        assert f"{data}/{DATASET}/" in last and f"s3://{BUCKET}/{DATASET}/" in last
        record_matches_files(data)
        assert cli("fetch", "--data", str(data), "--verify").returncode == 0
    finally:
        subprocess.run(["umount", str(data)], check=True)


def test_damaged_record_is_one_line_and_rebuilt_from_the_files(s3, tmp_path):
    from cellmap_repro.fetch_record import RECORD_NAME

    data = tmp_path / "data"
    fetch_here(s3, data, "3", raw_context_nm=0)
    record = data / RECORD_NAME
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])  # e.g. a disk full mid-write by another tool
    one_line_error(fetch_cli(s3, data, "--crops", "3", "--raw-context-nm", "0"), "--rebuild-record")
    one_line_error(cli("fetch", "--data", str(data), "--verify"), "is damaged")
    rebuilt = cli("fetch", "--data", str(data), "--rebuild-record")
    assert rebuilt.returncode == 0 and "rebuilt" in rebuilt.stdout
    record_matches_files(data)
    assert fetch_here(s3, data, "3", raw_context_nm=0)["transferred"] == 0


def test_journal_tolerates_a_cut_last_line_but_not_damage_inside(tmp_path):
    from cellmap_repro.errors import ReproError
    from cellmap_repro.fetch_record import Record, load_entries

    with Record(tmp_path) as record:
        record.add("a", {"absent": True})
        record.add("b", {"absent": True})
        journal = record.journal
        with open(journal, "ab") as handle:
            handle.write(b'{"key": "c", "abs')  # killed mid-write
        assert set(load_entries(tmp_path)) == {"a", "b"}
        journal.write_bytes(b'{"key": "a"}\nnot json\n{"key": "b"}\n')
        with pytest.raises(ReproError, match="damaged at line 2"):
            load_entries(tmp_path)
        journal.write_bytes(b'{"key": "a", "absent": true}\n')
    assert set(load_entries(tmp_path)) == {"a"}
    assert not list(tmp_path.glob("*.journal")), "folded into the snapshot when the fetch ends alone"


def test_concurrent_fetches_into_one_root_keep_every_entry(s3, tmp_path):
    data = tmp_path / "data"
    first = fetch_popen(s3.endpoint, data, "--crops", "1", "--raw-context-nm", "0", workers=4)
    second = fetch_popen(s3.endpoint, data, "--crops", "2", "--raw-context-nm", "0", workers=4)
    for process in (first, second):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    entries = record_matches_files(data)
    for crop in (1, 2):
        labels = data / DATASET / f"{DATASET}.zarr/recon-1/labels/groundtruth/crop{crop}"
        files = {p.relative_to(data).as_posix() for p in labels.rglob("*") if p.is_file()}
        assert files and files <= set(entries)
    assert fetch_here(s3, data, "1,2", raw_context_nm=0)["transferred"] == 0


def test_absent_chunks_verify_as_absent(s3, tmp_path):
    from cellmap_repro.fetch_record import load_entries

    data = tmp_path / "data"
    result = fetch_cli(s3, data, "--crops", "201", "--raw-context-nm", "0")
    assert result.returncode == 0 and "1 absent in the bucket" in result.stdout
    assert load_entries(data)[f"{HOLES}/{HOLES}.zarr/{HOLE}"] == {"absent": True}
    assert not (data / HOLES / f"{HOLES}.zarr" / HOLE).exists()
    assert cli("fetch", "--data", str(data), "--verify").returncode == 0
    again = fetch_here(s3, data, "201", raw_context_nm=0)
    assert again["transferred"] == 0 and again["absent"] == 1


def test_one_missing_crop_is_reported_while_the_rest_are_fetched(s3, tmp_path):
    data = tmp_path / "data"
    result = fetch_cli(s3, data, "--crops", "1,77", "--raw-context-nm", "0")
    one_line_error(result, "1 crop(s) could not be fetched (crop 77: object missing")
    assert "the other 1 are complete" in result.stderr
    assert (data / DATASET / f"{DATASET}.zarr/recon-1/labels/groundtruth/crop1/mito/.zattrs").exists()
    record_matches_files(data)


def test_refresh_fetches_objects_changed_upstream(s3, tmp_path):
    data = tmp_path / "data"
    key = f"{HOLES}/{HOLES}.zarr/recon-1/em/fibsem-uint8/s0/1/1/1"
    client = s3.client()
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    fetch_here(s3, data, "201", raw_context_nm=0)
    try:
        client.put_object(Bucket=BUCKET, Key=key, Body=original[::-1], ACL="public-read")
        kept = fetch_cli(s3, data, "--crops", "201", "--raw-context-nm", "0")
        assert kept.returncode == 0 and "1 object(s) changed upstream" in kept.stdout and "--refresh" in kept.stdout
        assert (data / key).read_bytes() == original
        refreshed = fetch_here(s3, data, "201", raw_context_nm=0, refresh=True)
        assert refreshed["transferred"] == 1 and (data / key).read_bytes() == original[::-1]
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=original, ACL="public-read")


def test_corrupt_chunk_found_by_verify_and_repaired(s3, tmp_path):
    data = tmp_path / "data"
    fetch_here(s3, data, "3", raw_context_nm=0)
    chunk = next(p for p in sorted((data / DATASET).rglob("*")) if p.is_file() and "/crop3/mito/s0/" in p.as_posix())
    original = chunk.read_bytes()
    chunk.write_bytes(original[: len(original) // 2])
    verify = cli("fetch", "--data", str(data), "--verify")
    assert verify.returncode == 1 and chunk.name in verify.stdout
    assert fetch_here(s3, data, "3", raw_context_nm=0)["transferred"] == 1
    assert chunk.read_bytes() == original


def test_bad_crop_id_missing_object_and_server_down(s3, tmp_path):
    data = tmp_path / "data"
    one_line_error(fetch_cli(s3, data, "--crops", "999"), "unknown crop id(s) 999")
    one_line_error(fetch_cli(s3, data, "--crops", "77"), "object missing")
    down = cli("fetch", "--data", str(data), "--endpoint-url", "http://127.0.0.1:9", "--manifest", f"s3://{BUCKET}/manifest.csv")
    one_line_error(down, "cannot reach S3")


def test_each_stage_imports_only_its_own_module():
    from cellmap_repro import cli as cli_module

    parser = cli_module.build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)
    assert registered == set(cli_module.STAGE_VERBS)
    for verb in registered:
        assert verb in cli_module.build_parser(verb)._subparsers._group_actions[0].choices
    code = "import sys; from cellmap_repro import cli; cli.build_parser('fetch'); print(sorted(m for m in ('torch', 'scipy', 'zarr', 'pydantic_ome_ngff') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True)
    assert imported.stdout.strip() == "[]"


# --- keys that would land outside the data root (issue 13) ----------------------------------

def written_outside(tmp_path, data):
    """Files and folders under tmp_path that are neither the data root, in it, nor above it."""
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p != data and data not in p.parents and p not in data.parents)


# Relative to a crop's prefix: seven `..` climb out of <data> itself (the GET of such a key
# fails on a path-style endpoint, but the folder for it was made before; on AWS's
# virtual-hosted style the URL lands on another object of the bucket). Backslashes are no
# separator on Linux, but are refused as they would be one where the data is read on Windows.
HOSTILE = {9: "../../../../../../../escaped/outside.txt", 10: "mito/..\\..\\..\\..\\..\\..\\..\\..\\outside.txt"}


@pytest.fixture(scope="module")
def hostile(s3, tiny_dataset):
    """Crops 9 and 10: crop 1's ground truth under other prefixes, each with one object whose
    key points outside (HOSTILE); listed, with crop 1, by their own crop manifest."""
    client, labels = s3.client(), f"{DATASET}/{DATASET}.zarr/recon-1/labels/groundtruth"
    em = f"s3://{BUCKET}/{DATASET}/{DATASET}.zarr/recon-1/em/fibsem-uint8"
    for crop, relative in HOSTILE.items():
        s3.upload_tree(BUCKET, tiny_dataset / "recon-1/labels/groundtruth/crop1", f"{labels}/crop{crop}")
        client.put_object(Bucket=BUCKET, Key=f"{labels}/crop{crop}/{relative}", Body=b"planted", ACL="public-read")
    rows = [f"{crop},{DATASET},recon-1,s3://{BUCKET}/{labels}/crop{crop},{em}" for crop in (1, *HOSTILE)]
    client.put_object(Bucket=BUCKET, Key="hostile_manifest.csv", Body=("crop_number,collection,alignment,crop_url,em_url\n" + "\n".join(rows) + "\n").encode(), ACL="public-read")
    yield {crop: f"{labels}/crop{crop}/{relative}" for crop, relative in HOSTILE.items()}
    for crop in HOSTILE:
        keys = [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{labels}/crop{crop}/")["Contents"]]
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key} for key in keys]})
    client.delete_object(Bucket=BUCKET, Key="hostile_manifest.csv")


def test_a_listed_key_escaping_the_data_root_stops_the_fetch_with_nothing_written_outside(s3, hostile, tmp_path):
    data = tmp_path / "deep" / "data"
    result = cli("fetch", "--data", str(data), "--endpoint-url", s3.endpoint, "--manifest", f"s3://{BUCKET}/hostile_manifest.csv", "--crops", "1,9", "--raw-context-nm", "0", "--workers", "2")
    one_line_error(result, f"S3 object key {hostile[9]!r} is not a path inside {data}; refused; fetch stopped")
    assert written_outside(tmp_path, data) == []
    assert not (data / DATASET / f"{DATASET}.zarr/recon-1/labels/groundtruth/crop9").exists()  # refused before any of crop 9 was queued
    record_matches_files(data)  # what crop 1 got before the stop is in place and recorded


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_key_escaping_through_backslashes_is_refused_too(s3, hostile, tmp_path, dry_run):
    from cellmap_repro.fetch import UnsafeKey, fetch

    data = tmp_path / "data"
    with pytest.raises(UnsafeKey, match="is not a path inside"):
        fetch(data, manifest=f"s3://{BUCKET}/hostile_manifest.csv", crops="10", endpoint=s3.endpoint, raw_context_nm=0, dry_run=dry_run, progress=False)
    assert written_outside(tmp_path, data) == [] and not list(data.rglob("*.zarr"))


@pytest.mark.parametrize("key", ["/etc/cellmap-outside", "a/../../outside", "a\\..\\..\\outside", "", "a/\0/b"])
def test_every_key_is_confined_before_it_becomes_a_path(tmp_path, key):
    from cellmap_repro.fetch import UnsafeKey, decide

    data = tmp_path / "data"
    with pytest.raises(UnsafeKey, match="is not a path inside"):
        decide({key: (7, None)}, set(), {}, data, refresh=False)
    with pytest.raises(UnsafeKey, match="is not a path inside"):
        decide({}, {key}, {}, data, refresh=False)


def test_a_record_naming_a_path_outside_is_refused_by_verify(tmp_path):
    from cellmap_repro.fetch import UnsafeKey, verify_local
    from cellmap_repro.fetch_record import RECORD_NAME, write_snapshot

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.txt").write_text("not fetched")
    write_snapshot(data, {"../secret.txt": {"size": 11, "md5": "0" * 32, "etag": "0" * 32, "mtime_ns": 0}})
    with pytest.raises(UnsafeKey, match=f"fetch record {data / RECORD_NAME} '../secret.txt' is not a path inside {data}; refused"):
        verify_local(data)
