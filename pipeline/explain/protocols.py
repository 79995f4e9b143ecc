"""Deletion / insertion protocols (``evaluate.protocol``): how a tube is turned into two curves and their areas.

``project`` (the default): voxels ranked one by one (ties in random order), removed into a blurred or
mean-colour clip in ``steps`` equal steps (rounded), trapezoidal area (:mod:`pipeline.explain.faithfulness`).

``li2021``: the protocol of Li et al., "Towards Visually Explaining Video Understanding Networks with
Perturbation" (WACV 2021), as their evaluation code computes it:

1. the tube at input size ``(T, H, W)`` is average-pooled to ``cells x cells`` cells per frame (a uniform
   ``H/cells x W/cells`` kernel, stride the kernel);
2. the ``T * cells * cells`` cells are ranked jointly by value, highest first (``argsort(descending=True)`` of
   the flattened ``(T, cells, cells)`` map, so ties fall as torch's sort leaves them);
3. step ``s = 0 .. steps`` touches the first ``floor(linspace(0, T * cells**2, steps + 1)[s])`` cells of that
   order: ``steps + 1`` points;
4. a touched cell covers its ``H/cells x W/cells`` pixels of its frame (nearest upsampling of the cell mask)
   and every channel; deletion sets touched voxels of the *normalised* clip to zero (starting from the whole
   clip), insertion starts from the all-zero clip and puts touched voxels back;
5. each point is the target class's softmax probability (softmax over the model's logits);
6. the area is the normalised trapezoid ``(sum(p) - p[0] / 2 - p[-1] / 2) / (len(p) - 1)``.

Their random baseline ranks cells by Gaussian noise drawn at input size and pooled the same way (a uniformly
random order of the cells), which :meth:`Li2021.random_tubes` reproduces.

Example:
    >>> import torch
    >>> protocol = Li2021(steps=4, cells=2)
    >>> protocol.counts(8).tolist()
    [0, 2, 4, 6, 8]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.explain import faithfulness as fm
from pipeline.explain.upsample import upsample

PROTOCOLS = ("project", "li2021")
#: each protocol's own defaults for ``evaluate.steps`` and ``evaluate.cells`` (None: voxels, no cells)
DEFAULTS = {"project": dict(steps=10, cells=None), "li2021": dict(steps=128, cells=16)}


def target_probs(model, clips: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B,)`` softmax probability of ``targets`` ``(B,)`` for clips ``(B, C, T, H, W)``."""
    return model(clips).float().softmax(1).gather(1, targets[:, None])[:, 0]


@dataclass(frozen=True)
class Project:
    """This project's protocol (see :mod:`pipeline.explain.faithfulness`)."""

    steps: int = 10
    baseline: str = "blur"
    blur_sigma: float = 5.0
    name: str = "project"

    def random_tubes(self, native: torch.Tensor, size, generator) -> torch.Tensor:
        """A random tube at the layer's resolution, upsampled to the input (as smooth as a real tube)."""
        return upsample(torch.rand(native.shape, generator=generator).to(native.device), size)

    def curves(self, model, x, tubes, targets, generator, chunk: int = 64):
        base = fm.baseline_clip(x, self.baseline, self.blur_sigma)
        ranks = fm.saliency_order(tubes, generator)
        return fm.perturbation_curves(model, x, base, ranks, targets, self.steps, chunk)

    @staticmethod
    def auc(curves: torch.Tensor) -> torch.Tensor:
        return fm.curve_auc(curves)


@dataclass(frozen=True)
class Li2021:
    """Li et al. (WACV 2021): cells of a per-frame grid, faded to zero in the normalised input, 128 steps.

    Args:
        steps: equal steps from nothing to every cell (``steps + 1`` points on each curve).
        cells: cells per side of each frame's grid (16: 7 x 7 pixel cells on 112 x 112 inputs).
    """

    steps: int = 128
    cells: int = 16
    name: str = "li2021"

    def cell_maps(self, tubes: torch.Tensor) -> torch.Tensor:
        """``(N, T, cells, cells)`` mean of tubes ``(N, T, H, W)`` over each cell.

        With ``H`` and ``W`` multiples of ``cells`` (Li et al.'s case; their code asserts it) a convolution
        with a uniform kernel of weight ``1 / (kh * kw)``; otherwise adaptive average pooling (cells of
        ``floor`` / ``ceil`` sizes).
        """
        n, t, h, w = tubes.shape
        flat = tubes.reshape(n * t, 1, h, w).float()
        if h % self.cells == 0 and w % self.cells == 0:
            kh, kw = h // self.cells, w // self.cells
            kernel = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), device=tubes.device)
            pooled = F.conv2d(flat, kernel, stride=(kh, kw))
        else:
            pooled = F.adaptive_avg_pool2d(flat, self.cells)
        return pooled.reshape(n, t, self.cells, self.cells)

    def ranks(self, tubes: torch.Tensor) -> torch.Tensor:
        """``(N, T * cells**2)`` rank of each cell (0 = removed first) in the order of a descending argsort."""
        cells = self.cell_maps(tubes).reshape(tubes.shape[0], -1)
        order = cells.argsort(dim=-1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return ranks

    def counts(self, total: int) -> np.ndarray:
        """Cells touched after each step: ``floor(linspace(0, total, steps + 1))``."""
        return np.linspace(0, total, self.steps + 1).astype(np.int64)

    def random_tubes(self, native: torch.Tensor, size, generator) -> torch.Tensor:
        """Gaussian noise at input size (their random baseline): a uniformly random order of the cells."""
        return torch.randn((native.shape[0], *size), generator=generator).to(native.device)

    def curves(self, model, x, tubes, targets, generator=None, chunk: int = 64):
        """Deletion and insertion curves ``(N, steps + 1)`` of clips ``x`` ``(N, C, T, H, W)``."""
        n, _, t, h, w = x.shape
        ranks = self.ranks(tubes).reshape(n, t, self.cells, self.cells)
        counts = self.counts(t * self.cells**2).tolist()
        points = [(s, mode) for s in range(self.steps + 1) for mode in ("deletion", "insertion")]
        per_pass = max(1, chunk // n)  # (step, mode) pairs per forward pass, n clips each
        probs = {}
        for start in range(0, len(points), per_pass):
            group = points[start : start + per_pass]
            masks = []
            for s, mode in group:
                touched = (ranks < counts[s]).float()  # (N, T, cells, cells)
                keep = 1.0 - touched if mode == "deletion" else touched
                masks.append(F.interpolate(keep, size=(h, w), mode="nearest")[:, None])  # (N, 1, T, H, W)
            clips = torch.cat([x * mask.to(x.dtype) for mask in masks])
            p = target_probs(model, clips, targets.repeat(len(group))).reshape(len(group), n)
            probs.update({point: p[i] for i, point in enumerate(group)})
        deletion = torch.stack([probs[(s, "deletion")] for s in range(self.steps + 1)], 1)
        insertion = torch.stack([probs[(s, "insertion")] for s in range(self.steps + 1)], 1)
        return deletion, insertion

    @staticmethod
    def auc(curves: torch.Tensor) -> torch.Tensor:
        """``(sum - first / 2 - last / 2) / (n - 1)`` of curves ``(N, n)``."""
        c = curves.double()
        return (c.sum(1) - c[:, 0] / 2 - c[:, -1] / 2) / (c.shape[1] - 1)


def protocol_setting(ev) -> tuple[str, int, int | None]:
    """``evaluate.protocol``, ``steps`` and ``cells`` with the protocol's defaults for null, checked."""
    name = ev.get("protocol", "project")
    if name not in PROTOCOLS:
        raise ConfigError(f"evaluate.protocol must be one of {PROTOCOLS}, got {name!r}")
    steps = ev.get("steps")
    cells = ev.get("cells")
    steps = DEFAULTS[name]["steps"] if steps is None else steps
    if not str(steps).isdigit() or int(steps) < 1:
        raise ConfigError(f"evaluate.steps must be >= 1 or null (the protocol's default), got {steps}")
    if name == "project":
        if cells is not None:
            raise ConfigError(
                f"evaluate.cells applies to evaluate.protocol=li2021 only (project ranks voxels), got {cells}"
            )
        return name, int(steps), None
    cells = DEFAULTS[name]["cells"] if cells is None else cells
    if not str(cells).isdigit() or int(cells) < 1:
        raise ConfigError(f"evaluate.cells must be >= 1 or null (li2021: 16), got {cells}")
    return name, int(steps), int(cells)


def protocol_from(ev) -> Project | Li2021:
    """The protocol that ``evaluate`` settings name."""
    name, steps, cells = protocol_setting(ev)
    if name == "li2021":
        return Li2021(steps=steps, cells=cells)
    return Project(steps=steps, baseline=ev.baseline, blur_sigma=float(ev.blur_sigma))
