"""A small network for the learning test: 64^3 raw at 8 nm -> 32^3 logits at 8 nm.

The test copies setup_04_all's data.py beside this file, so what is tested is the
baseline's data path (classes, augmentation, per-patch normalisation, masking) with a
network that learns on a CPU in two or three minutes. A per-patch min-max normalisation makes
an intensity meaningful only relative to the rest of the window, so besides local 8 nm
features the network sees the window's context at 32 nm; and it spreads the [0, 1] input
to unit scale first, without which the few hundred steps of the test do not find the
sharp intensity bands that separate the classes.
"""

import torch
from torch import nn

from .data import classes as _classes


def _trim(tensor, margin: int):
    return tensor[:, :, margin:-margin, margin:-margin, margin:-margin]


class LocalAndContext(nn.Module):
    def __init__(self, classes: int, width: int = 8):
        super().__init__()
        self.local = nn.Sequential(nn.Conv3d(1, width, 3), nn.ReLU())  # n -> n - 2
        self.context = nn.Sequential(nn.AvgPool3d(4), nn.Conv3d(1, width, 3), nn.ReLU(), nn.Conv3d(width, width, 3), nn.ReLU())  # n/4 - 4 at 32 nm
        self.head = nn.Sequential(nn.Conv3d(2 * width, 2 * width, 1), nn.ReLU(), nn.Conv3d(2 * width, classes, 1))

    def forward(self, x):
        x = (x - 0.5) * 10.0
        # both branches are centred on the window: trimmed to its centre n - 32 voxels they align
        context = nn.functional.interpolate(self.context(x), scale_factor=4, mode="nearest")  # n - 16
        return self.head(torch.cat([_trim(self.local(x), 15), _trim(context, 8)], dim=1))


model_name = "learn"
model = LocalAndContext(len(_classes))
input_array_info = {"shape": (64, 64, 64), "scale": (8.0, 8.0, 8.0)}
target_array_info = {"shape": (32, 32, 32), "scale": (8.0, 8.0, 8.0)}
