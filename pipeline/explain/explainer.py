"""Saliency tubes of a model: hooks on the explained layer(s), gradients from there up, a method on top.

:class:`TubeExplainer` runs a model once per batch and captures the explained layers' outputs. For gradient
methods the model's trunk runs under ``no_grad``; autograd is switched on at the first explained layer, whose
output becomes a fresh leaf, so the graph holds only the part of the model above it. One
``torch.autograd.grad`` call (batched over the ``k`` targets) returns the gradients of every target logit
w.r.t. the explained activations only: no parameter gradients, nothing retained. The method itself
(:mod:`pipeline.explain.methods`) runs in fp32 with autocast off, whatever precision the model ran in.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.explain.fusion import AUTO, Combiner
from pipeline.explain.layouts import LayerOutput, read_output, replace_output
from pipeline.explain.levels import choose_layers
from pipeline.explain.methods import Evidence, MethodError, SaliencyMethod
from pipeline.models import ModelError, find_classifier, find_layer, get_module, is_linear_head
from pipeline.models.adapters import ModelAdapter, describe, model_grid, unwrap
from pipeline.models.adapters import token_order as model_token_order


@dataclass
class Explanation:
    """What one batch yields: logits ``(N, K)``, targets ``(N, k)`` and native tubes ``(N, k, t, h, w)``;
    for several layers (combined), each layer's own tube too (``layer_tubes``, in the order of ``layer_names``)."""

    logits: torch.Tensor
    targets: torch.Tensor
    tubes: torch.Tensor
    layer_tubes: list[torch.Tensor] | None = None


GRADIENT_METHODS = "gradcam, gradcampp, xgradcam, layercam or scorecam"


def classifier_weight(head: nn.Module, name: str) -> torch.Tensor:
    """``(K, C)`` weights of a linear head: an ``nn.Linear`` or a 1x1(x1) convolution over pooled features."""
    if is_linear_head(head):
        return head.weight.flatten(1)
    raise ModelError(
        f"method=cam needs a linear classifier over pooled features (nn.Linear or a 1x1x1 convolution); "
        f"model.classifier={name!r} is a {type(head).__name__}; use a gradient method ({GRADIENT_METHODS})"
    )


def combine_pathways(tubes: list[torch.Tensor]) -> torch.Tensor:
    """One ``(N, k, t, h, w)`` tube of a multi-pathway layer: each pathway's tube brought to the finest
    ``(t, h, w)`` (each step repeated where the sizes divide, so a tube's mean is kept; nearest otherwise), summed.

    For a head that average-pools each pathway, concatenates and applies a linear layer, the sum of the pathways'
    CAMs is the CAM of the concatenated features (each has the same mean as the head's pooled input)."""
    if len(tubes) == 1:
        return tubes[0]
    size = [max(tube.shape[axis] for tube in tubes) for axis in (2, 3, 4)]
    total = 0
    for tube in tubes:
        if all(s % n == 0 for s, n in zip(size, tube.shape[2:])):
            for axis, (s, n) in enumerate(zip(size, tube.shape[2:]), start=2):
                tube = tube.repeat_interleave(s // n, dim=axis)
        else:
            n, k = tube.shape[:2]
            tube = F.interpolate(tube.reshape(n * k, 1, *tube.shape[2:]), size=size, mode="nearest-exact")
            tube = tube.reshape(n, k, *size)
        total = total + tube
    return total


class TubeExplainer(nn.Module):
    """A model with its explained layer(s) and classifier resolved, a saliency method run on each layer, and
    (for several layers) the rule that combines their tubes.

    Args:
        net: the classifier (eval mode), taking ``(N, 3, T, H, W)`` and returning ``(N, K)`` logits: a plain network
            or a :class:`~pipeline.models.adapters.ModelAdapter` (whose inner network's names are used); its
            parameters are frozen here.
        method: a :class:`~pipeline.explain.methods.SaliencyMethod`, run on each explained layer.
        input_shape: ``(3, T, H, W)``, used to find and check the layer(s) with one probe clip.
        layer: dotted name of the explained layer, or a list of several (their tubes merged by ``combiner``), or
            ``auto``: the deepest ``levels`` resolution levels with class evidence
            (:func:`pipeline.explain.levels.choose_layers`); ``None`` finds the last module with a 5-D output.
        classifier: dotted name of the linear classifier (``cam`` only); ``None`` takes the last linear one.
        layout: how the layer's output is laid out (:mod:`pipeline.explain.layouts`).
        grid: ``(t, h, w)`` of a token layer that returns no grid; ``None``: the model's own (HF config).
        token_order: ``thw`` or ``hwt``; ``None``: the model's own (TimeSformer: ``hwt``).
        combiner: the :class:`~pipeline.explain.fusion.Combiner` of several layers' tubes (needed for several).
        levels: resolution levels ``layer=auto`` chooses.

    Attributes:
        num_classes: the number of logits the model returns (from the probe clip).
        method_name: the rows' ``method``: the method's name, ``fusion-<name>`` for several layers.

    Example:
        >>> from pipeline.models import DemoNet3D
        >>> from pipeline.explain.methods import GradCAM
        >>> explainer = TubeExplainer(DemoNet3D(num_classes=4), GradCAM(), (3, 8, 64, 64), layer="auto",
        ...                           combiner=Combiner("weighted"), levels=3)
        >>> explainer.layer_name, explainer.method_name
        ('features.block1+features', 'fusion-gradcam')
    """

    def __init__(
        self,
        net: nn.Module,
        method: SaliencyMethod,
        input_shape: tuple[int, int, int, int],
        layer: str | None = None,
        classifier: str | None = None,
        layout: str | None = "auto",
        grid=None,
        token_order: str | None = None,
        combiner: Combiner | None = None,
        levels: int | None = None,
    ):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.method = method
        self.layout = layout or "auto"
        root = unwrap(net)
        self.grid = tuple(int(g) for g in grid) if grid else model_grid(net, input_shape[1:])
        self.token_order = token_order or model_token_order(net)
        if layer == AUTO:
            if levels is None:
                raise MethodError("method.layers=auto needs method.levels (resolution levels to combine)")
            self.layer_names = choose_layers(
                net, input_shape, self.layout, levels, root=root, grid=self.grid, order=self.token_order
            )
        elif isinstance(layer, str) or layer is None:
            self.layer_names = [layer or find_layer(net, input_shape, root)]
        else:
            self.layer_names = [str(name) for name in layer]
        if len(self.layer_names) > 1 and combiner is None:
            raise MethodError(f"layers {self.layer_names} need a combine rule (method.combine)")
        self.combiner = combiner if len(self.layer_names) > 1 else None
        self.layer_name = "+".join(self.layer_names)
        self.method_name = method.name if self.combiner is None else f"fusion-{method.name}"
        self.layers = [get_module(root, name, "model.layer") for name in self.layer_names]
        self.capture = method.attach(net, self.grid, self.token_order)  # a model that does not fit fails here
        device = next(net.parameters()).device
        generator = torch.Generator().manual_seed(0)  # a random clip: a zero one may hide a non-linear head
        clip = torch.randn((1, *input_shape), generator=generator).to(device)
        with torch.no_grad():
            logits, probe = self._capture(clip, cut=False, probe=True)
        self.num_classes = int(logits.shape[1])
        self.classifier_name, self.classifier, self.head_rows = None, None, None
        if method.needs_classifier:
            self.classifier_name = classifier or find_classifier(root)
            self.classifier = get_module(root, self.classifier_name, "model.classifier")
            self.head_rows = self._head_rows(logits, probe)

    def _head_rows(self, logits: torch.Tensor, probe: list[list[LayerOutput]]) -> slice:
        """The classifier's rows that make the logits (a head of several tasks, such as TSN's verb and noun
        rows, may give only some), checked on the probe clip: CAM is exact only where the logits are the
        classifier applied to the average-pooled output of the layer (pathways concatenated)."""
        weight = classifier_weight(self.classifier, self.classifier_name)
        bias = getattr(self.classifier, "bias", None)
        k = logits.shape[1]
        for name, parts in zip(self.layer_names, probe):
            if any(part.has_class_token for part in parts):
                raise ModelError(
                    f"method=cam is not defined for model.layer={name!r}: the model classifies its class token, "
                    f"not pooled features of the layer; use a gradient method ({GRADIENT_METHODS})"
                )
            acts = [part.as_ncthw() for part in parts]
            channels = sum(a.shape[1] for a in acts)
            if weight.shape[1] != channels:
                raise ModelError(
                    f"method=cam needs model.classifier to read the pooled output of model.layer: {self.classifier_name!r} takes "
                    f"{weight.shape[1]} features but {name!r} has {channels} channels; "
                    f"use a gradient method ({GRADIENT_METHODS}) or another layer"
                )
            pooled = torch.cat([a.flatten(2).mean(2) for a in acts], dim=1).double()
            scores = pooled @ weight.double().T + (0 if bias is None else bias.double())
            scale = 1e-4 * max(1.0, float(logits.abs().max()))
            rows = [
                start
                for start in range(weight.shape[0] - k + 1)
                if torch.allclose(scores[:, start : start + k], logits.double(), rtol=1e-3, atol=scale)
            ]
            if not rows:
                raise ModelError(
                    f"method=cam needs logits that are model.classifier={self.classifier_name!r} applied to the "
                    f"average-pooled output of model.layer={name!r}; {type(unwrap(self.net)).__name__}'s head is not "
                    f"(a normalisation, activation or pooling of its own before or after it); use a gradient method ({GRADIENT_METHODS})"
                )
        return slice(rows[0], rows[0] + k)

    def _capture(self, x: torch.Tensor, cut: bool, probe: bool = False) -> tuple[torch.Tensor, list[list[LayerOutput]]]:
        """Logits and the explained layers' outputs (in ``layer_names`` order; one entry per pathway).

        ``cut=False``: outputs are copies (an in-place op after a layer must not change them). ``cut=True``: the
        first layer to run becomes a leaf (each of its pathways) that requires grad and autograd is switched on
        from there; the later layers' outputs stay in that graph. Their consumers get clones, so in-place ops
        above stay legal. ``probe``: the first clip, whose failures are reported against the model's settings.
        """
        captured: dict[str, list[LayerOutput]] = {}

        def hook(_module, _inputs, output, name):
            parts = read_output(output, self.layout, name, self.grid, x.shape[0], self.token_order)
            if not cut:
                captured[name] = [part.like(part.tensor.clone()) for part in parts]
                return None
            if not captured:  # the lowest explained layer: the graph starts here
                torch.set_grad_enabled(True)
                parts = [part.like(part.tensor.detach().requires_grad_(True)) for part in parts]
            captured[name] = parts
            return replace_output(output, [part.tensor.clone() for part in parts])

        handles = [
            layer.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
            for name, layer in zip(self.layer_names, self.layers)
        ]
        try:
            with torch.no_grad():  # the trunk below the explained layers records nothing
                logits = self.net.probe(x) if probe and isinstance(self.net, ModelAdapter) else self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        if probe and not (isinstance(logits, torch.Tensor) and logits.dim() == 2):
            raise ModelError(
                f"model.output: {type(unwrap(self.net)).__name__} returned {describe(logits)}, not (N, K) logits; "
                "set model.output to the attribute, key or index that holds them"
            )
        missing = [name for name in self.layer_names if name not in captured]
        if missing:
            raise ModelError(f"model.layer {missing} did not run in the model's forward pass")
        return logits, [captured[name] for name in self.layer_names]

    def _gradients(
        self, logits: torch.Tensor, outputs: list[list[LayerOutput]], targets: torch.Tensor
    ) -> list[list[torch.Tensor]]:
        """``(N, k, C, t, h, w)`` fp32 gradients of each target logit, per layer and pathway, from one backward
        pass per batch: the ``k`` targets are a batched ``grad_outputs`` (per-clip one-hots; clips are independent)."""
        flat = [part for parts in outputs for part in parts]
        inputs = [part.tensor for part in flat]
        k = targets.shape[1]
        onehot = torch.zeros((k, *logits.shape), dtype=logits.dtype, device=logits.device)
        onehot.scatter_(2, targets.T[:, :, None], 1)
        if k == 1:
            grads = [g[None] for g in torch.autograd.grad(logits, inputs, grad_outputs=onehot[0])]
        else:
            grads = torch.autograd.grad(logits, inputs, grad_outputs=onehot, is_grads_batched=True)
        grads = iter([part.as_ncthw(g).movedim(0, 1).float() for part, g in zip(flat, grads)])
        return [[next(grads) for _ in parts] for parts in outputs]

    def forward(self, x: torch.Tensor, select_targets) -> Explanation:
        """Explain a batch. ``select_targets(logits) -> (N, k)`` picks the classes to explain."""
        needs_grad = self.method.needs_grad
        if needs_grad and torch.is_inference_mode_enabled():
            raise ModelError(
                f"method={self.method.name} needs gradients: run it outside torch.inference_mode() (Trainer(inference_mode=False))"
            )
        layer_grads = self.method.needs_layer_grads
        with self.capture.recording() if self.capture is not None else nullcontext() as attention:
            logits, outputs = self._capture(x, cut=layer_grads)
        if attention is not None:
            attention.logits = logits
        targets = select_targets(logits.detach())
        grads = self._gradients(logits, outputs, targets) if layer_grads else [[None] * len(p) for p in outputs]
        device = x.device.type
        ambient = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

        def score(clips: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device, dtype=ambient[1], enabled=ambient[0]):
                return self.net(clips)

        weight = None
        if self.classifier is not None:
            weight = classifier_weight(self.classifier, self.classifier_name)[self.head_rows].float()
        with torch.no_grad(), torch.autocast(device, enabled=False):
            per_layer = []
            for parts, part_grads in zip(outputs, grads):
                acts = [part.as_ncthw(part.tensor.detach()).float() for part in parts]
                bounds = torch.tensor([0] + [a.shape[1] for a in acts]).cumsum(0).tolist()
                tubes = [
                    self.method.tubes(
                        Evidence(
                            acts=a,
                            targets=targets,
                            grads=g,
                            weight=None if weight is None else weight[:, bounds[i] : bounds[i + 1]],
                            inputs=x,
                            score=score,
                            attention=attention,
                        )
                    )
                    for i, (a, g) in enumerate(zip(acts, part_grads))
                ]
                per_layer.append(combine_pathways(tubes))
            if self.combiner is not None:
                return Explanation(logits.detach().float(), targets, self.combiner(per_layer), per_layer)
        return Explanation(logits.detach().float(), targets, per_layer[0])
