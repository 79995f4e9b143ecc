"""Several layers' tubes combined into one: the combine rules, and ``method=fusion``'s settings.

A fusion is not a saliency method: it is a list of layers (or ``auto``: :func:`pipeline.explain.levels.choose_layers`)
plus a rule that combines the tubes one method computed for each of them. The explainer
(:class:`pipeline.explain.explainer.TubeExplainer`) is given the layers and a :class:`Combiner`; each CAM method
only ever computes the tube of one layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.explain.methods import SPACE, MethodError, SaliencyMethod
from pipeline.explain.upsample import upsample

#: the combine rules (``method.combine``)
RULES = ("product", "weighted", "mean", "max")
#: ``method.layers`` value that finds the layers from the model's resolution levels
AUTO = "auto"


@dataclass(frozen=True)
class Combiner:
    """A rule that merges the tubes of several layers into one ``(N, k, t, h, w)`` tube in ``[0, 1]``.

    Each layer's tube ``S_i`` is brought to the finest layer's ``(t, h, w)`` (trilinear,
    :func:`pipeline.explain.upsample.upsample`), clamped at 0 and divided by its own maximum per clip and target,
    ``U_i = relu(up(S_i)) / max relu(up(S_i))`` (so layers of different scale count alike); then, voxel-wise:

    - ``product``: ``prod_i U_i`` (high only where every layer agrees: the deep layer says which part, the shallow
      one sharpens it);
    - ``weighted``: ``prod_i U_i ** (2 ** -r_i)``, ``r_i`` the layer's rank from the finest (``r = 0``, most voxels;
      ties keep the order given) to the coarsest: the coarse layers still select the object, but their blurred
      peaks pull the fine layer's peak less than in a plain product;
    - ``mean``: ``(1/L) sum_i U_i``;  ``max``: ``max_i U_i``.

    The result is divided by its maximum per clip and target.

    Args:
        rule: one of :data:`RULES`.

    Example:
        >>> import torch
        >>> fine, coarse = torch.rand(2, 1, 4, 8, 8), torch.rand(2, 1, 2, 4, 4)
        >>> Combiner("mean")([fine, coarse]).shape
        torch.Size([2, 1, 4, 8, 8])
    """

    rule: str

    def __post_init__(self):
        if self.rule not in RULES:
            raise MethodError(f"method.combine must be one of {', '.join(RULES)}; got {self.rule!r}")

    def __call__(self, tubes: Sequence[torch.Tensor]) -> torch.Tensor:
        size = max((tube.shape[2:] for tube in tubes), key=lambda s: s.numel())
        scaled = []
        for tube in tubes:
            tube = upsample(tube, size).clamp(min=0)
            scaled.append(tube / tube.amax(dim=SPACE, keepdim=True).clamp(min=1e-12))
        if self.rule == "weighted":  # finest first (most voxels; ties keep their order), weights 1, 1/2, ...
            ranked = sorted(range(len(tubes)), key=lambda i: -tubes[i].shape[2:].numel())
            scaled = [scaled[i] ** (0.5**rank) for rank, i in enumerate(ranked)]
        stacked = torch.stack(scaled)
        if self.rule in ("product", "weighted"):
            fused = stacked.prod(0)
        elif self.rule == "mean":
            fused = stacked.mean(0)
        else:
            fused = stacked.amax(0)
        return fused / fused.amax(dim=SPACE, keepdim=True).clamp(min=1e-12)


@dataclass(frozen=True)
class Fusion:
    """``method=fusion`` (conf/method/fusion.yaml): which method runs on which layers and how their tubes combine.

    It only carries settings; :func:`pipeline.runtime.builders.build_explainer` gives them to the explainer as its
    ``method``, ``layers`` and ``combiner``. The rows it makes are named ``fusion-<method>``.

    Args:
        method: the method run on each layer (``cam`` needs a classifier over every layer, so usually a
            gradient method).
        layers: dotted module names, at least two; or ``auto``: the deepest ``levels`` resolution levels that
            carry class evidence (:mod:`pipeline.explain.levels`).
        combine: the combine rule, one of :data:`RULES` (:class:`Combiner`); its default is the YAML's.
        levels: how many resolution levels ``layers=auto`` fuses (at least 2).

    Example:
        >>> from pipeline.explain.methods import GradCAM
        >>> Fusion(GradCAM(), ["layer3", "layer4"], "mean", 3).combiner
        Combiner(rule='mean')
    """

    method: SaliencyMethod
    layers: Sequence[str] | str
    combine: str
    levels: int

    def __post_init__(self):
        if isinstance(self.method, Fusion):
            raise MethodError("method.method of a fusion cannot be a fusion itself")
        if type(self.method).attach is not SaliencyMethod.attach:
            raise MethodError(
                f"method.method={self.method.name} reads every block's attention, not one layer: it cannot be fused"
            )
        layers = self.layers
        if layers != AUTO and (not layers or isinstance(layers, str) or len(layers) < 2):
            raise MethodError(
                f"method=fusion needs at least two layers (method.layers, e.g. ${{model.fusion_layers}}) or "
                f"method.layers=auto, got {layers!r}"
            )
        if int(self.levels) < 2:
            raise MethodError(f"method.levels must be >= 2 (resolution levels fused), got {self.levels!r}")
        object.__setattr__(self, "layers", AUTO if layers == AUTO else [str(name) for name in layers])
        object.__setattr__(self, "levels", int(self.levels))
        Combiner(self.combine)  # checks the rule

    @property
    def combiner(self) -> Combiner:
        return Combiner(self.combine)


def explainer_options(method: SaliencyMethod | Fusion, layer: str | None = None) -> dict:
    """The :class:`~pipeline.explain.explainer.TubeExplainer` arguments ``method``, ``layer``, ``combiner`` and
    ``levels`` of what ``cfg.method`` instantiates: a method alone explains ``layer`` (``model.layer``); a
    :class:`Fusion` names its own layers and combine rule."""
    if isinstance(method, Fusion):
        return dict(method=method.method, layer=method.layers, combiner=method.combiner, levels=method.levels)
    return dict(method=method, layer=layer)
