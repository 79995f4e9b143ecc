"""MFNet-3D, the multi-fiber network (Chen et al., "Multi-Fiber Networks for Video Recognition", ECCV 2018)
that the Saliency Tubes paper explained.

Parameter names follow the authors' released models (``conv1.conv``, ``conv2.B01.conv_i1.bn``, ...,
``tail.bn``, ``classifier``), so their checkpoints, saved from a DataParallel model (``module.`` prefix),
load with :func:`pipeline.models.load_checkpoint`. The global pooling is adaptive, which equals the original
fixed 8x7x7 average at 16x224x224 and lets smaller inputs run too.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class BnReluConv3d(nn.Sequential):
    """Pre-activation convolution: BatchNorm, ReLU, Conv3d (no bias)."""

    def __init__(self, c_in: int, c_out: int, kernel=(1, 1, 1), padding=(0, 0, 0), stride=(1, 1, 1), groups: int = 1):
        super().__init__(
            OrderedDict(
                bn=nn.BatchNorm3d(c_in),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv3d(
                    c_in, c_out, kernel_size=kernel, padding=padding, stride=stride, groups=groups, bias=False
                ),
            )
        )


class MultiFiberUnit(nn.Module):
    """One multi-fiber unit: a multiplexer (two 1x1x1 convolutions routing information between fibers, added
    to the input), then two grouped convolutions (the fibers), plus a shortcut (projected in a stage's first
    unit)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, groups: int, stride=(1, 1, 1), first: bool = False):
        super().__init__()
        c_mux = c_mid // 4
        self.conv_i1 = BnReluConv3d(c_in, c_mux)
        self.conv_i2 = BnReluConv3d(c_mux, c_in)
        self.conv_m1 = BnReluConv3d(c_in, c_mid, kernel=(3, 3, 3), padding=(1, 1, 1), stride=stride, groups=groups)
        if first:
            self.conv_m2 = BnReluConv3d(c_mid, c_out)
            self.conv_w1 = BnReluConv3d(c_in, c_out, stride=stride)
        else:
            self.conv_m2 = BnReluConv3d(c_mid, c_out, kernel=(1, 3, 3), padding=(0, 1, 1), groups=groups)
            self.conv_w1 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fibers = self.conv_m2(self.conv_m1(x + self.conv_i2(self.conv_i1(x))))
        return fibers + (x if self.conv_w1 is None else self.conv_w1(x))


class MFNet3D(nn.Module):
    """MFNet-3D: a 3x5x5 stem, four stages of multi-fiber units (3, 4, 6, 3 units; 96, 192, 384, 768 channels;
    16 fibers), BN-ReLU ``tail``, global average pooling, dropout and a linear ``classifier``.

    The explained layer is ``tail`` (the last 5-D map, read by the classifier after pooling).

    Args:
        num_classes: number of output classes.
        groups: number of fibers per unit.
        dropout: dropout before the classifier.
    """

    UNITS = (3, 4, 6, 3)
    CHANNELS = (96, 192, 384, 768)

    def __init__(self, num_classes: int, groups: int = 16, dropout: float = 0.5):
        super().__init__()
        stem = 16
        self.conv1 = nn.Sequential(
            OrderedDict(
                conv=nn.Conv3d(3, stem, kernel_size=(3, 5, 5), padding=(1, 2, 2), stride=(1, 2, 2), bias=False),
                bn=nn.BatchNorm3d(stem),
                relu=nn.ReLU(inplace=True),
            )
        )
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        c_in = stem
        for stage, (units, c_out) in enumerate(zip(self.UNITS, self.CHANNELS), start=2):
            stride = (2, 1, 1) if stage == 2 else (1, 2, 2)
            blocks = OrderedDict()
            for i in range(1, units + 1):
                blocks[f"B{i:02d}"] = MultiFiberUnit(
                    c_in if i == 1 else c_out, c_out, c_out, groups, stride if i == 1 else (1, 1, 1), first=i == 1
                )
            setattr(self, f"conv{stage}", nn.Sequential(blocks))
            c_in = c_out
        self.tail = nn.Sequential(OrderedDict(bn=nn.BatchNorm3d(c_in), relu=nn.ReLU(inplace=True)))
        self.globalpool = nn.Sequential(OrderedDict(avg=nn.AdaptiveAvgPool3d(1), dropout=nn.Dropout(dropout)))
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        return self.classifier(self.globalpool(self.tail(x)).flatten(1))
