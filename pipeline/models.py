"""Models: the demo 3D CNN, loading weights from local checkpoints, and finding the layer to explain.

A model for this pipeline is any ``nn.Module`` mapping ``(N, 3, T, H, W)`` to class logits ``(N, K)``. What
the pipeline needs to know about it, the explained layer and (for CAM) the classifier, is found by name or
automatically.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn


class ModelError(ValueError):
    """A model, checkpoint or layer name that cannot be used; the message says which and why."""


def _block(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class DemoNet3D(nn.Module):
    """A small 3D CNN: three conv blocks, global average pooling, one linear classifier.

    With 8 x 64 x 64 input its last block outputs 4 x 16 x 16, the map the saliency tube is made of. Three
    blocks keep the receptive field small enough for the tube to localise the actor (a fourth block doubled
    the training time and halved the pointing game on the synthetic dataset).
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                block1=_block(3, width, (1, 2, 2)),
                block2=_block(width, 2 * width, (2, 2, 2)),
                block3=_block(2 * width, 4 * width, (1, 1, 1)),
            )
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


PREFIXES = ("", "net.", "model.", "module.", "model.module.", "net.module.")


def load_checkpoint(net: nn.Module, path: str | Path) -> None:
    """Load a state_dict or Lightning checkpoint from a local file into ``net`` (weights only, strict).

    Lightning checkpoints keep weights under ``state_dict`` with the module's attribute as prefix (``net.``,
    ``model.``); DataParallel adds ``module.``. The prefix that makes the keys match the model is stripped. A
    checkpoint that does not fit is refused with its missing, unexpected and mismatched (shape) keys, read
    under the prefix that matches the most keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means the same thing to the user
        raise ModelError(f"model.checkpoint: {path} is not a loadable weights file ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"model.checkpoint: {path} holds a {type(state).__name__} that is not a state_dict of tensors")
    own = net.state_dict()
    candidates = [{k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} for prefix in PREFIXES]
    best = max(candidates, key=lambda c: len(set(c) & set(own)))
    mismatched = sorted(k for k in set(best) & set(own) if best[k].shape != own[k].shape)
    missing, unexpected = sorted(set(own) - set(best)), sorted(set(best) - set(own))
    if not (missing or unexpected or mismatched):
        net.load_state_dict(best, strict=True)
        return

    def listing(keys: list[str]) -> str:
        return f"{keys[:10]}{f' ... ({len(keys)} in all)' if len(keys) > 10 else ''}"

    shapes = [f"{k}: {tuple(best[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in mismatched]
    raise ModelError(
        f"model.checkpoint: {path} does not fit {type(net).__name__}: missing keys {listing(missing)}, "
        f"unexpected keys {listing(unexpected)}, mismatched keys {listing(shapes)}"
    )


def build_model(cfg) -> nn.Module:
    """Instantiate ``cfg.net`` and load ``cfg.checkpoint`` if given; returns the model in eval mode.

    Without a checkpoint the weights are random but seeded (``cfg.init_seed``, default 0), so every worker,
    DDP rank and resumed run builds the same network.
    """
    if cfg.get("checkpoint"):
        net = instantiate(cfg.net)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("init_seed") or 0))
            net = instantiate(cfg.net)
    if not isinstance(net, nn.Module):
        raise ModelError(f"model.net._target_ built a {type(net).__name__}, not a torch.nn.Module")
    if cfg.get("checkpoint"):
        load_checkpoint(net, cfg.checkpoint)
    return net.eval()


def get_module(net: nn.Module, name: str, what: str) -> nn.Module:
    """The submodule called ``name`` (dotted), or a :class:`ModelError` listing what names exist."""
    modules = dict(net.named_modules())
    if name not in modules:
        near = [n for n in modules if n and (name.split(".")[-1] in n)] or [n for n in modules if n][-8:]
        raise ModelError(f"{what}={name!r} is not a module of {type(net).__name__}; candidates: {near[:8]}")
    return modules[name]


def find_layer(net: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Name of the last module (in execution order) whose output is a 5-D map with more than one voxel.

    Found by running one zero clip of ``input_shape`` = (3, T, H, W) through the model with hooks.
    """
    order: list[str] = []
    hooks = []
    for name, module in net.named_modules():
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
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and set(module.kernel_size) == {1} and module.groups == 1


def find_classifier(net: nn.Module) -> str:
    """Name of the last linear head in the model (:func:`is_linear_head`), the usual classifier."""
    linear = [name for name, module in net.named_modules() if name and is_linear_head(module)]
    if not linear:
        raise ModelError(f"{type(net).__name__} has no nn.Linear (or 1x1x1 convolution) classifier; set model.classifier")
    return linear[-1]
