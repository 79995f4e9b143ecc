"""Per-clip statistics of saliency tubes, batched in torch on the tubes' device.

All statistics are computed on the tube at input resolution ``(T, H, W)``. Measures of where saliency lies
use its *mass*, the positive part of the tube (CAM tubes may be negative where a region argues against the
class). Coordinates are in model-input pixels and steps; ``frame_peak_x/y`` are also mapped back to source
pixels through the clip's ``crop_box``, so they can be compared with ground truth on the original video.

Two statistics describe *where in the frame* saliency lies, so that they can be averaged per class without
reading volumes: ``border_mass``, the share of mass in the frame's outer band (``BORDER`` of the height and
width on each side: context, not the centre), and ``density``, the mass summed over time on a coarse
``DENSITY_GRID`` x ``DENSITY_GRID`` grid of the frame (row-major, sums to 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: the outer band of the frame counted as border, as a share of its height and width on each side
BORDER = 0.125
#: rows and columns of the coarse spatial density map
DENSITY_GRID = 8
#: every how many voxels the CPU's top-tenth selection samples for its two thresholds
_SAMPLE_STEP = 61
_SMALLEST = float(np.finfo(np.float32).smallest_subnormal)  # the smallest positive float32


def _bins(size: int, bins: int, device) -> torch.Tensor:
    """``(bins, size)`` 0/1 matrix putting pixel ``i`` into bin ``floor(i * bins / size)`` (an exact partition)."""
    owner = torch.arange(size, device=device) * bins // size
    return (owner[None, :] == torch.arange(bins, device=device)[:, None]).float()


def _border_mask(h: int, w: int, device) -> torch.Tensor:
    """``(h, w)`` 1 where a pixel's centre lies in the outer ``BORDER`` band of the frame."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    inner_y = (ys > BORDER) & (ys < 1 - BORDER)
    inner_x = (xs > BORDER) & (xs < 1 - BORDER)
    return (~(inner_y[:, None] & inner_x[None, :])).float()


def _frame_argmax(frames: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` index of each frame's first maximum in ``frames`` ``(N, T, H * W)``; on the CPU by NumPy (its
    vectorised argmax: 13x torch's here)."""
    if frames.device.type != "cpu":
        return frames.argmax(2)
    return torch.from_numpy(frames.detach().numpy().argmax(2))


def _top_and_xlogx_sums(flat: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` sums of the ``top`` largest values and ``(N,)`` sums of ``x log x`` (``0 log 0 = 0``) of each row
    of the non-negative ``flat``, the two statistics that need passes of their own. On the CPU one row (a clip)
    at a time while it is in cache: :func:`_top_sum`, and NumPy's log (2.7x torch's, slower still on zeros)."""
    if flat.device.type != "cpu":
        return flat.topk(top, dim=1).values.sum(1), torch.special.xlogy(flat, flat).sum(1)
    tops, xlogx = [], []
    logs = np.empty(flat.shape[1], dtype=np.float32)  # one buffer for every clip: no pages faulted in per clip
    for values in flat.detach().numpy():
        tops.append(_top_sum(values, top))
        # log(m + the smallest float32): 0 log 0 = 0 without a pass of its own; the sum is unchanged, since the
        # addition moves only values below 1e-30 (whose m log m are below 1e-28)
        np.add(values, _SMALLEST, out=logs)
        np.log(logs, out=logs)
        xlogx.append(np.dot(values, logs))
    return torch.tensor(tops, dtype=torch.float32), torch.tensor(xlogx, dtype=torch.float32)


def _top_sum(values: np.ndarray, top: int) -> float:
    """The sum of the ``top`` largest of the non-negative ``values``, exactly, selecting among a few of them.

    Every ``_SAMPLE_STEP``-th value gives two thresholds, ``lo`` and ``hi``, at 1.15x and 0.9x the top's share.
    The values ``>= lo`` are kept (about 11.5 % of a tube): when at least ``top`` are, every value of the top is among
    them. Otherwise (the sample misled, or the mass lies in few voxels) every voxel with mass is kept, and when they
    are no more than ``top``, the top is all of them and zeros. The kept values above ``hi``, when fewer than
    ``top``, are all in the top, and the rest of it is the largest of the kept values ``<= hi`` (about a quarter of
    the top to select among): those above the ``need``-th largest ``v`` and as many copies of ``v`` as it takes.
    """
    sample = values[::_SAMPLE_STEP]
    ranks = [sample.size - min(sample.size, max(1, math.ceil(share * top / _SAMPLE_STEP))) for share in (1.15, 0.9)]
    lo, hi = np.partition(sample, ranks)[ranks]
    kept = values[values >= max(lo, _SMALLEST)]
    if kept.size < top:
        kept = values[values > 0]
    if kept.size <= top:
        return float(kept.sum())
    above = kept[kept > hi]
    if above.size >= top:  # hi is too low: the whole top lies above it
        above, rest = above[:0], above
    else:
        rest = kept[kept <= hi]
    need = top - above.size
    v = rest.dtype.type(torch.from_numpy(rest).kthvalue(rest.size - need + 1).values)
    larger = rest[rest > v]
    return float(above.sum() + larger.sum() + (need - larger.size) * v)


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
        border_mass     share of the mass in the frame's outer ``BORDER`` band (uniform when mass is 0)
        density         ``(N, DENSITY_GRID ** 2)`` share of the mass in each cell of a coarse grid of the frame
    """
    n, t, h, w = tubes.shape
    tubes = tubes.float()
    mass_map = tubes.clamp(min=0)
    flat = mass_map.reshape(n, -1)
    mass = flat.sum(1)
    empty = mass <= 0
    safe = torch.where(empty, torch.ones_like(mass), mass)

    frames = tubes.reshape(n, t, h * w)
    per_frame = _frame_argmax(frames)
    # the first frame holding the maximum holds the first maximum of the whole tube
    peak_t = frames.gather(2, per_frame[:, :, None])[:, :, 0].argmax(1)
    rest = per_frame.gather(1, peak_t[:, None])[:, 0]
    peak_y, peak_x = rest // w, rest % w

    steps = torch.arange(t, device=tubes.device, dtype=torch.float32)
    rows = torch.arange(h, device=tubes.device, dtype=torch.float32)
    cols = torch.arange(w, device=tubes.device, dtype=torch.float32)
    per_row = mass_map.sum(3)  # (N, t, h): two passes over the tube give every sum below
    spatial = mass_map.sum(1) / safe[:, None, None]  # (N, h, w), sums to 1 (0 when there is no mass)
    profile = per_row.sum(2) / safe[:, None]
    profile = torch.where(empty[:, None], torch.full_like(profile, 1.0 / t), profile)
    centroid_t = (profile * steps).sum(1)
    centroid_y = (per_row.sum(1) * rows).sum(1) / safe
    centroid_x = (spatial.sum(1) * cols).sum(1)
    # no mass: the distribution is taken as uniform (as for the profile), so the centroid is the middle
    centroid_y = torch.where(empty, torch.full_like(centroid_y, (h - 1) / 2), centroid_y)
    centroid_x = torch.where(empty, torch.full_like(centroid_x, (w - 1) / 2), centroid_x)

    top, xlogx = _top_and_xlogx_sums(flat, max(1, -(-t * h * w // 10)))  # ceil(N / 10): 0.1 * N can round past
    top10 = top / safe
    # -sum p log p with p = m / mass is log(mass) - sum m log m / mass; at most 0 for one voxel but for rounding
    entropy = (torch.log(safe) - xlogx / safe).clamp(min=0) / max(math.log(t * h * w), 1e-12)
    top10 = torch.where(empty, torch.zeros_like(top10), top10)
    entropy = torch.where(empty, torch.ones_like(entropy), entropy)

    spatial = torch.where(empty[:, None, None], torch.full_like(spatial, 1.0 / (h * w)), spatial)
    border_mass = (spatial * _border_mask(h, w, tubes.device)).sum((1, 2))
    rows_in, cols_in = _bins(h, DENSITY_GRID, tubes.device), _bins(w, DENSITY_GRID, tubes.device)
    density = torch.einsum("gy,nyx,hx->ngh", rows_in, spatial, cols_in).reshape(n, -1)

    frame_peak_x, frame_peak_y = _in_source(per_frame, crop_boxes, h, w)
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
        border_mass=border_mass,
        density=density,
    )


def frame_peaks(tubes: torch.Tensor, crop_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, T)`` x and y of each time step's maximum of ``tubes`` ``(N, T, H, W)``, in source pixels (the centre
    of the peak's input pixel mapped through ``crop_boxes``); ``frame_peak_x/y`` of :func:`clip_statistics`."""
    n, t, h, w = tubes.shape
    return _in_source(_frame_argmax(tubes.float().reshape(n, t, h * w)), crop_boxes, h, w)


def _in_source(per_frame: torch.Tensor, crop_boxes: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-frame peak indices ``(N, T)`` on an ``h x w`` frame -> x and y in source pixels."""
    fy, fx = (per_frame // w).float(), (per_frame % w).float()
    x0, y0, x1, y1 = crop_boxes.float().unbind(1)
    # pixel centres: input pixel i covers [i, i+1) -> centre i + 0.5, mapped through the crop's scale
    return x0[:, None] + (fx + 0.5) * ((x1 - x0) / w)[:, None], y0[:, None] + (fy + 0.5) * ((y1 - y0) / h)[:, None]


def peak_in_box(px, py, x0, y0, x1, y1, tolerance: float = 0.0):
    """The pointing game's hit: a peak ``(px, py)`` inside the box ``[x0, x1) x [y0, y1)`` grown by ``tolerance``
    on every side (all in source pixels). Works on tensors, arrays and pandas Series alike."""
    return (px >= x0 - tolerance) & (px < x1 + tolerance) & (py >= y0 - tolerance) & (py < y1 + tolerance)
