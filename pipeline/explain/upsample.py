"""The one upsampling of tubes: from a layer's grid to the clip (or another grid), trilinear.

The extractor computes its statistics on tubes upsampled here, :func:`pipeline.store.read_tubes` with
``upsample=True`` returns them upsampled here, and the methods bring maps to the input or a common grid here,
so every number agrees to the bit.

Trilinear interpolation is separable: on the CPU it runs as one small matrix product per axis (BLAS; 9x
``F.interpolate`` for 16 x 7 x 7 to 16 x 112 x 112), equal to ``F.interpolate``'s to float32 rounding and, tube for
tube, the same whatever the batch. Elsewhere ``F.interpolate`` (a GPU's matrix products may run in TF32).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def _weights(size_in: int, size_out: int) -> torch.Tensor:
    """``(size_out, size_in)``: linear interpolation along one axis as ``F.interpolate`` does it
    (``align_corners=False``: source position ``(i + 0.5) * size_in / size_out - 0.5``, clamped at 0)."""
    with torch.inference_mode(False):  # a plain tensor, even when first asked for under inference_mode
        source = ((torch.arange(size_out, dtype=torch.float32) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
        lower = source.long().clamp(max=size_in - 1)
        upper = (lower + 1).clamp(max=size_in - 1)
        frac = source - lower
        weights = torch.zeros(size_out, size_in)
        rows = torch.arange(size_out)
        weights.index_put_((rows, lower), 1 - frac, accumulate=True)
        weights.index_put_((rows, upper), frac, accumulate=True)
        return weights


def upsample(tubes: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of ``(..., t, h, w)`` tubes to ``size`` = (T, H, W) (align_corners=False)."""
    lead, (t, h, w) = tubes.shape[:-3], tubes.shape[-3:]
    big_t, big_h, big_w = (int(s) for s in size)
    flat = tubes.reshape(-1, t, h, w).float()
    if flat.device.type != "cpu":
        out = F.interpolate(flat[:, None], size=(big_t, big_h, big_w), mode="trilinear", align_corners=False)
        return out.reshape(*lead, big_t, big_h, big_w)
    if big_t != t:  # an axis of the same size is left as it is, as F.interpolate leaves it
        flat = (_weights(t, big_t) @ flat.reshape(-1, t, h * w)).reshape(-1, big_t, h, w)
    if big_h != h:
        flat = _weights(h, big_h) @ flat
    if big_w != w:
        flat = flat @ _weights(w, big_w).T
    return flat.reshape(*lead, big_t, big_h, big_w)
