"""A user's network, adapted by configuration to what the explainer expects: ``(N, 3, T, H, W)`` clips in,
``(N, K)`` logits out.

:class:`ModelAdapter` wraps the network (its module names stay the network's own: layers are looked up in
:func:`unwrap` of it) and applies the model's interface settings:

- ``model.input.layout``: ``ncthw`` (torchvision, pytorchvideo) or ``ntchw`` (HF video transformers, the
  EPIC-Kitchens TSN/TSM baselines);
- ``model.input.pathways``: several clips from one, a list of frame strides, one per pathway, given to the
  network as one list (pytorchvideo's SlowFast takes ``[slow, fast]``: ``[4, 1]``, or ``{alpha: 4}`` for short,
  the slow pathway seeing every 4th frame of the fast one);
- ``model.output``: what to take from the forward's result: ``null`` (the tensor itself), an attribute or key
  (``logits``, ``verb``) or an index of a tuple (``0``).

A setting that does not fit the model fails on the first (probe) clip with one :class:`ModelError` naming the
setting and what the model returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pipeline.errors import ModelError

INPUT_LAYOUTS = ("ncthw", "ntchw")


def describe(value) -> str:
    """A short account of a forward's result: its type, and the shapes of the tensors it holds."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value.keys())}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(describe(v) for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({items}{', ...' if len(value) > 4 else ''})"
    return f"a {type(value).__name__}"


def pathway_strides(setting) -> list[int] | None:
    """``model.input.pathways`` as a list of frame strides (None: one clip)."""
    if setting is None:
        return None
    if isinstance(setting, Mapping):
        if set(setting) != {"alpha"}:
            raise ModelError(f"model.input.pathways: a mapping takes only alpha (SlowFast), got {dict(setting)}")
        return [int(setting["alpha"]), 1]
    if isinstance(setting, Sequence) and not isinstance(setting, str) and len(setting) >= 1:
        strides = [int(s) for s in setting]
        if min(strides) < 1:
            raise ModelError(f"model.input.pathways: frame strides must be >= 1, got {strides}")
        return strides
    raise ModelError(
        f"model.input.pathways must be a list of frame strides (e.g. [4, 1]) or {{alpha: 4}}, got {setting!r}"
    )


class ModelAdapter(nn.Module):
    """The user's ``net`` seen as ``(N, 3, T, H, W)`` -> ``(N, K)``.

    Args:
        net: the network.
        layout: ``ncthw`` or ``ntchw`` (what the network takes).
        pathways: frame strides, one per pathway (see :func:`pathway_strides`); None = one clip.
        output: attribute, key or index of the forward's result holding the logits; None = the result itself.
    """

    def __init__(self, net: nn.Module, layout: str = "ncthw", pathways=None, output=None):
        super().__init__()
        if layout not in INPUT_LAYOUTS:
            raise ModelError(f"model.input.layout must be one of {INPUT_LAYOUTS}, got {layout!r}")
        self.net, self.layout, self.strides, self.output = net, layout, pathway_strides(pathways), output

    def inputs(self, x: torch.Tensor):
        """What the network is given for clips ``x`` = (N, 3, T, H, W)."""
        if self.strides is None:
            return x.transpose(1, 2) if self.layout == "ntchw" else x
        clips = [x[:, :, ::stride] for stride in self.strides]
        return [c.transpose(1, 2) for c in clips] if self.layout == "ntchw" else clips

    def select(self, result) -> torch.Tensor:
        """The logits in a forward's ``result`` (per ``model.output``)."""
        key = self.output
        if key is None:
            value = result
        elif (
            isinstance(key, int)
            and isinstance(result, (tuple, list))
            and -len(result) <= key < len(result)
            or isinstance(key, str)
            and isinstance(result, Mapping)
            and key in result
        ):
            value = result[key]
        elif isinstance(key, str) and not isinstance(result, (torch.Tensor, Mapping)) and hasattr(result, key):
            value = getattr(result, key)
        else:
            raise ModelError(f"model.output={key!r}: {type(self.net).__name__} returned {describe(result)}")
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            setting = "model.output" if key is None else f"model.output={key!r}"
            raise ModelError(
                f"{setting}: {type(self.net).__name__} returned {describe(result)}"
                + ("" if key is None else f", and {key!r} holds {describe(value)}")
                + "; the logits must be one (N, K) tensor (set model.output to the attribute, key or index that holds them)"
            )
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.select(self.net(self.inputs(x)))

    def probe(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of one probe clip; a network that fails on it is reported against the input settings."""
        try:
            result = self.net(self.inputs(x))
        except Exception as err:
            given = self.inputs(x)
            shapes = [tuple(c.shape) for c in given] if isinstance(given, list) else tuple(given.shape)
            raise ModelError(
                f"{type(self.net).__name__} fails on a clip given as model.input.layout={self.layout}"
                f"{f', model.input.pathways={self.strides}' if self.strides else ''} (input {shapes}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; check model.input"
            ) from err
        return self.select(result)


def unwrap(net: nn.Module) -> nn.Module:
    """The network whose module names the settings use (``model.layer``, ``model.classifier``)."""
    return net.net if isinstance(net, ModelAdapter) else net


def adapt(net: nn.Module, model_cfg) -> ModelAdapter:
    """``net`` with the interface settings of ``model_cfg`` (``model.input.layout``/``pathways``, ``model.output``)."""
    inputs = model_cfg.get("input") or {}
    return ModelAdapter(
        net,
        layout=str(inputs.get("layout") or "ncthw"),
        pathways=inputs.get("pathways"),
        output=model_cfg.get("output"),
    ).eval()


def model_grid(net: nn.Module, clip: Sequence[int]) -> tuple[int, int, int] | None:
    """The ``(t, h, w)`` token grid of an HF video transformer for clips of ``clip`` = (T, H, W), from its
    config (tubelet / patch sizes), or None when the model does not say."""
    config = getattr(unwrap(net), "config", None)
    patch = getattr(config, "patch_size", None)
    tubelet = getattr(config, "tubelet_size", None)
    if isinstance(tubelet, Sequence) and len(tubelet) == 3:  # ViViT: [t, h, w]
        size = [int(v) for v in tubelet]
    elif patch is not None:
        size = [int(tubelet or 1), int(patch), int(patch)]
    else:
        return None
    return tuple(int(c) // s for c, s in zip(clip, size))


def token_order(net: nn.Module) -> str:
    """How an HF model orders its patch tokens: TimeSformer space-major (``hwt``), others ``thw``."""
    return "hwt" if getattr(getattr(unwrap(net), "config", None), "model_type", None) == "timesformer" else "thw"
