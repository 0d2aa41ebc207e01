"""Architecture and weights: the COSEM setup04/1820500 UNet, frozen, plus a new head.

As in the baseline, only the UNet (``backbone[0]``) of the pretrained network is kept
(its 4 nm upsampling and final convolutions are dropped), so the model takes 8 nm raw
and predicts at 8 nm. The new head is three valid 3x3x3 convolutions with ReLU and a
1x1x1 convolution to one logit per class.
"""

import torch

from cellmap_repro.model import conv_head, frozen, load_pretrained

from .data import classes as _classes

pretrained_checkpoint = "setup04/1820500"
model_name = "setup04.1820500_8nmOut.all"

_base = load_pretrained(pretrained_checkpoint)
_backbone = frozen(_base.backbone[0])
model = torch.nn.Sequential(_backbone, *conv_head(_backbone.out_channels, len(_classes)))

# 216^3 is the smallest input the UNet accepts; the head's valid convolutions take the
# UNet's 36^3 output down to 30^3 (both at 8 nm).
input_array_info = {"shape": (216, 216, 216), "scale": (8.0, 8.0, 8.0)}
target_array_info = {"shape": (30, 30, 30), "scale": (8.0, 8.0, 8.0)}
