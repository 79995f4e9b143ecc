"""The demo 3D CNN that ``stage=train`` fits on the synthetic dataset."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class DemoNet3D(nn.Module):
    """A small 3D CNN: three conv blocks, global average pooling, one linear classifier.

    With 8 x 64 x 64 input its last block outputs 4 x 16 x 16, the map the saliency tube is made of. Three
    blocks keep the receptive field small enough for the tube to localise the actor (a fourth block doubled
    the training time and halved the pointing game on the synthetic dataset).
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(3, width, (1, 2, 2)),
                block2=_block(width, 2 * width, (2, 2, 2)),
                block3=_block(2 * width, 4 * width, (1, 1, 1)),
            )
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
