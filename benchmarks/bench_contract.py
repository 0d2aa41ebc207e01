"""What the experiment contract costs on setup_04_all's model: load-time checks and checkpoint size.

Usage: .venv/bin/python benchmarks/bench_contract.py [--real-forward]

Builds the setup04 UNet (cellmap-models' architecture, random weights: no download),
frozen, plus the setup_04_all head for 48 classes, and prints:

* the shape check at load (meta weights), the input-step derivation, and with
  ``--real-forward`` the real no-grad forward it replaces (side by side, with the ratio);
* the frozen-weights fingerprint (computed once per run);
* the size of one checkpoint as written now (buffers and trainable parameters, frozen
  fingerprinted) and as a full state dict would be (frozen parameters included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time


def build():
    import torch
    from cellmap_models.pytorch.cosem import load_model

    from cellmap_repro.model import conv_head, frozen

    with contextlib.redirect_stdout(sys.stderr):
        base = load_model("setup04")  # architecture only: random weights
    backbone = frozen(base.backbone[0])
    return torch.nn.Sequential(backbone, *conv_head(backbone.out_channels, 48))


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def checkpoint_bytes(model) -> tuple[int, int]:
    import torch

    from cellmap_repro import checkpoint

    optimizer = torch.optim.RAdam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the optimizer state a real checkpoint carries
    sizes = []
    for state in (checkpoint.model_state(model), model.state_dict()):
        buffer = io.BytesIO()
        torch.save({"model": state, "optimizer": optimizer.state_dict()}, buffer)
        sizes.append(buffer.tell())
    return sizes[0], sizes[1]


def main() -> None:
    import torch

    from cellmap_repro import checkpoint
    from cellmap_repro.model import _real_forward, check_shapes, derive_input_step

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-forward", action="store_true", help="also time the real forward at 216^3 (slow on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, seconds = timed(build)
    print(f"build (random weights)        {seconds:8.2f} s")
    check_shapes(model, (216,) * 3, (48, 30, 30, 30), "setup04")  # warm-up
    forward, check = timed(check_shapes, model, (216,) * 3, (48, 30, 30, 30), "setup04")
    print(f"shape check (meta weights)    {check * 1000:8.1f} ms  [{forward.__name__}]")
    step, seconds = timed(derive_input_step, model, (216,) * 3, (30,) * 3, (1.0,) * 3, forward, "setup04")
    print(f"input step derivation         {seconds * 1000:8.1f} ms  -> {step}")
    if args.real_forward:
        with torch.no_grad():
            _, real = timed(_real_forward, model, (216,) * 3)
        print(f"real no-grad forward 216^3    {real:8.2f} s   (meta check {real / check:.0f}x faster)")
    fingerprint, seconds = timed(checkpoint.frozen_fingerprint, model)
    frozen_gb = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) / 1e9
    print(f"frozen fingerprint ({frozen_gb:.2f} GB) {seconds:8.2f} s")
    now, full = checkpoint_bytes(model)
    print(f"checkpoint: {now / 1e6:.1f} MB as written (frozen fingerprinted); {full / 1e6:.1f} MB with the frozen parameters")


if __name__ == "__main__":
    main()
