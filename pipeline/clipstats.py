"""Per-clip statistics of saliency tubes, batched in torch on the tubes' device.

All statistics are computed on the tube at input resolution ``(T, H, W)``. Measures of where saliency lies
use its *mass*, the positive part of the tube (CAM tubes may be negative where a region argues against the
class). Coordinates are in model-input pixels and steps; ``frame_peak_x/y`` are also mapped back to source
pixels through the clip's ``crop_box``, so they can be compared with ground truth on the original video.
"""

from __future__ import annotations

import math

import torch


def clip_statistics(tubes: torch.Tensor, crop_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of ``tubes`` ``(N, T, H, W)``; ``crop_boxes`` ``(N, 4)`` as x0, y0, x1, y1 in source pixels.

    Returns per-tube tensors:
        mass            sum of the positive part
        peak_t/y/x      position of the maximum (time step, input pixel row / column)
        centroid_t/y/x  mass-weighted mean position (same units)
        top10_mass      share of the mass in the 10 % highest voxels (1.0 = all in the top tenth)
        entropy         Shannon entropy of the mass distribution over voxels, divided by log(#voxels):
                        0 = one voxel, 1 = uniform
        temporal_profile  ``(N, T)`` share of mass at each time step (sums to 1; uniform when mass is 0)
        frame_peak_x/y  ``(N, T)`` per time step, the peak of that frame in source pixels
    """
    n, t, h, w = tubes.shape
    tubes = tubes.float()
    flat = tubes.reshape(n, -1)
    mass_map = tubes.clamp(min=0)
    mass = mass_map.reshape(n, -1).sum(1)
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    p = mass_map.reshape(n, -1) / safe[:, None]
    empty = mass <= 0

    peak = flat.argmax(1)
    peak_t, rest = peak // (h * w), peak % (h * w)
    peak_y, peak_x = rest // w, rest % w

    steps = torch.arange(t, device=tubes.device, dtype=torch.float32)
    rows = torch.arange(h, device=tubes.device, dtype=torch.float32)
    cols = torch.arange(w, device=tubes.device, dtype=torch.float32)
    p3 = p.reshape(n, t, h, w)
    profile = p3.sum((2, 3))
    profile = torch.where(empty[:, None], torch.full_like(profile, 1.0 / t), profile)
    centroid_t = (profile * steps).sum(1)
    centroid_y = (p3.sum((1, 3)) * rows).sum(1)
    centroid_x = (p3.sum((1, 2)) * cols).sum(1)
    # no mass: the distribution is taken as uniform (as for the profile), so the centroid is the middle
    centroid_y = torch.where(empty, torch.full_like(centroid_y, (h - 1) / 2), centroid_y)
    centroid_x = torch.where(empty, torch.full_like(centroid_x, (w - 1) / 2), centroid_x)

    top = max(1, -(-t * h * w // 10))  # ceil(N / 10) in integers: 0.1 * N in floats can round up past N / 10
    top10 = p.topk(top, dim=1).values.sum(1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(1) / max(math.log(t * h * w), 1e-12)  # one voxel: 0
    top10 = torch.where(empty, torch.zeros_like(top10), top10)
    entropy = torch.where(empty, torch.ones_like(entropy), entropy)

    per_frame = tubes.reshape(n, t, h * w).argmax(2)
    fy, fx = (per_frame // w).float(), (per_frame % w).float()
    x0, y0, x1, y1 = crop_boxes.float().unbind(1)
    # pixel centres: input pixel i covers [i, i+1) -> centre i + 0.5, mapped through the crop's scale
    frame_peak_x = x0[:, None] + (fx + 0.5) * ((x1 - x0) / w)[:, None]
    frame_peak_y = y0[:, None] + (fy + 0.5) * ((y1 - y0) / h)[:, None]
    return dict(
        mass=mass,
        peak_t=peak_t.int(),
        peak_y=peak_y.float(),
        peak_x=peak_x.float(),
        centroid_t=centroid_t,
        centroid_y=centroid_y,
        centroid_x=centroid_x,
        top10_mass=top10,
        entropy=entropy,
        temporal_profile=profile,
        frame_peak_x=frame_peak_x,
        frame_peak_y=frame_peak_y,
    )
