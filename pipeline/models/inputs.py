"""The one normalisation of model input: ``[0, 1]`` clips to the model's mean / std, on the clips' device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalise(nn.Module):
    """``(x - mean) / std`` per channel of ``(N, C, T, H, W)`` clips, in float32 (buffers follow the module's device).

    Args:
        mean, std: one value per channel (``model.input.mean`` / ``model.input.std``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, video: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """The normalised clips, the same bits either way. ``in_place``: into ``video`` itself when it is float32
        (for a caller that never reads the ``[0, 1]`` clips again): no clip-sized tensor allocated, whose pages
        the CPU would fault in one by one (a 16x112x112 clip: 0.13 ms instead of 0.4 on one core)."""
        video = video.to(self.mean.dtype)
        out = video if in_place else video - self.mean
        if in_place:
            out.sub_(self.mean)
        return out.div_(self.std)
