"""Value transforms for experiments' ``data.py`` that neither torchvision nor the pinned
cellmap-data provides.

Raw data reaches an experiment's value transforms as float32 in [0, 1] on every path
(see :mod:`cellmap_repro.data`); these transforms act on that.
"""

from __future__ import annotations

from typing import Any

import torchvision.transforms.v2 as T


class MinMaxNormalize(T.Transform):
    """Per-patch min-max scaling to [0, 1]: the challenge toolbox's default raw transform
    of January 2025 (cellmap-data's ``Normalize()`` then), which the setup_04_all
    baseline trained with. NaN counts as 0 for the minimum and maximum and stays NaN;
    a constant patch is returned unchanged, as that ``Normalize`` did.
    """

    def transform(self, inpt: Any, params: dict | None = None) -> Any:
        import torch

        # One pass over the patch where it is all finite (the usual case); the same values
        # as taking min and max of the NaN/inf-free copy, which only a non-finite patch needs.
        low, high = torch.aminmax(inpt)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            low, high = torch.aminmax(inpt.nan_to_num())
        spread = high - low
        if spread == 0:
            return inpt
        return torch.sub(inpt, low).div_(spread)
