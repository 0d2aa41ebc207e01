"""Pretrained COSEM weights and the pieces experiments build models from.

cellmap-models reads a COSEM checkpoint only from a file inside its installed package
(and otherwise downloads it there with certificate checks off), which fails on a
read-only install or container image. So the project keeps the file in a weights cache
(``$CELLMAP_REPRO_WEIGHTS``, default ``<data>/weights``), builds the network through
cellmap-models' own architecture code (on the meta device: no weights, no forward pass
on real tensors), and loads the cached file itself with ``weights_only=True`` and the
key mapping of cellmap-models' loader (`remap_cosem_keys`). Nothing is written into
the installed packages.

`cellmap-repro weights` fills the cache: from the official URL (certificate checks on),
from a mirror (``--url``, http(s):// or file://) or from a local file (``--from``),
checking a sha256 when one is given or known.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cellmap_repro import settings
from cellmap_repro.errors import ReproError

SYNTHETIC_MARKER = "cellmap_repro_synthetic"
DEFAULT_CHECKPOINT = "setup04/1820500"
# sha256 of published COSEM checkpoint files, checked on every download or copy.
# None: not known to this project. The real setup04/1820500 file could not be downloaded
# where this was written, so its hash is unrecorded rather than guessed; pass
# `--sha256` to check a copy, and record the value here once it is confirmed.
KNOWN_SHA256: dict[str, str | None] = {
    "setup04/1820500": None,
}


def weights_file(weights_dir: Path, checkpoint: str) -> Path:
    return Path(weights_dir) / "cosem" / f"{checkpoint}.pth"


def checkpoint_url(checkpoint: str) -> str:
    from cellmap_models.pytorch import cosem

    if checkpoint not in cosem.models_dict:
        known = ", ".join(sorted(cosem.models_dict))
        raise ReproError(f"unknown COSEM checkpoint '{checkpoint}' (known: {known})")
    return cosem.models_dict[checkpoint]


def _check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ReproError(f"--sha256 must be 64 hexadecimal digits, not '{value}'")
    return value.lower()


@contextlib.contextmanager
def _open_source(source: str | Path, timeout: float):
    """A readable stream and its size (or None): a local file (a Path) or an http(s)/file URL."""
    if isinstance(source, Path):
        if not source.is_file():
            raise ReproError(f"weights file not found: {source}")
        with open(source, "rb") as handle:
            yield handle, source.stat().st_size
        return
    if urllib.parse.urlsplit(source).scheme.lower() not in ("http", "https", "file"):
        raise ReproError(f"unsupported URL '{source}': use http://, https:// or file://, or --from PATH for a local file")
    try:
        response = urllib.request.urlopen(source, timeout=timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReproError(
            f"cannot download weights from {source} ({reason}); on a site without internet use "
            "`cellmap-repro weights --url MIRROR_URL` or `--from FILE`, or `cellmap-repro tiny-crop` for synthetic weights"
        ) from None
    with response:
        yield response, int(response.headers.get("Content-Length") or 0) or None


def install_weights(source: str | Path, target: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Copy or download ``source`` into the cache at ``target``, atomically and checked.

    The file lands at ``target`` only when it is complete, matches ``sha256`` (when
    given) and loads as a weights-only torch checkpoint; otherwise nothing is left.
    """
    from tqdm import tqdm

    from cellmap_repro.storage import atomic_output_path

    digest = hashlib.sha256()
    with _open_source(source, timeout) as (stream, expected), atomic_output_path(target) as tmp:
        received = 0
        try:
            with open(tmp, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=f"weights {target.name}", disable=None) as bar:
                while block := stream.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as exc:  # network, disk full, permissions
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ReproError(f"copying {source} to {target} failed after {received} bytes ({reason}); nothing was kept") from None
        if expected is not None and received != expected:
            raise ReproError(f"download of {source} truncated: {received} of {expected} bytes; nothing was kept, run again")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ReproError(f"sha256 mismatch for {source}: expected {sha256}, got {digest.hexdigest()}; nothing was kept")
        _read_weights(tmp, where=source)
    return target


def _read_weights(path: Path, where: str | Path | None = None) -> dict:
    """The checkpoint dict, loaded weights-only (no code runs) and memory-mapped."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ReproError(
            f"weights file {where or path} is unreadable or truncated ({type(exc).__name__}: {first_line}); "
            "fetch it again with `cellmap-repro weights --force`"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise ReproError(f"weights file {where or path} is not a COSEM checkpoint (no 'model' state dict)")
    return payload


def remap_cosem_keys(state: dict) -> dict:
    """cellmap-models' key mapping for COSEM checkpoints (its ``load_model``, 0.2.4).

    Keys with ``chain`` are redundant copies and are dropped, a ``chain.0.*`` one after
    checking that it equals its ``architecture.*`` twin (cellmap-models' checks reduce
    to that one: its other comparisons compare a key with itself); every other key
    loses ``architecture.`` and has ``unet.`` renamed ``backbone.``.
    """
    import torch

    remapped = {}
    for key, tensor in state.items():
        if "chain" in key:
            twin = key.replace("chain.0", "architecture")
            if twin != key and twin in state and not torch.equal(tensor, state[twin]):
                raise ReproError(f"weights key '{key}' does not equal '{twin}'")
            continue
        remapped[key.replace("architecture.", "").replace("unet.", "backbone.")] = tensor
    return remapped


def build_architecture(checkpoint: str):
    """The COSEM network of ``checkpoint`` (e.g. setup04 for setup04/1820500), no weights yet.

    Built by cellmap-models on the meta device: its constructor's shape probe (a
    forward pass on the minimum input) then costs nothing, and no memory is filled
    with random weights that are overwritten at once.
    """
    import torch
    from cellmap_models.pytorch.cosem import load_model

    # cellmap-models prints "Not loading weights"; the weights come next, from the cache.
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        return load_model(checkpoint.split("/")[0])


def load_pretrained(checkpoint: str = DEFAULT_CHECKPOINT, weights_dir: Path | None = None, download: bool = True):
    """The pretrained COSEM network, weights from the cache (downloaded there if missing)."""
    cached = weights_file(weights_dir or settings.weights_root(), checkpoint)
    if not cached.exists():
        if not download:
            raise ReproError(f"{checkpoint} weights missing: {cached} (run `cellmap-repro weights`)")
        install_weights(checkpoint_url(checkpoint), cached, KNOWN_SHA256.get(checkpoint))
    payload = _read_weights(cached)
    if SYNTHETIC_MARKER in payload:
        print(
            f"WARNING: {cached} holds SYNTHETIC random {checkpoint} weights made by `cellmap-repro tiny-crop`; "
            "results are meaningless for real data. `cellmap-repro weights --force` fetches the real ones.",
            file=sys.stderr,
        )
    model = build_architecture(checkpoint)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict(remap_cosem_keys(payload["model"]), strict=True)
    except RuntimeError as exc:
        raise ReproError(f"{checkpoint} weights at {cached} do not fit the architecture ({str(exc)[:200]})") from None
    return model.eval()


def frozen(module, samples_at_once: int = 1):
    """``module`` with every parameter frozen (the pretrained backbone), run
    ``samples_at_once`` samples at a time.

    Nothing flows back through a frozen module, so its activations are only needed one
    sample at a time: splitting the batch bounds their memory by the batch size
    (setup04 at batch 4, 216³, CPU: 8.6 GB peak host RSS at once, 3.7 GB sample by sample)
    at no cost on a GPU, where one 216³ sample already fills the device.
    """
    import types

    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.samples_at_once = samples_at_once
    # An instance attribute, so parameter names (checkpoints, weights) stay those of the
    # module itself; bound with MethodType, so a deepcopy binds it to the copy.
    module.forward = types.MethodType(_forward_in_parts, module)
    return module


def _forward_in_parts(module, inputs, *args, **kwargs):
    import torch

    whole = type(module).forward
    if inputs.shape[0] <= module.samples_at_once:
        return whole(module, inputs, *args, **kwargs)
    return torch.cat([whole(module, part, *args, **kwargs) for part in inputs.split(module.samples_at_once)])


def conv_head(in_channels: int, out_channels: int, hidden_layers: int = 3, width: int | None = None):
    """The setup_04_all head: ``hidden_layers`` x [Conv3d k3 (valid) + ReLU], then a 1x1x1 conv."""
    import torch

    width = width or in_channels
    layers = []
    channels = in_channels
    for _ in range(hidden_layers):
        layers += [torch.nn.Conv3d(channels, width, kernel_size=3), torch.nn.ReLU()]
        channels = width
    layers.append(torch.nn.Conv3d(channels, out_channels, kernel_size=1))
    return layers


def reinitialize(model, prefixes: list[str], where: str) -> None:
    """``reset_parameters()`` of every module named by, or inside, one of ``prefixes``.

    Run right after the model is built, with torch's RNG seeded from the run seed, so a
    re-initialisation is as repeatable as the construction itself.
    """
    modules = dict(model.named_modules())
    for prefix in prefixes:
        chosen = [(n, m) for n, m in modules.items() if n == prefix or n.startswith(prefix + ".")]
        if not chosen:
            raise ReproError(f"{where}: reinitialize names '{prefix}', which is no module of the model (top-level modules: {', '.join(n for n, _ in model.named_children())})")
        for name, module in chosen:
            owns_parameters = any(True for _ in module.parameters(recurse=False))
            if owns_parameters and not hasattr(module, "reset_parameters"):
                raise ReproError(f"{where}: reinitialize: module '{name}' ({type(module).__name__}) has parameters but no reset_parameters()")
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def _meta_forward(model, shape):
    import torch
    from torch.func import functional_call

    # Meta copies of the weights: shapes only, no memory, no arithmetic, the real
    # parameters and buffers (BatchNorm statistics) untouched.
    meta = {n: torch.empty_like(t, device="meta") for n, t in (*model.named_parameters(), *model.named_buffers())}
    return functional_call(model, meta, (torch.empty(1, 1, *shape, device="meta"),))


def _fake_forward(model, shape):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    # For models that make tensors on a fixed device in forward (meta cannot mix with them).
    # In eval mode: in-place buffer updates (BatchNorm's counter) would reach the real buffers.
    with FakeTensorMode(allow_non_fake_inputs=True), _evaluating(model):
        return model(torch.empty(1, 1, *shape, device=_device(model)))


def _real_forward(model, shape):
    import torch

    # Last resort (a model whose forward needs real values, e.g. `.item()`): a real
    # forward in eval mode, so that BatchNorm statistics and RNGs are left alone.
    with _evaluating(model):
        return model(torch.zeros(1, 1, *shape, device=_device(model)))


@contextlib.contextmanager
def _evaluating(model):
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag


def _device(model):
    return next((p.device for p in model.parameters()), "cpu")


def model_output_shape(model, input_shape, forward=None) -> tuple[tuple[int, ...], object]:
    """The model's output shape for one 1-channel sample, and the cheapest forward that works.

    Tried in order: meta weights (milliseconds even for setup04), fake tensors, then a
    real forward; ``forward`` pins one of them (probes reuse the one that worked).
    """
    import torch

    error = None
    for attempt in [forward] if forward else (_meta_forward, _fake_forward, _real_forward):
        try:
            with torch.no_grad():
                out = attempt(model, tuple(int(s) for s in input_shape))
        except Exception as exc:  # any failure: try the next, more literal way
            error = exc
            continue
        if not isinstance(out, torch.Tensor):
            raise ReproError(f"the model returns {type(out).__name__}, not one tensor")
        return tuple(out.shape), attempt
    raise error


def check_shapes(model, input_shape, expected, where: str):
    """One line naming both shapes when the model does not map input to (classes, *target)."""
    try:
        shape, forward = model_output_shape(model, input_shape)
    except ReproError as exc:
        raise ReproError(f"{where}: {exc}") from None
    except Exception as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ReproError(f"{where}: the model fails on an input of input_array_info.shape {tuple(input_shape)}: {type(exc).__name__}: {message}") from None
    if shape[1:] != tuple(expected):
        raise ReproError(
            f"{where}: the model maps input_array_info.shape {tuple(input_shape)} to {shape[1:]}, "
            f"but (len(classes), *target_array_info.shape) = {tuple(expected)}"
        )
    return forward


def derive_input_step(model, input_shape, target_shape, ratio, forward, where: str, largest: int = 128) -> tuple[int, ...]:
    """Per axis the smallest d > 0 by which the input may grow: the output grows by exactly d * ratio."""
    steps = []
    for axis in range(len(input_shape)):
        for d in range(1, largest + 1):
            grown = list(input_shape)
            grown[axis] += d
            try:
                shape = model_output_shape(model, grown, forward)[0][2:]
            except Exception:
                continue  # not a valid input size
            wanted = list(target_shape)
            wanted[axis] += d * ratio[axis]
            if list(shape) == wanted:
                steps.append(d)
                break
        else:
            raise ReproError(f"{where}: no input size up to {largest} voxels larger along axis {axis} is valid for the model; declare input_step")
    return tuple(steps)


def output_size_for(input_shape, output_shape, step, needed) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Smallest valid (input, output) shape whose output covers ``needed`` voxels per axis."""
    inputs, outputs = [], []
    for i, o, s, n in zip(input_shape, output_shape, step, needed):
        k = max(0, math.ceil((n - o) / s))
        inputs.append(i + k * s)
        outputs.append(o + k * s)
    return tuple(inputs), tuple(outputs)


def run_weights(args: argparse.Namespace) -> int:
    target = weights_file(settings.weights_root(args.weights, settings.data_root(args.data)), args.checkpoint)
    expected = _check_sha256(args.sha256) or KNOWN_SHA256.get(args.checkpoint)
    if target.exists() and not args.force:
        kind = "synthetic" if SYNTHETIC_MARKER in _read_weights(target) else "real"
        if expected is not None:
            from cellmap_repro.storage import sha256_file

            actual = sha256_file(target)
            if actual != expected:
                raise ReproError(f"{target} has sha256 {actual}, not {expected}; --force replaces it")
            print(f"{target} already present ({kind}, sha256 checked)")
        else:
            print(f"{target} already present ({kind}); --force replaces it")
        return 0
    source = Path(args.source) if args.source else args.url or checkpoint_url(args.checkpoint)
    install_weights(source, target, expected)
    check = "sha256 checked" if expected else "no sha256 known: pass --sha256 to check the file"
    print(f"saved {target} ({check})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "weights",
        help="put pretrained COSEM weights into the weights cache (download, mirror or local file)",
        description="Download COSEM weights into the weights cache, or take them from a mirror or a local file.",
    )
    settings.add_data_argument(parser)
    parser.add_argument("--weights", default=None, help="weights cache (default: $CELLMAP_REPRO_WEIGHTS or <data>/weights)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="COSEM checkpoint name (default %(default)s)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", default=None, help="download from this URL instead (a mirror: https://, http:// or file://)")
    source.add_argument("--from", dest="source", default=None, metavar="PATH", help="copy this local file into the cache (air-gapped sites)")
    parser.add_argument("--sha256", default=None, help="expected sha256 of the file; checked before it enters the cache")
    parser.add_argument("--force", action="store_true", help="replace a file already in the cache (e.g. synthetic weights)")
    parser.set_defaults(func=run_weights)
