"""Classes, data split and augmentations (cellmap-data's CellMapDataSplit settings)."""

import torch
import torchvision.transforms.v2 as T
from cellmap_data.transforms import Binarize, NaNtoNum

from cellmap_repro.classes import tested_classes
from cellmap_repro.transforms import MinMaxNormalize

# All 48 classes the challenge scores, in the class table's order.
classes = tested_classes()

datasplit_path = "datasplit.csv"
validation_prob = 0.15
# The baseline passed "validation", which matches none of the toolbox's options and so
# did nothing; False says the same thing plainly.
force_all_classes = False

spatial_transforms = {
    "mirror": {"axes": {"x": 0.5, "y": 0.5, "z": 0.1}},
    "transpose": {"axes": ["x", "y", "z"]},
    "rotate": {"axes": {"x": [-180, 180], "y": [-180, 180], "z": [-180, 180]}},
}

# Raw reaches these as float32 in [0, 1] on every path (training, validation, predict).
# The baseline's raw transform was the toolbox default of January 2025: per-patch
# min-max to [0, 1] (cellmap-data's Normalize() then), ToDtype(float, scale=True) (a
# no-op on float input, left out) and NaN -> 0. Its intensity augmentations were
# defined under names the toolbox never read, so they were not applied; nor are they here.
train_raw_value_transforms = T.Compose([MinMaxNormalize(), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])
val_raw_value_transforms = T.Compose([MinMaxNormalize(), NaNtoNum({"nan": 0, "posinf": None, "neginf": None})])
target_value_transforms = T.Compose([T.ToDtype(torch.float), Binarize()])

use_mutual_exclusion = True
weighted_sampler = True
pad = True
