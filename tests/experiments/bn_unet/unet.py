"""A one-level UNet: valid convolutions with BatchNorm, max-pooling, transposed-convolution upsampling."""

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(),
        nn.Conv3d(out_channels, out_channels, 3),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(),
    )


def center_crop(x: torch.Tensor, shape) -> torch.Tensor:
    starts = [(have - want) // 2 for have, want in zip(x.shape[2:], shape)]
    return x[(..., *(slice(s, s + w) for s, w in zip(starts, shape)))]


class UNet(nn.Module):
    """Input n -> output n - 16; valid for even n (the pooling level halves n - 4)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 4):
        super().__init__()
        self.down = conv_block(in_channels, width)
        self.pool = nn.MaxPool3d(2)
        self.bottom = conv_block(width, 2 * width)
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.out = conv_block(2 * width, width)
        self.head = nn.Conv3d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        x = self.up(self.bottom(self.pool(skip)))
        return self.head(self.out(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1)))
