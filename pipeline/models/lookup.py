"""Finding what the pipeline needs inside a model: a module by name, the layer to explain, the classifier.

The explained layer and (for CAM) the classifier are found by name or automatically.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ModelError


def get_module(net: nn.Module, name: str, what: str) -> nn.Module:
    """The submodule called ``name`` (dotted), or a :class:`ModelError` listing what names exist."""
    modules = dict(net.named_modules())
    if name not in modules:
        near = [n for n in modules if n and (name.split(".")[-1] in n)] or [n for n in modules if n][-8:]
        raise ModelError(f"{what}={name!r} is not a module of {type(net).__name__}; candidates: {near[:8]}")
    return modules[name]


def find_layer(net: nn.Module, input_shape: tuple[int, ...], root: nn.Module | None = None) -> str:
    """Name of the last module (in execution order) whose output is a 5-D map with more than one voxel.

    Found by running one zero clip of ``input_shape`` = (3, T, H, W) through the model with hooks. ``root``: the
    module whose names are returned (the network inside an adapter; default ``net``).
    """
    order: list[str] = []
    hooks = []
    for name, module in (root or net).named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() == 5 and out.shape[2:].numel() > 1:
                order.append(name)

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(torch.zeros((1, *input_shape), device=next(net.parameters()).device))
    finally:
        for handle in hooks:
            handle.remove()
    if not order:
        raise ModelError(f"{type(net).__name__} has no module with a 5-D (N, C, T, H, W) output; set model.layer")
    return order[-1]


def is_linear_head(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a 1x1(x1) convolution without groups (S3D's classifier): linear over channels."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and set(module.kernel_size) == {1} and module.groups == 1
    )


def find_classifier(net: nn.Module) -> str:
    """Name of the last linear head in the model (:func:`is_linear_head`), the usual classifier."""
    linear = [name for name, module in net.named_modules() if name and is_linear_head(module)]
    if not linear:
        raise ModelError(
            f"{type(net).__name__} has no nn.Linear (or 1x1x1 convolution) classifier; set model.classifier"
        )
    return linear[-1]
