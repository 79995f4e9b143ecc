"""Networks defined only here, used through ``model.net._target_`` and the interface settings alone."""

from __future__ import annotations

import torch
from torch import nn


class FoldedNet(nn.Module):
    """(N, T, C, H, W) in; frames folded into the batch of a 2-D convolution; a linear head per frame averaged
    over time; two heads returned as a tuple (3 and 5 classes)."""

    def __init__(self, sizes=(3, 5)):
        super().__init__()
        self.sizes = list(sizes)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, sum(self.sizes))

    def forward(self, x: torch.Tensor):
        n, t = x.shape[:2]
        maps = self.features(x.flatten(0, 1))
        return tuple(self.head(maps.mean((2, 3))).view(n, t, -1).mean(1).split(self.sizes, dim=1))


class PathStage(nn.Module):
    """Two pathways in, two maps out, as a list."""

    def __init__(self):
        super().__init__()
        self.slow = nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1)
        self.fast = nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1)

    def forward(self, clips):
        return [torch.relu(self.slow(clips[0])), torch.relu(self.fast(clips[1]))]


class TwoPathNet(nn.Module):
    """[slow, fast] in; each pathway's map average-pooled, concatenated, one linear head."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stage = PathStage()
        self.head = nn.Linear(12, num_classes)

    def forward(self, clips):
        return self.head(torch.cat([m.mean((2, 3, 4)) for m in self.stage(clips)], dim=1))
