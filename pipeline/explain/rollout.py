"""Attention rollout and gradient-weighted rollout of HF video transformers (VideoMAE, ViViT, TimeSformer).

Both methods read the attention probabilities of every block, not one layer's activations. They fit the
explainer's design through two hooks every :class:`~pipeline.explain.methods.SaliencyMethod` has: ``attach``
(called once when the explainer is built: checks that the model fits, before any work, and returns an
:class:`AttentionCapture`) and ``Evidence.attention`` (the :class:`AttentionRecord` of one batch, recorded by that
capture's context around the explainer's forward pass). The explainer names no method: it enters whatever
context the method attached. The tube is ``(N, k, t, h, w)`` on the model's token grid, like every other
method's, so the writer, stats, report and evaluate stages take it unchanged.

Capture: the joint attention modules (VideoMAE's ``VideoMAESelfAttention``, ViViT's ``VivitAttention``) return
``(output, probabilities)``; while recording, the model runs its eager attention (``config._attn_implementation``
set to ``eager`` and restored afterwards: SDPA never materialises the probabilities) and forward hooks keep the
second element. The hooks return nothing, so the logits are the model's own (eager's, equal to SDPA's up to
rounding). For gradients, a forward pre-hook on the first attention module makes its input a leaf that requires
grad, so the graph holds every block's probabilities and nothing below.

TimeSformer's divided space-time attention gives two maps per block (hooks on each attention's ``attn_drop``,
whose output is the probabilities): its temporal map (each location's patches over the frames) and its spatial
map (each frame's patches and a copy of the class token, whose rows are averaged over the frames) are each
written as one ``L x L`` token-to-token map (:func:`divided_map`), each gets its identity (the residual), and the
block is spatial times temporal, the order they run in.

Not supported (one :class:`~pipeline.errors.ModelError` line when the explainer is built): CNNs (no attention)
and torchvision's MViT (pooling attention changes the token count between blocks, so the maps do not multiply).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.explain.methods import Evidence, SaliencyMethod
from pipeline.models import ModelError
from pipeline.models.adapters import unwrap

#: HF video classifiers with one joint space-time attention per block -> the class of that attention module
JOINT_ATTENTION = {
    "VideoMAEForVideoClassification": "VideoMAESelfAttention",
    "VivitForVideoClassification": "VivitAttention",
}
REFUSED = {
    "MViT": "its pooling attention changes the token count between blocks, so the blocks' maps do not multiply",
}


@dataclass
class AttentionRecord:
    """The attention of one batch: ``probs`` per block ``(N, heads, L, L)`` (in the autograd graph when
    recorded with gradients), the ``logits`` ``(N, K)`` they lead to, and the token ``grid`` / ``order``."""

    probs: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None
    grid: tuple[int, int, int] = (1, 1, 1)
    order: str = "thw"
    divided: bool = False

    def grads(self, targets: torch.Tensor) -> list[torch.Tensor]:
        """Per block ``(N, k, heads, L, L)`` gradients of each target logit (``targets`` ``(N, k)``) w.r.t. the
        probabilities (one ``torch.autograd.grad`` per target; clips are independent, so per-clip one-hots)."""
        if self.logits is None or not self.logits.requires_grad:
            raise ModelError("gradient rollout needs the attention recorded with gradients")
        per_target = []
        for j in range(targets.shape[1]):
            onehot = torch.zeros_like(self.logits).scatter_(1, targets[:, j : j + 1], 1)
            keep = j < targets.shape[1] - 1
            per_target.append(torch.autograd.grad(self.logits, self.probs, grad_outputs=onehot, retain_graph=keep))
        return [torch.stack([g[b] for g in per_target], 1).float() for b in range(len(self.probs))]


class AttentionCapture:
    """Records the attention probabilities of ``modules`` (one per block, in order) of the HF model ``root``."""

    def __init__(self, root: nn.Module, modules: list[nn.Module], grid, order: str, grad: bool, divided=False):
        self.root, self.modules, self.grid, self.order, self.grad = root, modules, tuple(grid), order, grad
        self.divided = divided

    @contextmanager
    def recording(self):
        """A context in which one forward pass fills the yielded :class:`AttentionRecord` (``logits`` are set
        by the caller, who has them)."""
        record = AttentionRecord(grid=self.grid, order=self.order, divided=self.divided)
        config = self.root.config
        before = config._attn_implementation

        record.probs = [None] * len(self.modules)

        def keep(_module, _inputs, output, at):
            record.probs[at] = output if isinstance(output, torch.Tensor) else output[1]

        def leaf(_module, args, kwargs):
            torch.set_grad_enabled(True)  # restored when the caller's no_grad block ends
            if args:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            hidden = kwargs["hidden_states"].detach().requires_grad_(True)
            return args, {**kwargs, "hidden_states": hidden}

        handles = [
            module.register_forward_hook(lambda m, i, o, at=at: keep(m, i, o, at))
            for at, module in enumerate(self.modules)
        ]
        if self.grad:
            handles.append(self.modules[0].register_forward_pre_hook(leaf, with_kwargs=True))
        config._attn_implementation = "eager"
        try:
            yield record
        finally:
            config._attn_implementation = before
            for handle in handles:
                handle.remove()


def attention_modules(net: nn.Module, method: str) -> tuple[nn.Module, list[nn.Module]]:
    """The HF model inside ``net`` and its blocks' joint attention modules; a :class:`ModelError` line for a
    model whose attention does not fit ``method`` (or that has none)."""
    root = unwrap(net)
    kind = type(root).__name__
    if kind in REFUSED:
        raise ModelError(f"method={method} does not support {kind}: {REFUSED[kind]}")
    if kind == "TimesformerForVideoClassification":
        if root.config.attention_type != "divided_space_time":
            raise ModelError(f"method={method} needs TimeSformer's divided_space_time attention")
        blocks = root.timesformer.encoder.layer
        modules = [
            m for b in blocks for m in (b.temporal_attention.attention.attn_drop, b.attention.attention.attn_drop)
        ]
        return root, modules, True
    if kind not in JOINT_ATTENTION:
        raise ModelError(
            f"method={method} needs a transformer with joint space-time attention (HF VideoMAE, ViViT) or "
            f"TimeSformer's divided attention; {kind} has none; use a CAM method"
        )
    modules = [m for m in root.modules() if type(m).__name__ == JOINT_ATTENTION[kind]]
    return root, modules, False


def token_tube(rows: torch.Tensor, grid, order: str) -> torch.Tensor:
    """``(N, k, L)`` token rows -> ``(N, k, t, h, w)``: the class token (``L - t*h*w`` leading tokens) dropped,
    the rest laid out in ``order`` (``thw`` or ``hwt``)."""
    t, h, w = grid
    tokens = rows[..., rows.shape[-1] - t * h * w :]
    if order == "hwt":
        return tokens.unflatten(-1, (h, w, t)).permute(0, 1, 4, 2, 3)
    return tokens.unflatten(-1, (t, h, w))


def read_rollout(rollout: torch.Tensor, grid) -> torch.Tensor:
    """``(..., L, L)`` rollout -> ``(..., L)``: the class token's row, or (no class token: the model mean-pools)
    the mean of the token rows."""
    prefix = rollout.shape[-1] - math.prod(grid)
    return rollout[..., 0, :] if prefix == 1 else rollout.mean(-2)


class AttentionRollout(SaliencyMethod):
    """Attention rollout (Abnar & Zuidema, 2020, "Quantifying attention flow in transformers").

    Per block ``b`` the attention averaged over heads, the identity added (the residual) and rows renormalised,
    ``Â_b = (mean_h A_b + I) / 2``; multiplied through the blocks, ``R = Â_B ... Â_2 Â_1``. The tube is the class
    token's row of ``R`` (ViViT) or the mean of its rows (VideoMAE mean-pools its tokens), without the class
    token's own column, on the ``(t, h, w)`` token grid. Class-independent: every target gets the same tube.

    Example:
        >>> a = torch.full((1, 1, 2, 2), 0.5)  # one block, one head, two tokens attending evenly
        >>> rollout_matrix([a]).tolist()
        [[[0.75, 0.25], [0.25, 0.75]]]
    """

    name = "rollout"
    needs_grad = False
    needs_layer_grads = False

    def attach(self, net: nn.Module, grid, order: str) -> AttentionCapture:
        root, modules, divided = attention_modules(net, self.name)
        return AttentionCapture(root, modules, grid, order, grad=self.needs_grad, divided=divided)

    def tubes(self, evidence: Evidence) -> torch.Tensor:
        record = evidence.attention
        grid = record.grid if record.divided else None
        rows = read_rollout(rollout_matrix([p.detach().float() for p in record.probs], grid=grid), record.grid)
        tube = token_tube(rows[:, None], record.grid, record.order)
        return tube.expand(-1, evidence.targets.shape[1], -1, -1, -1).contiguous()


def divided_map(temporal: torch.Tensor, spatial: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(N, k, L, L)`` token-to-token maps (spatial, temporal) of a TimeSformer block (tokens: the class
    token, then ``hwt``) from its head-reduced temporal ``(N*h*w, k, t, t)`` and spatial ``(N*t, k, 1+h*w, 1+h*w)``
    maps.

    The temporal map moves each patch token along its own location's frames (the class token has no entry: it
    passes by the residual only); the spatial map mixes the tokens of one frame and the class token, whose row is
    the mean over the frames' class rows (TimeSformer averages the per-frame class outputs). Each gets its
    identity added separately (:func:`rollout_matrix`); the block is the spatial map times the temporal one.
    """
    t, h, w = grid
    hw = h * w
    temporal = temporal.unflatten(0, (-1, hw)).movedim(1, 2)  # (N, k, hw, t, t)
    spatial = spatial.unflatten(0, (-1, t)).movedim(1, 2)  # (N, k, t, 1+hw, 1+hw)
    n, k = temporal.shape[:2]
    length = 1 + t * hw
    eye_p = torch.eye(hw, dtype=temporal.dtype, device=temporal.device)
    eye_f = torch.eye(t, dtype=temporal.dtype, device=temporal.device)
    tm = temporal.new_zeros(n, k, length, length)
    tm[..., 1:, 1:] = torch.einsum("pq,nkpfg->nkpfqg", eye_p, temporal).reshape(n, k, t * hw, t * hw)
    sm = temporal.new_zeros(n, k, length, length)
    patches = spatial[..., 1:, 1:]  # (N, k, t, hw, hw): frame f, patch p -> patch q
    sm[..., 1:, 1:] = torch.einsum("fg,nkfpq->nkpfqg", eye_f, patches).reshape(n, k, t * hw, t * hw)
    sm[..., 1:, 0] = spatial[..., 1:, 0].movedim(2, 3).reshape(n, k, t * hw)  # (p, f) -> class token
    sm[..., 0, 0] = spatial[..., 0, 0].mean(2)
    sm[..., 0, 1:] = (spatial[..., 0, 1:] / t).movedim(2, 3).reshape(n, k, t * hw)
    return sm, tm


def rollout_matrix(probs: list[torch.Tensor], grads: list[torch.Tensor] | None = None, grid=None) -> torch.Tensor:
    """``(N, L, L)`` rollout of per-block ``(N, heads, L, L)`` probabilities (Abnar & Zuidema); with ``grads``
    (per block ``(N, k, heads, L, L)``) the gradient rollout ``(N, k, L, L)`` (Chefer et al.). With ``grid``,
    ``probs`` alternate a TimeSformer block's temporal and spatial maps (:func:`divided_map`)."""
    if grads is None:
        maps = [a.mean(1)[:, None] for a in probs]
    else:
        maps = [(g * a[:, None]).clamp(min=0).mean(2) for a, g in zip(probs, grads)]
    if grid is not None:
        maps = [m for b in range(0, len(maps), 2) for m in divided_map(maps[b], maps[b + 1], grid)[::-1]]
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    result = None
    for m in maps:
        block = m + eye
        if grads is None:
            block = block / block.sum(-1, keepdim=True)  # (A + I) renormalised
        result = block if result is None else block @ result
    return result if grads is not None else result[:, 0]


class GradRollout(AttentionRollout):
    """Gradient-weighted rollout (Chefer, Gur & Wolf, 2021, "Generic attention-model explainability for
    interpreting bi-modal and encoder-decoder transformers", their rule for self-attention).

    Per block ``Ā_b = mean_h (∇A_b ⊙ A_b)^+`` (the gradient of the target logit w.r.t. the attention
    probabilities, times them, clamped at 0 per head, then averaged over heads, as the authors' code), the
    identity added, ``R = (I + Ā_B) ... (I + Ā_1)`` (``R ← R + Ā_b R``, no renormalisation). Read as the
    rollout: the class token's row or the mean of the token rows, on the ``(t, h, w)`` grid; one tube per target.

    Example:
        >>> a, g = torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 1, 2, 2)
        >>> rollout_matrix([a], [g]).tolist()
        [[[[1.5, 0.5], [0.5, 1.5]]]]
    """

    name = "gradrollout"
    needs_grad = True

    def tubes(self, evidence: Evidence) -> torch.Tensor:
        record = evidence.attention
        grads = record.grads(evidence.targets)
        grid = record.grid if record.divided else None
        probs = [p.detach().float() for p in record.probs]
        rows = read_rollout(rollout_matrix(probs, grads, grid), record.grid)
        return token_tube(rows, record.grid, record.order)
