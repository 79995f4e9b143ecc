"""What an explained layer outputs, and how to read it as ``(N, C, t, h, w)`` activations.

Layouts (``model.layout``):

- ``ncthw``: a 5-D tensor, channels first (3D CNNs: torchvision's video ResNets, S3D, MFNet-3D, X3D);
- ``nthwc``: a 5-D tensor, channels last (Swin3D's stages and final norm);
- ``folded``: a 2-D map ``(N*T, C, h, w)`` of a network that folds the frames into the batch (TSN, TSM), read
  as ``(N, C, T, h, w)``;
- ``tokens``: ``(N, L, C)`` tokens, either returned with their ``(t, h, w)`` grid as MViT's blocks return
  ``(tokens, thw)`` (the grid is read from each call, so stages that pool tokens are followed exactly), or a
  plain tensor (or a tuple whose first item it is, as HF encoder layers return) whose grid comes from the
  model (HF config: frames / tubelet size, image size / patch size) or ``model.grid``. A class token in front
  (``L = 1 + t*h*w``) is dropped; any other count is an error naming the counts. Tokens are ordered ``thw``
  (time-major) unless the model orders them space-major (``hwt``: TimeSformer);
- a multi-pathway layer (a list of 5-D maps, SlowFast's stages) gives one :class:`LayerOutput` per pathway.

``auto`` reads a list of 5-D maps as pathways, a 5-D map as ``ncthw``, a 4-D map as ``folded`` and a 3-D
tensor as ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import ModelError

LAYOUTS = ("auto", "ncthw", "nthwc", "folded", "tokens")
TOKEN_ORDERS = ("thw", "hwt")


@dataclass
class LayerOutput:
    """One call's output of an explained layer (one pathway of it): the tensor and how to read it.

    Attributes:
        tensor: the layer's tensor as the model produced it.
        layout: one of :data:`LAYOUTS` except ``auto``.
        grid: ``(t, h, w)`` of the tokens (``tokens``).
        batch: clips in the batch (``folded``: the tensor's first axis is ``batch * T``).
        order: token order, ``thw`` or ``hwt``.
    """

    tensor: torch.Tensor
    layout: str
    grid: tuple[int, int, int] | None = None
    batch: int | None = None
    order: str = "thw"

    @property
    def has_class_token(self) -> bool:
        return self.layout == "tokens" and self.tensor.shape[1] == 1 + self.grid[0] * self.grid[1] * self.grid[2]

    def like(self, tensor: torch.Tensor) -> LayerOutput:
        """The same reading of another tensor of this shape (a copy, or a leaf that requires grad)."""
        return LayerOutput(tensor, self.layout, self.grid, self.batch, self.order)

    def as_ncthw(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` (default: the tensor itself; any extra leading dims, e.g. gradients of ``k`` targets
        ``(k, N, ...)``, are kept) rearranged to ``(..., C, t, h, w)``."""
        values = self.tensor if values is None else values
        if self.layout == "ncthw":
            return values
        if self.layout == "nthwc":
            return values.movedim(-1, -4)
        if self.layout == "folded":
            lead, (nt, c, h, w) = values.shape[:-4], values.shape[-4:]
            return values.reshape(*lead, self.batch, nt // self.batch, c, h, w).transpose(-4, -3)
        if self.has_class_token:
            values = values[..., 1:, :]
        t, h, w = self.grid
        if self.order == "hwt":
            return values.reshape(*values.shape[:-2], h, w, t, values.shape[-1]).movedim(-1, -4).movedim(-1, -3)
        return values.reshape(*values.shape[:-2], t, h, w, values.shape[-1]).movedim(-1, -4)


def _grid(value) -> tuple[int, int, int] | None:
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _is_pathways(output) -> bool:
    return (
        isinstance(output, (tuple, list))
        and len(output) >= 2
        and all(isinstance(v, torch.Tensor) and v.dim() == 5 for v in output)
    )


def read_output(
    output, layout: str, name: str, grid=None, batch: int | None = None, order: str = "thw"
) -> list[LayerOutput]:
    """The explained tensor(s) of a layer's ``output``, checked against ``layout``: one per pathway.

    Args:
        output: what the layer returned: a tensor, ``(tokens, thw)``, a tuple whose first item is the tensor, or
            a list of 5-D maps (one per pathway).
        layout: ``model.layout``.
        name: the layer's name (for messages).
        grid: ``(t, h, w)`` of plain token tensors (``model.grid`` or the model's own).
        batch: clips in the batch (``folded``).
        order: token order (``thw`` or ``hwt``).
    """
    if layout not in LAYOUTS:
        raise ModelError(f"model.layout must be one of {LAYOUTS}, got {layout!r}")
    if order not in TOKEN_ORDERS:
        raise ModelError(f"model.token_order must be one of {TOKEN_ORDERS}, got {order!r}")
    if _is_pathways(output) and layout in ("auto", "ncthw"):
        return [LayerOutput(tensor, "ncthw") for tensor in output]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        if len(output) == 2 and _grid(output[1]):
            grid = _grid(output[1])
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            f"model.layer={name!r} outputs {type(output).__name__}, not a tensor, (tokens, thw) or a list of pathway maps"
        )
    shape = tuple(output.shape)
    if layout == "auto":
        layout = {3: "tokens", 4: "folded"}.get(output.dim(), "ncthw")
    if layout in ("ncthw", "nthwc") and output.dim() != 5:
        raise ModelError(
            f"model.layer={name!r} outputs shape {shape}, not a 5-D map (model.layout={layout}); "
            "pick another layer or layout (folded for (N*T, C, h, w), tokens for (N, L, C))"
        )
    if layout == "folded" and (output.dim() != 4 or batch is None or shape[0] % batch):
        raise ModelError(
            f"model.layer={name!r} outputs shape {shape}, not frame-wise 2-D maps (N*T, C, h, w) of a batch of "
            f"{batch} clips (model.layout=folded)"
        )
    if layout == "tokens":
        if output.dim() != 3:
            raise ModelError(f"model.layer={name!r} outputs shape {shape}, not (N, L, C) tokens (model.layout=tokens)")
        if grid is None:
            raise ModelError(
                f"model.layer={name!r} outputs {shape[1]} tokens without a (t, h, w) grid; set model.grid=[t,h,w]"
            )
        grid = tuple(int(g) for g in grid)
        patches = grid[0] * grid[1] * grid[2]
        if shape[1] - patches not in (0, 1):
            raise ModelError(
                f"model.layer={name!r} outputs {shape[1]} tokens, which do not fit the grid {grid} = {patches} "
                f"patch tokens (plus at most one class token in front); check model.grid and the layer"
            )
    return [LayerOutput(output, layout, grid, batch, order)]


def replace_output(output, tensors: list[torch.Tensor]):
    """``output`` with its explained tensor(s) replaced by ``tensors`` (keeps the rest of a tuple, e.g. a grid)."""
    if _is_pathways(output) and len(tensors) == len(output) > 1:
        return type(output)(tensors)
    if isinstance(output, tuple):
        return (tensors[0], *output[1:])
    if isinstance(output, list):
        return [tensors[0], *output[1:]]
    return tensors[0]
