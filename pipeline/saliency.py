"""Saliency tubes on 5-D activations: pure torch, batched, no I/O.

:class:`TubeExplainer` runs a model once, captures the explained layer's activations ``A`` of shape
``(N, C, t, h, w)`` and, for gradient methods, the gradients of the target logits with respect to ``A`` only:
parameters are frozen and the layer's output is cut from the graph below it, so autograd records nothing under
the explained layer. A method turns ``A`` (and gradients, or classifier weights) into one tube per target,
``(N, k, t, h, w)``, at the layer's own resolution; :func:`upsample` brings tubes to the input's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import ModelError, find_classifier, find_layer, get_module


class SaliencyMethod:
    """A way to weight activation maps into a tube. ``needs_grad`` says whether it needs gradients."""

    name: str
    needs_grad: bool = False

    def tubes(self, acts: torch.Tensor, targets: torch.Tensor, *, grads: torch.Tensor | None, weight: torch.Tensor | None) -> torch.Tensor:
        """acts ``(N, C, t, h, w)``, targets ``(N, k)``, grads ``(N, k, C, t, h, w)``, weight ``(K, C)``."""
        raise NotImplementedError


class CAM(SaliencyMethod):
    """Saliency Tubes (Stergiou et al., 2019): activation maps weighted by the target's classifier row.

    ``tube[n, j] = sum_c W[targets[n, j], c] * A[n, c]``. No backward pass. The tube keeps its raw scale: for a
    model that average-pools the layer into a linear classifier, the tube's mean is the target logit minus the
    classifier's bias.
    """

    name = "cam"

    def tubes(self, acts, targets, *, grads=None, weight=None):
        if weight is None:
            raise ModelError("method=cam needs the classifier's weight (model.classifier)")
        return torch.einsum("nkc,ncthw->nkthw", weight[targets], acts)


class GradCAM(SaliencyMethod):
    """Grad-CAM in 3-D: channel weights are the target logit's gradients averaged over ``(t, h, w)``; the
    weighted sum of maps is passed through ReLU."""

    name = "gradcam"
    needs_grad = True

    def tubes(self, acts, targets, *, grads=None, weight=None):
        alpha = grads.mean(dim=(3, 4, 5))  # (N, k, C)
        return torch.relu(torch.einsum("nkc,ncthw->nkthw", alpha, acts))


@dataclass
class Explanation:
    """What one batch yields: logits ``(N, K)``, targets ``(N, k)`` and native tubes ``(N, k, t, h, w)``."""

    logits: torch.Tensor
    targets: torch.Tensor
    tubes: torch.Tensor


class TubeExplainer(nn.Module):
    """A model with its explained layer and classifier resolved, and a saliency method.

    Args:
        net: the classifier (eval mode); its parameters are frozen here.
        method: a :class:`SaliencyMethod`.
        layer: dotted name of the explained layer; ``None`` finds the last module with a 5-D output.
        classifier: dotted name of the linear classifier (CAM only); ``None`` takes the last ``nn.Linear``.
        input_shape: ``(3, T, H, W)``, used to find the layer automatically.
    """

    def __init__(self, net: nn.Module, method: SaliencyMethod, input_shape: tuple[int, int, int, int], layer: str | None = None, classifier: str | None = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.method = method
        self.layer_name = layer or find_layer(net, input_shape)
        self.layer = get_module(net, self.layer_name, "model.layer")
        self.classifier_name = None
        if not method.needs_grad:
            self.classifier_name = classifier or find_classifier(net)
            head = get_module(net, self.classifier_name, "model.classifier")
            if not isinstance(head, nn.Linear):
                raise ModelError(f"method=cam needs a linear classifier over pooled features; model.classifier={self.classifier_name!r} is a {type(head).__name__}")
            with torch.no_grad():
                channels = self._capture(torch.zeros((1, *input_shape), device=head.weight.device))[1].shape[1]
            if head.in_features != channels:
                raise ModelError(
                    f"method=cam needs model.classifier to read the pooled output of model.layer: {self.classifier_name!r} takes "
                    f"{head.in_features} features but {self.layer_name!r} has {channels} channels; use a gradient method or another layer"
                )
            self.classifier = head

    def _capture(self, x: torch.Tensor, detach_for_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        captured = {}

        def hook(_module, _inputs, output):
            if not (isinstance(output, torch.Tensor) and output.dim() == 5):
                raise ModelError(f"model.layer={self.layer_name!r} outputs {type(output).__name__} of shape {getattr(output, 'shape', None)}, not (N, C, T, H, W)")
            if detach_for_grad:  # cut the graph below the layer; the clone keeps in-place ops above it legal
                captured["acts"] = output.detach().requires_grad_(True)
                return captured["acts"].clone()
            captured["acts"] = output.clone()  # an in-place op after the layer (ReLU) must not change it
            return output

        handle = self.layer.register_forward_hook(hook)
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, captured["acts"]

    def forward(self, x: torch.Tensor, select_targets) -> Explanation:
        """Explain a batch. ``select_targets(logits) -> (N, k)`` picks the classes to explain."""
        if not self.method.needs_grad:
            with torch.no_grad():
                logits, acts = self._capture(x)
                targets = select_targets(logits)
                tubes = self.method.tubes(acts.float(), targets, grads=None, weight=self.classifier.weight.float())
            return Explanation(logits.float(), targets, tubes)
        with torch.enable_grad():
            logits, acts = self._capture(x, detach_for_grad=True)
            targets = select_targets(logits.detach())
            k = targets.shape[1]
            grads = []
            for j in range(k):
                picked = logits.gather(1, targets[:, j : j + 1]).sum()
                (grad,) = torch.autograd.grad(picked, acts, retain_graph=j < k - 1)
                grads.append(grad)
            grads = torch.stack(grads, dim=1).float()
            tubes = self.method.tubes(acts.detach().float(), targets, grads=grads, weight=None)
        return Explanation(logits.detach().float(), targets, tubes)


def upsample(tubes: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear upsampling of ``(..., t, h, w)`` tubes to ``size`` = (T, H, W) (align_corners=False)."""
    lead = tubes.shape[:-3]
    flat = tubes.reshape(-1, 1, *tubes.shape[-3:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="trilinear", align_corners=False)
    return out.reshape(*lead, *size)
