"""The UNet of unet.py, trained from scratch: 44^3 input -> 28^3 output, both at 8 nm.

No input_step: the engine derives it (2 per axis, from the pooling).
"""

from .data import classes as _classes
from .unet import UNet

model_name = "bn_unet"
model = UNet(1, len(_classes))
input_array_info = {"shape": (44, 44, 44), "scale": (8.0, 8.0, 8.0)}
target_array_info = {"shape": (28, 28, 28), "scale": (8.0, 8.0, 8.0)}
