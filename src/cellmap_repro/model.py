"""Pretrained COSEM weights and the pieces experiments build models from.

cellmap-models loads ``setup04/1820500`` only from a file inside its installed package
(``.../cellmap_models/pytorch/cosem/setup04/1820500.pth``) and otherwise downloads it
with certificate checks disabled. We keep the file in a weights cache instead
(``$CELLMAP_REPRO_WEIGHTS``, default ``<data>/weights``), download it ourselves with
certificate checks on, and make the package path a symlink to the cached file, so the
model still goes through cellmap-models' own loading and key remapping unchanged.
In the container image that symlink is created at build time.

`cellmap-repro weights` downloads the real weights into the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from cellmap_repro import settings
from cellmap_repro.errors import ReproError

SYNTHETIC_MARKER = "cellmap_repro_synthetic"
DEFAULT_CHECKPOINT = "setup04/1820500"


def weights_file(weights_dir: Path, checkpoint: str) -> Path:
    return Path(weights_dir) / "cosem" / f"{checkpoint}.pth"


def package_weights_path(checkpoint: str) -> Path:
    from cellmap_models.pytorch import cosem

    return Path(cosem.__file__).parent / f"{checkpoint.replace('.', '_')}.pth"


def checkpoint_url(checkpoint: str) -> str:
    from cellmap_models.pytorch import cosem

    if checkpoint not in cosem.models_dict:
        known = ", ".join(sorted(cosem.models_dict))
        raise ReproError(f"unknown COSEM checkpoint '{checkpoint}' (known: {known})")
    return cosem.models_dict[checkpoint]


def download_weights(checkpoint: str, target: Path, timeout: float = 60.0) -> Path:
    """Download a COSEM checkpoint to ``target`` atomically, certificate checks on."""
    from tqdm import tqdm

    from cellmap_repro.storage import atomic_output_path

    url = checkpoint_url(checkpoint)
    try:
        with contextlib.ExitStack() as stack:
            response = stack.enter_context(urllib.request.urlopen(url, timeout=timeout))
            expected = int(response.headers.get("Content-Length") or 0) or None
            tmp = stack.enter_context(atomic_output_path(target))
            received = 0
            with open(tmp, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=f"download {checkpoint}") as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            if expected is not None and received != expected:
                raise ReproError(f"download of {url} truncated: {received} of {expected} bytes; nothing was kept, run again")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReproError(
            f"cannot download setup04 weights from {url} ({reason}); place the file at {target} "
            "or run `cellmap-repro tiny-crop` for synthetic weights"
        ) from None
    return target


def link_into_package(cached: Path, checkpoint: str) -> None:
    """Make cellmap-models' package path for ``checkpoint`` point at the cached file."""
    package_path = package_weights_path(checkpoint)
    with contextlib.suppress(OSError):
        if package_path.resolve() == cached.resolve():
            return
    package_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_link = package_path.with_name(f".{package_path.name}.{os.getpid()}.link")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        tmp_link.symlink_to(cached.resolve())
        os.replace(tmp_link, package_path)
    except OSError as exc:
        raise ReproError(
            f"cannot point cellmap-models at {cached}: {package_path} is not writable ({exc.strerror}); "
            f"link it once by hand: ln -sf {cached.resolve()} {package_path}"
        ) from None


def load_pretrained(checkpoint: str = DEFAULT_CHECKPOINT, weights_dir: Path | None = None, download: bool = True):
    """The pretrained COSEM network through cellmap-models' loader, weights from the cache."""
    import torch

    cached = weights_file(weights_dir or settings.weights_root(), checkpoint)
    if not cached.exists():
        if not download:
            raise ReproError(f"setup04 weights missing: {cached} (run `cellmap-repro weights`)")
        download_weights(checkpoint, cached)
    payload = _peek(cached)
    if SYNTHETIC_MARKER in payload:
        print(
            f"WARNING: {cached} holds SYNTHETIC random setup04 weights made by `cellmap-repro tiny-crop`; "
            "results are meaningless for real data. `cellmap-repro weights --force` fetches the real ones.",
            file=sys.stderr,
        )
    link_into_package(cached, checkpoint)
    from cellmap_models.pytorch.cosem import load_model

    # Building runs a forward pass on the minimum input; no autograd graph needed.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        try:
            return load_model(checkpoint)
        except (RuntimeError, KeyError, AssertionError, EOFError) as exc:
            raise ReproError(f"setup04 weights at {cached} do not load ({type(exc).__name__}: {str(exc)[:200]})") from None


def _peek(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ReproError(f"setup04 weights file is unreadable or truncated: {path} ({type(exc).__name__}); delete it and run `cellmap-repro weights`") from None


def frozen(module):
    """``module`` with every parameter frozen (the pretrained backbone)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


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
    if target.exists() and not args.force:
        payload = _peek(target)
        kind = "synthetic" if SYNTHETIC_MARKER in payload else "real"
        print(f"{target} already present ({kind}); --force downloads it again")
        return 0
    download_weights(args.checkpoint, target)
    _peek(target)
    print(f"saved {target}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("weights", help="download pretrained COSEM weights into the weights cache")
    settings.add_data_argument(parser)
    parser.add_argument("--weights", default=None, help="weights cache (default: $CELLMAP_REPRO_WEIGHTS or <data>/weights)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="COSEM checkpoint name (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="download even if a file is present (replaces synthetic weights)")
    parser.set_defaults(func=run_weights)
