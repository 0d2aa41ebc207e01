"""Two pretrained convolutions (the first frozen, the second trained further) and a new head.

The pretrained weights come from the file named by $CELLMAP_REPRO_TEST_PRETRAINED (the
tests write it): 40^3 input -> 32^3 output, both at 8 nm.
"""

import os

import torch

from cellmap_repro.model import frozen

from .data import classes as _classes

if not os.environ.get("CELLMAP_REPRO_TEST_PRETRAINED"):
    raise RuntimeError("set CELLMAP_REPRO_TEST_PRETRAINED to the pretrained weights file")

model_name = "finetune"
_pretrained = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, 4, 3), torch.nn.ReLU())
_pretrained.load_state_dict(torch.load(os.environ["CELLMAP_REPRO_TEST_PRETRAINED"], weights_only=True))
frozen(_pretrained[0])
model = torch.nn.Sequential(_pretrained, torch.nn.Conv3d(4, 4, 3), torch.nn.ReLU(), torch.nn.Conv3d(4, len(_classes), 3))
input_array_info = {"shape": (40, 40, 40), "scale": (8.0, 8.0, 8.0)}
target_array_info = {"shape": (32, 32, 32), "scale": (8.0, 8.0, 8.0)}
