"""Faithfulness of saliency tubes: pure torch, batched on the clips' device, no I/O.

Deletion and insertion (Petsiuk et al., RISE, 2018, in space-time): voxels of the clip are ranked by the tube
(highest first). The deletion curve is the target class's probability after replacing the top ``f`` of the
voxels by a baseline clip, for ``f`` = 0, 1/steps, ..., 1; the insertion curve starts from the baseline and
reveals the top ``f``. A faithful tube makes the deletion curve drop fast (low area under the curve) and the
insertion curve rise fast (high area). A voxel is one (t, y, x) position of the model input; all channels of
it are replaced together.

The randomisation check (Adebayo et al., "Sanity checks for saliency maps", 2018) compares the tubes of the
trained model with the tubes of the same network with re-initialised weights, by Spearman rank correlation:
a method whose tubes barely change does not explain the model.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.functional import gaussian_blur

from pipeline.errors import ConfigError

BASELINES = ("blur", "mean")


def baseline_clip(x: torch.Tensor, kind: str, sigma: float = 5.0) -> torch.Tensor:
    """The "nothing here" version of clips ``x`` ``(N, C, T, H, W)``.

    ``blur``: each frame blurred with a Gaussian of ``sigma`` input pixels (keeps colours, removes detail);
    ``mean``: every voxel set to the clip's per-channel mean.
    """
    if kind == "mean":
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        n, c, t, h, w = x.shape
        size = 2 * math.ceil(3 * sigma) + 1
        frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        # a kernel larger than the frame is cut to the frame's odd size (reflect padding needs pad < size)
        k = min(size, (min(h, w) // 2) * 2 - 1) if min(h, w) > 1 else 1
        blurred = gaussian_blur(frames, kernel_size=[k, k], sigma=[sigma, sigma]) if k > 1 else frames
        return blurred.reshape(n, t, c, h, w).permute(0, 2, 1, 3, 4).contiguous()
    raise ConfigError(f"evaluate.baseline must be one of {BASELINES}, got {kind!r}")


def saliency_order(tubes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Voxel ranks ``(N, V)`` of tubes ``(N, T, H, W)``: ``rank[n, v] = 0`` for the most salient voxel.

    Ties (e.g. the zeros of a ReLU'd tube) are broken in a random order, not in raster order, which would
    favour the top of the first frame.
    """
    flat = tubes.reshape(tubes.shape[0], -1).float()
    shuffle = torch.randperm(flat.shape[1], generator=generator).to(flat.device)
    order = shuffle[torch.argsort(flat[:, shuffle], dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def perturbation_curves(
    model,
    x: torch.Tensor,
    baseline: torch.Tensor,
    ranks: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves ``(N, steps + 1)``: the target's probability at ``f = i / steps``.

    Args:
        model: maps ``(B, C, T, H, W)`` to logits ``(B, K)``.
        x, baseline: clips ``(N, C, T, H, W)`` (already normalised for the model).
        ranks: ``(N, T * H * W)`` from :func:`saliency_order`.
        targets: ``(N,)`` class whose probability is followed.
        steps: number of equal steps from nothing to everything.
        chunk: perturbed clips per forward pass (bounds memory).
    """
    n, c, t, h, w = x.shape
    voxels = t * h * w
    counts = torch.round(torch.linspace(0, voxels, steps + 1, device=x.device)).long()  # voxels touched per step
    # mask[n, s, v] = 1 where voxel v is among the first counts[s] of clip n's order
    masks = (ranks[:, None, :] < counts[None, :, None]).to(x.dtype).reshape(n, steps + 1, 1, t, h, w)
    curves = {}
    for name, start, end in (("deletion", x, baseline), ("insertion", baseline, x)):
        mixed = start[:, None] * (1 - masks) + end[:, None] * masks  # (N, S, C, T, H, W)
        flat = mixed.reshape(n * (steps + 1), c, t, h, w)
        probs = torch.cat([model(flat[i : i + chunk]).float().softmax(1) for i in range(0, len(flat), chunk)])
        curves[name] = probs.reshape(n, steps + 1, -1).gather(2, targets.reshape(n, 1, 1).expand(n, steps + 1, 1))[
            ..., 0
        ]
    return curves["deletion"], curves["insertion"]


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves ``(N, S)`` sampled at equal steps over [0, 1] (trapezoidal rule)."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of rows of ``a`` and ``b`` ``(N, ...)``; ties get their mean rank.

    A constant row has no ranking; its correlation is NaN.
    """
    return _pearson(
        _average_ranks(a.reshape(a.shape[0], -1).double()), _average_ranks(b.reshape(b.shape[0], -1).double())
    )


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(v, dim=1, stable=True)
    sorted_v = torch.gather(v, 1, order)
    n = v.shape[1]
    positions = torch.arange(n, device=v.device, dtype=torch.float64).expand_as(v)
    # tie groups: a new group starts where the sorted value changes
    starts = torch.ones_like(sorted_v, dtype=torch.bool)
    starts[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    group = starts.long().cumsum(1) - 1
    sums = torch.zeros_like(sorted_v).scatter_add_(1, group, positions)
    sizes = torch.zeros_like(sorted_v).scatter_add_(1, group, torch.ones_like(positions))
    mean_rank = torch.gather(sums / sizes.clamp(min=1), 1, group)
    return torch.empty_like(v).scatter_(1, order, mean_rank)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(
        denominator > 0, (a * b).sum(1) / denominator.clamp(min=1e-300), torch.full_like(denominator, float("nan"))
    ).float()


def box_masks(boxes: torch.Tensor, crop_boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth boxes as input-pixel masks.

    Args:
        boxes: ``(N, T, 4)`` x0, y0, x1, y1 in source pixels; NaN rows for time steps without a box.
        crop_boxes: ``(N, 4)`` the source region the model saw.
        size: ``(H, W)`` of the model input.

    Returns ``(N, T, H, W)`` float masks, 1 where an input pixel's centre maps inside the box.
    """
    h, w = size
    x0, y0, x1, y1 = crop_boxes.float().unbind(1)
    # input pixel centre -> source pixels, as in clipstats' frame peaks
    sx = x0[:, None] + (torch.arange(w, device=boxes.device) + 0.5)[None] * ((x1 - x0) / w)[:, None]  # (N, W)
    sy = y0[:, None] + (torch.arange(h, device=boxes.device) + 0.5)[None] * ((y1 - y0) / h)[:, None]  # (N, H)
    bx0, by0, bx1, by1 = boxes.float().unbind(2)  # (N, T)
    inside_x = (sx[:, None, :] >= bx0[..., None]) & (sx[:, None, :] < bx1[..., None])  # (N, T, W)
    inside_y = (sy[:, None, :] >= by0[..., None]) & (sy[:, None, :] < by1[..., None])  # (N, T, H)
    return (inside_y[..., :, None] & inside_x[..., None, :]).float()


def tube_iou(tubes: torch.Tensor, masks: torch.Tensor, has_box: torch.Tensor, level: float = 0.5) -> torch.Tensor:
    """IoU of each tube's salient region with the ground-truth boxes, over the time steps that have one.

    The salient region is where a tube ``(N, T, H, W)`` reaches ``level`` of its clip's peak (the positive
    part only); ``masks`` from :func:`box_masks`; ``has_box`` ``(N, T)`` bool. Clips without any box: NaN.
    """
    peak = tubes.clamp(min=0).amax(dim=(1, 2, 3), keepdim=True)
    region = (tubes >= level * peak) & (peak > 0)
    keep = has_box[..., None, None]
    region, truth = region & keep, (masks > 0) & keep
    inter = (region & truth).sum((1, 2, 3)).float()
    union = (region | truth).sum((1, 2, 3)).float()
    return torch.where(has_box.any(1), inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
