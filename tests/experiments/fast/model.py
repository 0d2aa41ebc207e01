"""Four valid 3x3x3 convolutions: 40^3 input -> 32^3 output, both at 8 nm."""

import torch

from .data import classes as _classes

model_name = "fast"
model = torch.nn.Sequential(
    torch.nn.Conv3d(1, 4, 3),
    torch.nn.ReLU(),
    torch.nn.Conv3d(4, 4, 3),
    torch.nn.ReLU(),
    torch.nn.Conv3d(4, 4, 3),
    torch.nn.ReLU(),
    torch.nn.Conv3d(4, len(_classes), 3),
)
input_array_info = {"shape": (40, 40, 40), "scale": (8.0, 8.0, 8.0)}
target_array_info = {"shape": (32, 32, 32), "scale": (8.0, 8.0, 8.0)}
