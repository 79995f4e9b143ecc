"""A model's resolution levels, found from one probe forward, and the automatic choice of layers to fuse.

The rule (``method=fusion`` with ``method.layers: auto``), the same for every model:

1. **Maps.** One seeded random clip of the model's input shape runs forward (and backward) with a hook on every
   module. A module is a candidate when its output reads as a spatio-temporal map with the model's layout
   (:func:`pipeline.explain.layouts.read_output`: a 5-D tensor, or ``(tokens, thw)``) whose ``(t, h, w)`` grid
   has more than one voxel and fits in the clip (no axis longer than the input's ``T``, ``H``, ``W``; this drops
   maps of another layout, e.g. Swin's channels-first patch projection or its pooled ``(N, C, 1, 1, 1)``).
2. **Levels.** Candidates are taken in the order they finish; a map whose grid is larger along any axis than
   an earlier one is skipped (a classifier's maps only shrink). Consecutive candidates with the same grid form
   one resolution level. A level whose maps all lie inside one module that takes the map of another level and
   returns a map of a third grid, and holds no maps but this level's and its own output's, is a step inside that
   module, not a stage, and is dropped (R(2+1)D's spatial half-convolutions).
3. **Class evidence.** A candidate carries evidence for the class when the gradient of the probe's top logit
   w.r.t. its output is not all zero (MViT's last block, whose patch tokens never reach the class token, does
   not). A level is represented by its last candidate with evidence that is not inside the *next* stage: a
   module whose input is a map of this level and whose output is a map of the next one (pre-activation
   networks such as MFNet run the next stage's first BN-ReLU at this level's grid; ``conv2`` rather than
   ``conv3.B01.conv_m1.relu`` then represents the level). A level without evidence is dropped.
4. **Choice.** The deepest ``count`` levels (``method.levels``; conf/method/fusion.yaml takes 3: the coarsest layer says *which* thing, the finer ones
   say *where*). At least two levels are needed; a model with a single one gets a :class:`ModelError`.

On torchvision's R3D-18 this gives ``layer2, layer3, layer4``; on the demo network ``features.block1,
features`` (the last two blocks share one resolution, so they are one level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.explain.layouts import LayerOutput, read_output, replace_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Level:
    """One resolution level: its ``(t, h, w)`` grid, its candidates in execution order, and the chosen one.

    Attributes:
        grid: the level's ``(t, h, w)``.
        modules: names of the modules whose output is a map of this grid, in the order they finish.
        layer: the module that represents the level: the last one whose output carries class evidence and that
            does not belong to the next stage (None: none carries evidence).
    """

    grid: tuple[int, int, int]
    modules: tuple[str, ...]
    layer: str | None


def find_levels(
    net: nn.Module,
    input_shape: tuple[int, int, int, int],
    layout: str = "auto",
    root: nn.Module | None = None,
    token_grid=None,
    order: str = "thw",
) -> list[Level]:
    """The model's resolution levels, coarsest last (rule above, steps 1-3).

    Args:
        net: the model (its parameters are not changed; no parameter gradients are kept).
        input_shape: ``(3, T, H, W)`` of one clip.
        layout: how maps read (:mod:`pipeline.explain.layouts`); ``token_grid`` / ``order``: a token layout's grid
            and token order.
        root: the module whose names are returned (the network inside an adapter; default ``net``).

    A layer with several pathways (a list of maps) is not one level: it is left out.
    """
    limit = tuple(input_shape[1:])
    outputs: list[tuple[str, tuple[int, int, int], LayerOutput]] = []
    spans: dict[str, tuple] = {}  # module -> (input grid, output grid), maps only

    def map_grid(value, name):
        try:
            parts = read_output(value, layout, name, token_grid, 1, order)
        except ModelError:
            return None, None
        if len(parts) != 1:
            return None, None
        read = parts[0]
        size = tuple(read.as_ncthw(read.tensor.detach()).shape[2:])
        if torch.Size(size).numel() <= 1 or any(g > lim for g, lim in zip(size, limit)):
            return None, None
        return read, size

    def hook(_module, inputs, output, name):
        read, grid = map_grid(output, name)
        spans[name] = (map_grid(inputs if len(inputs) == 2 else inputs[0] if inputs else None, name)[1], grid)
        if read is None:
            return None
        outputs.append((name, grid, read))
        return replace_output(output, [read.tensor.clone()])  # an in-place op above must not change the record

    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
        for name, module in (root or net).named_modules()
        if name
    ]
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(0)
    clip = torch.randn((1, *input_shape), generator=generator).to(device).requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = net(clip)
            if isinstance(logits, torch.Tensor) and logits.dim() == 2:
                top = logits[0, logits[0].argmax()]
                grads = torch.autograd.grad(top, [r.tensor for _, _, r in outputs], allow_unused=True)
            else:
                grads = [None] * len(outputs)
    finally:
        for handle in handles:
            handle.remove()

    levels: list[tuple[tuple[int, int, int], list[str], list[bool]]] = []
    for (name, grid, read), grad in zip(outputs, grads):
        if levels and any(g > prev for g, prev in zip(grid, levels[-1][0])):
            continue  # grows again: another layout's map, or a branch that is not the trunk
        evidence = grad is not None and bool(read.as_ncthw(grad).abs().amax() > 0)  # a class token is no map
        if levels and levels[-1][0] == grid:
            levels[-1][1].append(name)
            levels[-1][2].append(evidence)
        else:
            levels.append((grid, [name], [evidence]))
    grids = {name: grid for name, grid, _ in outputs}
    starts = {level[0] for level in levels}  # a step starts from a level's map (a stem starts from the clip)

    def step_inside(names: list[str], grid) -> bool:  # every map of the level lies in one module passing through it
        for m, span in spans.items():
            inner = [n for n in grids if n.startswith(f"{m}.")]
            if None in span or grid in span or span[0] not in starts or not inner:
                continue
            if any(grids[n] not in (grid, span[1]) for n in inner):
                continue
            if all(n.startswith(f"{m}.") for n in names):
                return True
        return False

    levels = [level for level in levels if not step_inside(level[1], level[0])]
    found = []
    for i, (grid, names, flags) in enumerate(levels):
        following = levels[i + 1][0] if i + 1 < len(levels) else None
        stages = [m for m, (start, end) in spans.items() if start == grid and end is not None and end == following]
        inside = lambda name, stages=stages: any(name.startswith(f"{stage}.") for stage in stages)
        carriers = [name for name, flag in zip(names, flags) if flag and not inside(name)]
        found.append(Level(grid, tuple(names), carriers[-1] if carriers else None))
    return found


def choose_layers(
    net: nn.Module,
    input_shape: tuple[int, int, int, int],
    layout: str,
    count: int,
    root: nn.Module | None = None,
    grid=None,
    order: str = "thw",
) -> list[str]:
    """The layers ``method.layers: auto`` fuses: the last carrier of evidence of each of the deepest ``count``
    levels, finest first (rule above). Raises :class:`ModelError` when fewer than two levels carry evidence."""
    if int(count) < 2:
        raise ModelError(f"method.levels must be >= 2 (layers fused), got {count}")
    levels = find_levels(net, input_shape, layout, root, grid, order)
    usable = [level for level in levels if level.layer is not None]
    if len(usable) < 2:
        found = ", ".join(f"{level.modules[-1]} {'x'.join(map(str, level.grid))}" for level in levels) or "none"
        raise ModelError(
            f"method=fusion with method.layers=auto: {type(net).__name__} has {len(usable)} resolution level(s) "
            f"with class evidence for a {'x'.join(map(str, input_shape[1:]))} clip (maps found: {found}); "
            "fusion needs two: use a single-layer method (cam, gradcam, ...) or name method.layers"
        )
    chosen = [level.layer for level in usable[-int(count) :]]
    log.info(
        "fusion: automatic layers %s (grids %s)",
        "+".join(chosen),
        ", ".join("x".join(map(str, level.grid)) for level in usable[-int(count) :]),
    )
    return chosen
