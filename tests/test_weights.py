"""setup04 weights: our loader equals cellmap-models', and `weights` fills the cache safely.

The cache is filled from the official URL, a mirror (http(s):// or file://) or a local
file, and a file whose sha256 differs from the given or known one never enters it.
"""

import hashlib
import http.server
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from cellmap_repro import model
from cellmap_repro.cli import main
from cellmap_repro.errors import ReproError

CHECKPOINT = "setup04/1820500"


def tensor_digests(module) -> dict:
    return {k: (v.dtype, tuple(v.shape), hashlib.sha256(v.detach().numpy().tobytes()).hexdigest()) for k, v in module.state_dict().items()}


def test_our_loader_gives_the_tensors_of_cellmap_models_loader(setup04_data, tmp_path, monkeypatch):
    """The same real-format file through both loaders: identical tensors, names and shapes.

    cellmap-models reads only ``<its package>/setup04/1820500.pth``: it is pointed at a
    scratch copy of its package folder (model.py plus the weights) through the loader
    module's ``__file__``, so nothing is written into site-packages. Its architecture is
    built on the meta device there too, which skips the constructor's 216^3 probe forward
    (20-50 s on 2 CPU cores) and changes nothing about how it reads, checks, renames and
    loads the weights.
    """
    cached = setup04_data / "weights" / "cosem" / "setup04" / "1820500.pth"
    ours = model.load_pretrained(CHECKPOINT, weights_dir=setup04_data / "weights", download=False)
    assert not ours.training and not any(p.is_meta for p in ours.parameters())
    expected = tensor_digests(ours)
    shapes = (ours.min_input_shape, ours.min_output_shape, ours.input_size_step)
    del ours

    import cellmap_models.pytorch.cosem  # noqa: F401  (loads the loader module)

    loader = sys.modules["cellmap_models.pytorch.cosem.load_model"]
    package = tmp_path / "cosem"
    (package / "setup04").mkdir(parents=True)
    shutil.copy(Path(loader.__file__).parent / "setup04" / "model.py", package / "setup04" / "model.py")
    (package / "setup04" / "1820500.pth").symlink_to(cached)
    monkeypatch.setattr(loader, "__file__", str(package / "load_model.py"))

    class MetaBuilt(loader.Architecture):
        def __init__(self, params):
            with torch.device("meta"):
                super().__init__(params)
            self.to_empty(device="cpu")

    monkeypatch.setattr(loader, "Architecture", MetaBuilt)
    theirs = loader.load_model(CHECKPOINT)
    assert tensor_digests(theirs) == expected
    assert (theirs.min_input_shape, theirs.min_output_shape, theirs.input_size_step) == shapes
    # the random weights would not pass: the comparison can fail
    assert len({digest for _, _, digest in expected.values()}) == len(expected)


def test_remap_drops_checked_chain_copies_and_renames():
    weight = torch.arange(4.0)
    state = {
        "architecture.unet.l0.weight": weight,
        "chain.0.unet.l0.weight": weight.clone(),
        "architecture.prediction_head.bias": torch.ones(2),
        "chain.1.bias": torch.ones(2),
    }
    assert set(model.remap_cosem_keys(state)) == {"backbone.l0.weight", "prediction_head.bias"}
    state["chain.0.unet.l0.weight"] = weight + 1
    with pytest.raises(ReproError, match="does not equal 'architecture.unet.l0.weight'"):
        model.remap_cosem_keys(state)
    # as in cellmap-models, a chain key without a twin is dropped unchecked
    assert model.remap_cosem_keys({"chain.1.other": weight, "architecture.unet.x": weight}) == {"backbone.x": weight}


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    target = model.weights_file(tmp_path, CHECKPOINT)
    target.parent.mkdir(parents=True)
    torch.save({"model": {"architecture.unet.extra.weight": torch.zeros(1)}}, target)
    with pytest.raises(ReproError, match="do not fit the architecture"):
        model.load_pretrained(CHECKPOINT, weights_dir=tmp_path, download=False)
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(ReproError, match="unreadable or truncated"):
        model.load_pretrained(CHECKPOINT, weights_dir=tmp_path, download=False)


@pytest.fixture
def source(tmp_path) -> Path:
    """A small file in the checkpoint format (the cache checks format, not architecture)."""
    path = tmp_path / "mirror" / "1820500.pth"
    path.parent.mkdir()
    torch.save({"model": {"architecture.unet.l0.weight": torch.arange(1000.0)}}, path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(cache: Path, *args: str) -> int:
    return main(["weights", "--weights", str(cache), *args])


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_from_a_local_file_with_its_sha256(source, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert weights(cache, "--from", str(source), "--sha256", sha(source).upper()) == 0
    target = model.weights_file(cache, CHECKPOINT)
    assert target.read_bytes() == source.read_bytes()
    assert "sha256 checked" in capsys.readouterr().out
    # present: kept, and checked again when a hash is given
    assert weights(cache, "--from", str(source), "--sha256", sha(source)) == 0
    assert "already present (real, sha256 checked)" in capsys.readouterr().out
    assert weights(cache, "--sha256", "0" * 64) == 2
    assert "--force replaces it" in capsys.readouterr().err


def test_sha256_mismatch_is_one_line_and_leaves_nothing(source, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert weights(cache, "--from", str(source), "--sha256", "ab" * 32) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 mismatch" in err and "nothing was kept" in err
    assert cache_files(cache) == []


def test_known_sha256_is_checked_without_the_flag(source, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setitem(model.KNOWN_SHA256, CHECKPOINT, "cd" * 32)
    assert weights(cache, "--from", str(source)) == 2
    assert "sha256 mismatch" in capsys.readouterr().err and cache_files(cache) == []
    monkeypatch.setitem(model.KNOWN_SHA256, CHECKPOINT, sha(source))
    assert weights(cache, "--from", str(source)) == 0
    assert cache_files(cache) == ["cosem/setup04/1820500.pth"]


def test_bad_input_is_one_line(source, tmp_path, capsys):
    cache = tmp_path / "cache"
    for args, message in (
        (["--from", str(tmp_path / "absent.pth")], "weights file not found"),
        (["--from", str(source), "--sha256", "xyz"], "64 hexadecimal digits"),
        (["--url", "ftp://mirror.example/1820500"], "use http://, https:// or file://"),
    ):
        assert weights(cache, *args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    assert weights(cache, "--from", str(not_a_checkpoint)) == 2
    assert "unreadable or truncated" in capsys.readouterr().err
    assert cache_files(cache) == []


class _Mirror(http.server.SimpleHTTPRequestHandler):
    truncate = False

    def log_message(self, *args):
        pass

    def send_header(self, keyword, value):
        # a server that announces more bytes than it sends, then closes: a cut download
        if self.truncate and keyword == "Content-Length":
            value = str(int(value) + 100)
        super().send_header(keyword, value)


@pytest.fixture
def mirror(source):
    """A loopback HTTP server over the source file's folder."""
    handler = type("Handler", (_Mirror,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(source.parent), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/{source.name}"
    server.shutdown()
    server.server_close()


def test_from_a_mirror_url(source, mirror, tmp_path, monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    handler, url = mirror
    cache = tmp_path / "cache"
    assert weights(cache, "--url", url, "--sha256", "ef" * 32) == 2
    assert cache_files(cache) == []
    assert weights(cache, "--url", url, "--sha256", sha(source)) == 0
    assert model.weights_file(cache, CHECKPOINT).read_bytes() == source.read_bytes()
    handler.truncate = True
    assert weights(cache, "--url", url, "--force") == 2
    # the cut download left the earlier complete file as it was, and nothing else
    assert cache_files(cache) == ["cosem/setup04/1820500.pth"]
    assert model.weights_file(cache, CHECKPOINT).read_bytes() == source.read_bytes()


def test_from_a_file_url(source, tmp_path):
    cache = tmp_path / "cache"
    assert weights(cache, "--url", source.as_uri(), "--sha256", sha(source)) == 0
    assert model.weights_file(cache, CHECKPOINT).read_bytes() == source.read_bytes()


def test_disk_full_names_the_file_and_leaves_nothing(source, tmp_path, monkeypatch, capsys):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model.os, "fsync", full)
    cache = tmp_path / "cache"
    assert weights(cache, "--from", str(source)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "1820500.pth" in err
    assert cache_files(cache) == []
