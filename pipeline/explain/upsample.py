"""The one upsampling of tubes: from a layer's grid to the clip (or another grid), trilinear.

The extractor computes its statistics on tubes upsampled here, :func:`pipeline.store.read_tubes` with
``upsample=True`` returns them upsampled here, and the methods bring maps to the input or a common grid here,
so every number agrees to the bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(tubes: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of ``(..., t, h, w)`` tubes to ``size`` = (T, H, W) (align_corners=False)."""
    lead = tubes.shape[:-3]
    flat = tubes.reshape(-1, 1, *tubes.shape[-3:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="trilinear", align_corners=False)
    return out.reshape(*lead, *size)
