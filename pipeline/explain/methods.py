"""The CAM family on 5-D activations: pure torch, batched, fp32, no hooks and no I/O.

Each method turns the :class:`Evidence` of one explained layer (activations ``A`` of shape ``(N, C, t, h, w)``,
the targets ``(N, k)`` and, where the method needs them, gradients, classifier weights or a way to score masked
inputs) into one tube per clip and target, ``(N, k, t, h, w)``, at the layer's own resolution. The class
attributes ``needs_grad`` / ``needs_classifier`` tell the explainer what to collect. A method sees one layer only:
several layers' tubes are combined by :mod:`pipeline.explain.fusion`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.explain.upsample import upsample

SPACE = (-3, -2, -1)  # the (t, h, w) axes
#: ``method.pool`` of the Grad-CAM family: the axes its channel weights are pooled over. ``thw``: one weight per
#: channel for the whole clip (pytorch-grad-cam, this project's default); ``hw``: one per channel and time slice
#: (mmaction2's and PySlowFast's Grad-CAM: gradients averaged over h, w of each slice)
POOLS = {"thw": SPACE, "hw": (-2, -1)}
POOLED = ("gradcam", "gradcampp", "xgradcam")


class MethodError(ConfigError):
    """A saliency method that cannot run with the given model or settings; the message says why."""


@dataclass
class Evidence:
    """What a method may use for one layer and one batch.

    Attributes:
        acts: ``(N, C, t, h, w)`` activations (fp32, detached).
        targets: ``(N, k)`` class indices to explain.
        grads: ``(N, k, C, t, h, w)`` gradients of each target's logit w.r.t. ``acts`` (gradient methods).
        weight: ``(K, C)`` classifier weights (``cam``).
        inputs: ``(N, 3, T, H, W)`` the normalised clips (``scorecam``).
        score: maps a batch of clips to logits without capturing anything (``scorecam``).
        attention: what the method's own capture recorded during the forward pass (the rollouts:
            :class:`pipeline.explain.rollout.AttentionRecord`); ``None`` for a method that attaches none.
    """

    acts: torch.Tensor
    targets: torch.Tensor
    grads: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    attention: Any = None


class SaliencyMethod:
    """A way to weight activation maps into a tube.

    ``needs_grad``: the method needs autograd (no inference mode); ``needs_layer_grads`` (default: the same)
    whether the explainer computes the target's gradients w.r.t. the explained layer. ``attach`` lets a method
    that reads more than one layer's output (the attention rollouts) check the model and return a capture whose
    ``recording()`` context the explainer enters around its forward pass; what it yields is ``Evidence.attention``.
    """

    name: str
    needs_grad: bool = False
    needs_classifier: bool = False

    @property
    def needs_layer_grads(self) -> bool:
        return self.needs_grad

    def attach(self, net, grid, order):
        """A capture for ``net`` (token ``grid`` and ``order``), or ``None``: the default reads one layer only."""
        return None

    def tubes(self, evidence: Evidence) -> torch.Tensor:
        """``(N, k, t, h, w)`` tubes of ``evidence``."""
        raise NotImplementedError


def weighted_sum(alpha: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``sum_c alpha[n, k, c] * acts[n, c]`` -> ``(N, k, t, h, w)``; ``alpha`` ``(N, k, C)``, or ``(N, k, C, t)``
    for weights per time slice (``method.pool=hw``)."""
    if alpha.dim() == 4:
        return torch.einsum("nkct,ncthw->nkthw", alpha, acts)
    return torch.einsum("nkc,ncthw->nkthw", alpha, acts)


def pool_axes(pool: str, name: str) -> tuple[int, ...]:
    """The axes ``method.pool`` pools channel weights over (:data:`POOLS`), checked."""
    if pool not in POOLS:
        raise MethodError(f"method.pool must be one of {tuple(POOLS)} for {name}, got {pool!r}")
    return POOLS[pool]


class CAM(SaliencyMethod):
    """Saliency Tubes (Stergiou et al., 2019): activation maps weighted by the target's classifier row.

    ``tube[n, j] = sum_c W[targets[n, j], c] * A[n, c]``. No backward pass. The tube keeps its raw scale: for a
    model that average-pools the layer into a linear classifier, the tube's mean is the target logit minus the
    classifier's bias.
    """

    name = "cam"
    needs_classifier = True

    def tubes(self, evidence):
        return weighted_sum(evidence.weight[evidence.targets], evidence.acts)


class GradCAM(SaliencyMethod):
    """Grad-CAM (Selvaraju et al., 2017) in 3-D: channel weights are the target logit's gradients averaged over
    ``(t, h, w)`` (``pool="thw"``, as pytorch-grad-cam) or over ``(h, w)`` of each time slice (``pool="hw"``, as
    mmaction2 and PySlowFast); the weighted sum of maps goes through ReLU:
    ``relu(sum_c mean_{pool}(g_c) * A_c)``.

    Args:
        pool: ``thw`` | ``hw`` (``method.pool``).

    Example:
        >>> import torch
        >>> g = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2, 1, 1)  # one channel, two time slices
        >>> GradCAM("hw").tubes(Evidence(torch.ones(1, 1, 2, 1, 1), torch.zeros(1, 1), grads=g)).flatten().tolist()
        [1.0, 3.0]
    """

    name = "gradcam"
    needs_grad = True

    def __init__(self, pool: str = "thw"):
        self.pool, self.axes = pool, pool_axes(pool, self.name)

    def tubes(self, evidence):
        return torch.relu(weighted_sum(evidence.grads.mean(dim=self.axes), evidence.acts))


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhay et al., 2018) with the usual exponential-score closed form: per-voxel
    coefficients ``a = g^2 / (2 g^2 + sum(A) g^3)`` (0 where ``g = 0``), channel weights ``sum(a * relu(g))``;
    both sums over ``(t, h, w)`` (``pool="thw"``) or over ``(h, w)`` of each time slice (``pool="hw"``)."""

    name = "gradcampp"
    eps = 1e-6

    def tubes(self, evidence):
        g, acts = evidence.grads, evidence.acts
        g2 = g * g
        total = acts.sum(dim=self.axes, keepdim=True)[:, None]  # (N, 1, C, 1 or t, 1, 1)
        a = g2 / (2 * g2 + total * g2 * g + self.eps)
        a = torch.where(g != 0, a, torch.zeros_like(a))
        alpha = (a * torch.relu(g)).sum(dim=self.axes)
        return torch.relu(weighted_sum(alpha, acts))


class XGradCAM(GradCAM):
    """XGrad-CAM (Fu et al., 2020): channel weights ``sum(A * g) / sum(A)`` over ``(t, h, w)`` (``pool="thw"``)
    or over ``(h, w)`` of each time slice (``pool="hw"``), then ReLU."""

    name = "xgradcam"
    eps = 1e-7

    def tubes(self, evidence):
        g, acts = evidence.grads, evidence.acts
        alpha = (g * acts[:, None]).sum(dim=self.axes) / (acts.sum(dim=self.axes)[:, None] + self.eps)
        return torch.relu(weighted_sum(alpha, acts))


class LayerCAM(SaliencyMethod):
    """LayerCAM (Jiang et al., 2021): every voxel weighted by its own positive gradient,
    ``relu(sum_c relu(g_c) * A_c)``."""

    name = "layercam"
    needs_grad = True

    def __init__(self, pool: str | None = None):
        if pool is not None:
            raise MethodError(
                f"method.pool={pool} does not apply to layercam: it weights every voxel by its own gradient, nothing "
                f"is pooled (method.pool applies to {', '.join(POOLED)})"
            )

    def tubes(self, evidence):
        return torch.relu((torch.relu(evidence.grads) * evidence.acts[:, None]).sum(dim=2))


class ScoreCAM(SaliencyMethod):
    """Score-CAM (Wang et al., 2020): each activation map, upsampled to the clip and min-max normalised to
    [0, 1], masks the input; its weight is the target's softmax score on the masked clip minus the score on the
    baseline (an all-zero clip, i.e. every pixel at the normalisation mean). ``relu(sum_c w_c A_c)``.

    Masked clips are scored in chunks of ``batch_size``, so memory stays bounded whatever the channel count.
    Constant maps mask the whole clip to the baseline and get weight 0 without a forward pass.

    Args:
        batch_size: masked clips per forward pass.
    """

    name = "scorecam"

    def __init__(self, batch_size: int = 32):
        if int(batch_size) < 1:
            raise MethodError(f"method.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def tubes(self, evidence):
        acts, x, targets = evidence.acts, evidence.inputs, evidence.targets
        n, c = acts.shape[:2]
        flat = acts.flatten(2)
        lo, hi = flat.amin(2), flat.amax(2)  # (N, C)
        live = (hi > lo).nonzero()  # (M, 2) pairs (clip, channel) whose map is not constant
        baseline = evidence.score(torch.zeros_like(x[:1])).float().softmax(1)[0]  # (K,)
        weights = acts.new_zeros(n, targets.shape[1], c)
        for start in range(0, len(live), self.batch_size):
            clip, chan = live[start : start + self.batch_size].unbind(1)
            maps = acts[clip, chan][:, None]  # (B, 1, t, h, w)
            masks = upsample(maps, x.shape[2:])
            masks = (masks - lo[clip, chan].view(-1, 1, 1, 1, 1)) / (hi - lo)[clip, chan].view(-1, 1, 1, 1, 1)
            probs = evidence.score(x[clip] * masks.to(x.dtype)).float().softmax(1)  # (B, K)
            gain = probs.gather(1, targets[clip]) - baseline[targets[clip]]  # (B, k)
            weights[clip, :, chan] = gain
        return torch.relu(weighted_sum(weights, acts))
