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
    """A small 3D CNN: conv blocks (conv-BN-ReLU), global average pooling, one linear classifier.

    With the default three blocks and 8 x 64 x 64 input its last block outputs 4 x 16 x 16, the map the saliency
    tube is made of. Three blocks keep the receptive field small enough for the tube to localise the actor (a
    fourth block doubled the training time and halved the pointing game on the synthetic dataset).

    Args:
        num_classes: classifier outputs.
        width: channels of the first block; block ``i`` (from 0) has ``width * 2**i``.
        strides: the ``(t, h, w)`` stride of each block (their number sets the depth); the quality benchmark's
            coarse model has four blocks, the last at 2 x 4 x 4 for 16 x 64 x 64 clips.
    """

    STRIDES = ((1, 2, 2), (2, 2, 2), (1, 1, 1))

    def __init__(self, num_classes: int, width: int = 16, strides=STRIDES):
        super().__init__()
        channels = [3] + [width * 2**i for i in range(len(strides))]
        self.features = nn.Sequential(
            OrderedDict(
                (f"block{i + 1}", _block(channels[i], channels[i + 1], tuple(stride)))
                for i, stride in enumerate(strides)
            )
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
