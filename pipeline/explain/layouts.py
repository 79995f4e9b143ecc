"""What an explained layer outputs, and how to read it as ``(N, C, t, h, w)`` activations.

Three layouts are understood:

- ``ncthw``: a 5-D tensor, channels first (3D CNNs: torchvision's video ResNets, S3D, MFNet-3D);
- ``nthwc``: a 5-D tensor, channels last (Swin3D's stages and final norm);
- ``tokens``: ``(N, L, C)`` tokens that come with their ``(t, h, w)`` grid, as MViT's blocks return
  ``(tokens, thw)``; a class token in front (``L = 1 + t*h*w``) is dropped. The grid is read from each call,
  so stages that pool tokens (MViT's ``thw`` shrinks from stage to stage) are followed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models import ModelError

LAYOUTS = ("auto", "ncthw", "nthwc", "tokens")


@dataclass
class LayerOutput:
    """One call's output of an explained layer: the tensor, its layout, and the token grid (tokens only)."""

    tensor: torch.Tensor
    layout: str
    grid: tuple[int, int, int] | None = None

    @property
    def has_class_token(self) -> bool:
        return self.layout == "tokens" and self.tensor.shape[1] == 1 + self.grid[0] * self.grid[1] * self.grid[2]

    def as_ncthw(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` (default: the tensor itself; any extra leading dims, e.g. gradients of ``k`` targets
        ``(k, N, ...)``, are kept) rearranged to ``(..., C, t, h, w)``."""
        values = self.tensor if values is None else values
        if self.layout == "ncthw":
            return values
        if self.layout == "nthwc":
            return values.movedim(-1, -4)
        if self.has_class_token:
            values = values[..., 1:, :]
        return values.reshape(*values.shape[:-2], *self.grid, values.shape[-1]).movedim(-1, -4)


def _grid(value) -> tuple[int, int, int] | None:
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def read_output(output, layout: str, name: str) -> LayerOutput:
    """The explained tensor of a layer's ``output`` (a tensor, or ``(tokens, thw)``), checked against ``layout``."""
    if layout not in LAYOUTS:
        raise ModelError(f"model.layout must be one of {LAYOUTS}, got {layout!r}")
    grid = None
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], torch.Tensor):
        output, grid = output[0], _grid(output[1])
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"model.layer={name!r} outputs {type(output).__name__}, not a tensor or (tokens, thw)")
    if layout == "auto":
        layout = "tokens" if output.dim() == 3 else "ncthw"
    shape = tuple(output.shape)
    if layout in ("ncthw", "nthwc") and output.dim() != 5:
        raise ModelError(f"model.layer={name!r} outputs shape {shape}, not a 5-D map ({layout}); pick another layer")
    if layout == "tokens":
        if output.dim() != 3 or grid is None:
            raise ModelError(
                f"model.layer={name!r} outputs shape {shape}{'' if grid else ' without its (t, h, w) token grid'}; "
                "token layers must return (tokens (N, L, C), thw) like MViT's blocks"
            )
        if shape[1] - grid[0] * grid[1] * grid[2] not in (0, 1):
            raise ModelError(
                f"model.layer={name!r}: {shape[1]} tokens do not fit the grid {grid} (with at most one class token)"
            )
    return LayerOutput(output, layout, grid)


def replace_output(output, tensor: torch.Tensor):
    """``output`` with its explained tensor replaced by ``tensor`` (keeps a ``(tokens, thw)`` pair's grid)."""
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor
