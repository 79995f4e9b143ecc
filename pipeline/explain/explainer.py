"""Saliency tubes of a model: hooks on the explained layer(s), gradients from there up, a method on top.

:class:`TubeExplainer` runs a model once per batch and captures the explained layers' outputs. For gradient
methods the model's trunk runs under ``no_grad``; autograd is switched on at the first explained layer, whose
output becomes a fresh leaf, so the graph holds only the part of the model above it. One
``torch.autograd.grad`` call (batched over the ``k`` targets) returns the gradients of every target logit
w.r.t. the explained activations only: no parameter gradients, nothing retained. The method itself
(:mod:`pipeline.explain.methods`) runs in fp32 with autocast off, whatever precision the model ran in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.explain.layouts import LayerOutput, read_output, replace_output
from pipeline.explain.levels import choose_layers
from pipeline.explain.methods import (
    Evidence,
    Fusion,
    SaliencyMethod,
)
from pipeline.models import ModelError, find_classifier, find_layer, get_module, is_linear_head


@dataclass
class Explanation:
    """What one batch yields: logits ``(N, K)``, targets ``(N, k)`` and native tubes ``(N, k, t, h, w)``;
    for a fusion, each fused layer's own tube too (``layer_tubes``, in the order of ``layer_names``)."""

    logits: torch.Tensor
    targets: torch.Tensor
    tubes: torch.Tensor
    layer_tubes: list[torch.Tensor] | None = None


def classifier_weight(head: nn.Module, name: str) -> torch.Tensor:
    """``(K, C)`` weights of a linear head: an ``nn.Linear`` or a 1x1(x1) convolution over pooled features."""
    if is_linear_head(head):
        return head.weight.flatten(1)
    raise ModelError(
        f"method=cam needs a linear classifier over pooled features (nn.Linear or a 1x1x1 convolution); "
        f"model.classifier={name!r} is a {type(head).__name__}; use a gradient method"
    )


class TubeExplainer(nn.Module):
    """A model with its explained layer(s) and classifier resolved, and a saliency method.

    Args:
        net: the classifier (eval mode); its parameters are frozen here.
        method: a :class:`~pipeline.explain.methods.SaliencyMethod`; a :class:`~pipeline.explain.methods.Fusion` names its own layers.
        input_shape: ``(3, T, H, W)``, used to find and check the layer(s) with one zero clip.
        layer: dotted name of the explained layer; ``None`` finds the last module with a 5-D output. A fusion
            names its own layers, or finds them (``layers=auto``, :func:`pipeline.explain.levels.choose_layers`).
        classifier: dotted name of the linear classifier (``cam`` only); ``None`` takes the last linear one.
        layout: how the layer's output is laid out (:mod:`pipeline.explain.layouts`): ``auto``, ``ncthw``, ``nthwc``
            or ``tokens``.
    """

    def __init__(
        self,
        net: nn.Module,
        method: SaliencyMethod,
        input_shape: tuple[int, int, int, int],
        layer: str | None = None,
        classifier: str | None = None,
        layout: str | None = "auto",
    ):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.method = method
        self.layout = layout or "auto"
        if isinstance(method, Fusion) and method.layers == Fusion.AUTO:
            self.layer_names = choose_layers(net, input_shape, self.layout, method.levels)
        elif method.layers:
            self.layer_names = list(method.layers)
        else:
            self.layer_names = [layer or find_layer(net, input_shape)]
        self.layer_name = "+".join(self.layer_names)
        self.layers = [get_module(net, name, "model.layer") for name in self.layer_names]
        device = next(net.parameters()).device
        with torch.no_grad():
            probe = self._capture(torch.zeros((1, *input_shape), device=device), cut=False)[1]
        self.classifier_name, self.classifier = None, None
        if method.needs_classifier:
            self.classifier_name = classifier or find_classifier(net)
            self.classifier = get_module(net, self.classifier_name, "model.classifier")
            weight = classifier_weight(self.classifier, self.classifier_name)
            for name, out in zip(self.layer_names, probe):
                if out.has_class_token:
                    raise ModelError(
                        f"method=cam is not defined for model.layer={name!r}: the model classifies its class token, "
                        "not pooled features of the layer; use a gradient method (gradcam, layercam, ...)"
                    )
                channels = out.as_ncthw().shape[1]
                if weight.shape[1] != channels:
                    raise ModelError(
                        f"method=cam needs model.classifier to read the pooled output of model.layer: {self.classifier_name!r} takes "
                        f"{weight.shape[1]} features but {name!r} has {channels} channels; use a gradient method or another layer"
                    )

    def _capture(self, x: torch.Tensor, cut: bool) -> tuple[torch.Tensor, list[LayerOutput]]:
        """Logits and the explained layers' outputs (in ``layer_names`` order).

        ``cut=False``: outputs are copies (an in-place op after a layer must not change them). ``cut=True``: the
        first layer to run becomes a leaf that requires grad and autograd is switched on from there; the later
        layers' outputs stay in that graph. Their consumers get clones, so in-place ops above stay legal.
        """
        captured: dict[str, LayerOutput] = {}

        def hook(_module, _inputs, output, name):
            read = read_output(output, self.layout, name)
            if not cut:
                captured[name] = LayerOutput(read.tensor.clone(), read.layout, read.grid)
                return None
            if not captured:  # the lowest explained layer: the graph starts here
                torch.set_grad_enabled(True)
                read.tensor = read.tensor.detach().requires_grad_(True)
            captured[name] = read
            return replace_output(output, read.tensor.clone())

        handles = [
            layer.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
            for name, layer in zip(self.layer_names, self.layers)
        ]
        try:
            with torch.no_grad():  # the trunk below the explained layers records nothing
                logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layer_names if name not in captured]
        if missing:
            raise ModelError(f"model.layer {missing} did not run in the model's forward pass")
        return logits, [captured[name] for name in self.layer_names]

    def _gradients(self, logits: torch.Tensor, outputs: list[LayerOutput], targets: torch.Tensor) -> list[torch.Tensor]:
        """``(N, k, C, t, h, w)`` fp32 gradients of each target logit, per layer, from one backward pass per
        batch: the ``k`` targets are a batched ``grad_outputs`` (per-clip one-hots; clips are independent)."""
        inputs = [out.tensor for out in outputs]
        k = targets.shape[1]
        onehot = torch.zeros((k, *logits.shape), dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, targets.T[:, :, None], 1)
        if k == 1:
            grads = [g[None] for g in torch.autograd.grad(logits, inputs, grad_outputs=onehot[0])]
        else:
            grads = torch.autograd.grad(logits, inputs, grad_outputs=onehot, is_grads_batched=True)
        return [out.as_ncthw(g).movedim(0, 1).float() for out, g in zip(outputs, grads)]

    def forward(self, x: torch.Tensor, select_targets) -> Explanation:
        """Explain a batch. ``select_targets(logits) -> (N, k)`` picks the classes to explain."""
        needs_grad = self.method.needs_grad
        if needs_grad and torch.is_inference_mode_enabled():
            raise ModelError(
                f"method={self.method.name} needs gradients: run it outside torch.inference_mode() (Trainer(inference_mode=False))"
            )
        logits, outputs = self._capture(x, cut=needs_grad)
        targets = select_targets(logits.detach())
        grads = self._gradients(logits, outputs, targets) if needs_grad else [None] * len(outputs)
        device = x.device.type
        ambient = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

        def score(clips: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device, dtype=ambient[1], enabled=ambient[0]):
                return self.net(clips)

        weight = (
            classifier_weight(self.classifier, self.classifier_name).float() if self.classifier is not None else None
        )
        with torch.no_grad(), torch.autocast(device, enabled=False):
            evidence = [
                Evidence(
                    acts=out.as_ncthw(out.tensor.detach()).float(),
                    targets=targets,
                    grads=grad,
                    weight=weight,
                    inputs=x,
                    score=score,
                )
                for out, grad in zip(outputs, grads)
            ]
            if isinstance(self.method, Fusion):
                layer_tubes = self.method.layer_tubes(evidence)
                return Explanation(logits.detach().float(), targets, self.method.fuse_tubes(layer_tubes), layer_tubes)
            tubes = self.method.tubes(evidence[0])
        return Explanation(logits.detach().float(), targets, tubes)
