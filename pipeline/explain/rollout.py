"""Attention rollout and gradient-weighted rollout of video transformers with joint space-time attention.

Both methods read the attention probabilities of every block, not one layer's activations. They fit the
explainer's design through two hooks every :class:`~pipeline.explain.methods.SaliencyMethod` has: ``attach``
(called once when the explainer is built: checks that the model fits, before any work, and returns an
:class:`AttentionCapture`) and ``Evidence.attention`` (the :class:`AttentionRecord` of one batch, recorded by that
capture's context around the explainer's forward pass). The explainer names no method: it enters whatever
context the method attached. The tube is ``(N, k, t, h, w)`` on the model's token grid, like every other
method's, so the writer, stats, report and evaluate stages take it unchanged.

Capture: the HF attention modules (VideoMAE's ``VideoMAESelfAttention``, ViViT's ``VivitAttention``) return
``(output, probabilities)``; while recording, the model runs its eager attention (``config._attn_implementation``
set to ``eager`` and restored afterwards: SDPA never materialises the probabilities) and forward hooks keep the
second element. The hooks return nothing, so the logits are the model's own (eager's, equal to SDPA's up to
rounding). For gradients, a forward pre-hook on the first attention module makes its input a leaf that requires
grad, so the graph holds every block's probabilities and nothing below.

Not supported (one :class:`~pipeline.errors.ModelError` line when the explainer is built): CNNs (no attention),
TimeSformer (divided space-time attention: two maps per block, not composed here yet) and torchvision's MViT
(pooling attention changes the token count between blocks, so the per-block maps do not multiply).
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
    "TimesformerForVideoClassification": "divided space-time attention (a temporal and a spatial map per block) "
    "is not composed into one token-to-token map yet",
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

    def __init__(self, root: nn.Module, modules: list[nn.Module], grid, order: str, grad: bool):
        self.root, self.modules, self.grid, self.order, self.grad = root, modules, tuple(grid), order, grad

    @contextmanager
    def recording(self):
        """A context in which one forward pass fills the yielded :class:`AttentionRecord` (``logits`` are set
        by the caller, who has them)."""
        record = AttentionRecord(grid=self.grid, order=self.order)
        config = self.root.config
        before = config._attn_implementation

        def keep(_module, _inputs, output):
            record.probs.append(output[1])

        def leaf(_module, args, kwargs):
            torch.set_grad_enabled(True)  # restored when the caller's no_grad block ends
            if args:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            hidden = kwargs["hidden_states"].detach().requires_grad_(True)
            return args, {**kwargs, "hidden_states": hidden}

        handles = [module.register_forward_hook(keep) for module in self.modules]
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
    if kind not in JOINT_ATTENTION:
        raise ModelError(
            f"method={method} needs a transformer with joint space-time attention (HF VideoMAE or ViViT); "
            f"{kind} has none; use a CAM method"
        )
    modules = [m for m in root.modules() if type(m).__name__ == JOINT_ATTENTION[kind]]
    return root, modules


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
        root, modules = attention_modules(net, self.name)
        return AttentionCapture(root, modules, grid, order, grad=self.needs_grad)

    def tubes(self, evidence: Evidence) -> torch.Tensor:
        record = evidence.attention
        rows = read_rollout(rollout_matrix([p.detach().float() for p in record.probs]), record.grid)
        tube = token_tube(rows[:, None], record.grid, record.order)
        return tube.expand(-1, evidence.targets.shape[1], -1, -1, -1).contiguous()


def rollout_matrix(probs: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``(N, L, L)`` rollout of per-block ``(N, heads, L, L)`` probabilities (Abnar & Zuidema); with ``grads``
    (per block ``(N, k, heads, L, L)``) the gradient rollout ``(N, k, L, L)`` (Chefer et al.)."""
    eye = torch.eye(probs[0].shape[-1], dtype=probs[0].dtype, device=probs[0].device)
    result = None
    for b, a in enumerate(probs):
        if grads is None:
            block = (a.mean(1) + eye) / 2  # rows of a sum to 1: (A + I) renormalised
        else:
            block = (grads[b] * a[:, None]).clamp(min=0).mean(2) + eye
        result = block if result is None else block @ result
    return result


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
        rows = read_rollout(rollout_matrix([p.detach().float() for p in record.probs], grads), record.grid)
        return token_tube(rows, record.grid, record.order)
