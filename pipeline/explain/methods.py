"""The CAM family on 5-D activations: pure torch, batched, fp32, no hooks and no I/O.

Each method turns the :class:`Evidence` of one explained layer (activations ``A`` of shape ``(N, C, t, h, w)``,
the targets ``(N, k)`` and, where the method needs them, gradients, classifier weights or a way to score masked
inputs) into one tube per clip and target, ``(N, k, t, h, w)``, at the layer's own resolution. The class
attributes ``needs_grad`` / ``needs_classifier`` tell the explainer what to collect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    """

    acts: torch.Tensor
    targets: torch.Tensor
    grads: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    score: Callable[[torch.Tensor], torch.Tensor] | None = None


class SaliencyMethod:
    """A way to weight activation maps into a tube."""

    name: str
    needs_grad: bool = False
    needs_classifier: bool = False
    layers: Sequence[str] | None = None  # several layers (fusion); None = the model's explained layer

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


class Fusion(SaliencyMethod):
    """One method on several layers (e.g. the last stages), fused into one sharper tube.

    Each layer's tube is brought to the finest layer's ``(t, h, w)`` (trilinear), divided by its own maximum
    (so layers of different scale count alike) and the layers are combined voxel-wise: ``product`` (the tube is
    high only where every layer agrees: the deep layer says which part, the shallow one sharpens it),
    ``weighted`` (a weighted geometric product ``prod_i tube_i ** (2 ** -i)``, layers ranked from the finest,
    ``i = 0``, to the coarsest, ties in the order given: the coarse layers still select the object, but their
    blurred peaks pull the fine layer's peak less than in a plain product), ``mean`` or ``max``. Fused tubes are normalised to [0, 1] per clip and target. Gradient methods get every layer's
    gradients from one backward pass.

    Args:
        method: the method run on each layer (``cam`` needs a classifier over every layer, so usually a
            gradient method).
        layers: dotted module names, at least two; or ``auto``: the explainer picks the deepest ``levels``
            resolution levels that carry class evidence (:mod:`pipeline.explain.levels`).
        combine: ``product`` | ``weighted`` | ``mean`` | ``max``.
        levels: how many resolution levels ``layers=auto`` fuses (at least 2).

    Example:
        >>> from pipeline.models import DemoNet3D
        >>> from pipeline.explain.explainer import TubeExplainer
        >>> explainer = TubeExplainer(DemoNet3D(num_classes=4), Fusion(GradCAM(), "auto"), (3, 8, 64, 64))
        >>> explainer.layer_name
        'features.block1+features'
    """

    COMBINE = ("product", "weighted", "mean", "max")
    AUTO = "auto"

    def __init__(
        self,
        method: SaliencyMethod,
        layers: Sequence[str] | str | None = AUTO,
        combine: str = "product",
        levels: int = 3,
    ):
        if isinstance(method, Fusion):
            raise MethodError("method.method of a fusion cannot be a fusion itself")
        if layers != self.AUTO and (not layers or isinstance(layers, str) or len(layers) < 2):
            raise MethodError(
                f"method=fusion needs at least two layers (method.layers, e.g. ${{model.fusion_layers}}) or "
                f"method.layers=auto, got {layers!r}"
            )
        if combine not in self.COMBINE:
            raise MethodError(f"method.combine must be one of {self.COMBINE}, got {combine!r}")
        if int(levels) < 2:
            raise MethodError(f"method.levels must be >= 2 (resolution levels fused), got {levels!r}")
        self.method, self.combine, self.levels = method, combine, int(levels)
        self.layers = self.AUTO if layers == self.AUTO else [str(name) for name in layers]
        self.name = f"fusion-{method.name}"
        self.needs_grad, self.needs_classifier = method.needs_grad, method.needs_classifier

    def tubes(self, evidence):
        raise MethodError("a fusion tube is made of several layers' evidence; call fuse()")

    def layer_tubes(self, per_layer: Sequence[Evidence]) -> list[torch.Tensor]:
        """Each layer's own ``(N, k, t, h, w)`` tube at its native resolution (raw scale)."""
        return [self.method.tubes(evidence) for evidence in per_layer]

    def fuse_tubes(self, tubes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused ``(N, k, t, h, w)`` tube of the layers' own tubes (:meth:`layer_tubes`)."""
        size = max((tube.shape[2:] for tube in tubes), key=lambda s: s.numel())
        scaled = []
        for tube in tubes:
            tube = upsample(tube, size).clamp(min=0)
            scaled.append(tube / tube.amax(dim=SPACE, keepdim=True).clamp(min=1e-12))
        if self.combine == "weighted":  # finest first (most voxels; ties keep their order), weights 1, 1/2, ...
            ranked = sorted(range(len(tubes)), key=lambda i: -tubes[i].shape[2:].numel())
            scaled = [scaled[i] ** (0.5**rank) for rank, i in enumerate(ranked)]
        stacked = torch.stack(scaled)
        if self.combine in ("product", "weighted"):
            fused = stacked.prod(0)
        elif self.combine == "mean":
            fused = stacked.mean(0)
        else:
            fused = stacked.amax(0)
        return fused / fused.amax(dim=SPACE, keepdim=True).clamp(min=1e-12)

    def fuse(self, per_layer: Sequence[Evidence]) -> torch.Tensor:
        """The fused ``(N, k, t, h, w)`` tube of the layers' evidence (in the order of the layers)."""
        return self.fuse_tubes(self.layer_tubes(per_layer))
