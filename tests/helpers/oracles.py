"""Independent computations of the CAM family for the tests: the layer's output and gradients taken with a plain
forward hook and a full autograd graph (one backward per target), and each method's formula written out in
float64 numpy, one clip and one target at a time."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_ncthw(output, layout: str) -> torch.Tensor:
    """The explained tensor of a layer's output as (N, C, t, h, w), written independently of pipeline.explain.layouts."""
    if layout == "tokens":
        tokens, (t, h, w) = output
        if tokens.shape[1] == t * h * w + 1:
            tokens = tokens[:, 1:]
        return tokens.reshape(tokens.shape[0], t, h, w, tokens.shape[2]).permute(0, 4, 1, 2, 3)
    if layout == "nthwc":
        return output.permute(0, 4, 1, 2, 3)
    return output


def reference_evidence(net, layer, x, targets, layout="ncthw"):
    """Activations (N, C, t, h, w) and per-target gradients (N, k, C, t, h, w) as float64 numpy, through a
    graph over the whole model (the input requires grad), one ``autograd.grad`` per target."""
    store = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
    try:
        with torch.enable_grad():
            logits = net(x.clone().requires_grad_(True))
            raw = store["out"][0] if isinstance(store["out"], tuple) else store["out"]
            grads = []
            for j in range(targets.shape[1]):
                (g,) = torch.autograd.grad(logits.gather(1, targets[:, j : j + 1]).sum(), raw, retain_graph=True)
                grads.append(g)
    finally:
        handle.remove()
    grid = store["out"][1] if isinstance(store["out"], tuple) else None
    wrap = (lambda v: (v, grid)) if layout == "tokens" else (lambda v: v)
    acts = to_ncthw(wrap(raw.detach()), layout).double().numpy()
    grads = np.stack([to_ncthw(wrap(g), layout).double().numpy() for g in grads], axis=1)
    return acts, grads, logits.detach()


def relu(v):
    return np.maximum(v, 0)


def oracle_tube(method: str, A: np.ndarray, G: np.ndarray | None = None, w_row: np.ndarray | None = None) -> np.ndarray:
    """The (t, h, w) tube of one clip and one target: ``A`` (C, t, h, w), ``G`` (C, t, h, w) the gradients
    of the target's logit, ``w_row`` (C,) the classifier's row of the target."""
    axes = (1, 2, 3)
    if method == "cam":
        return np.tensordot(w_row, A, axes=1)
    if method == "gradcam":
        return relu(np.tensordot(G.mean(axis=axes), A, axes=1))
    if method == "gradcampp":
        g2, g3 = G**2, G**3
        a = g2 / (2 * g2 + A.sum(axis=axes)[:, None, None, None] * g3 + 1e-6)
        a[G == 0] = 0
        return relu(np.tensordot((a * relu(G)).sum(axis=axes), A, axes=1))
    if method == "xgradcam":
        weights = (G * A).sum(axis=axes) / (A.sum(axis=axes) + 1e-7)
        return relu(np.tensordot(weights, A, axes=1))
    if method == "layercam":
        return relu((relu(G) * A).sum(axis=0))
    raise ValueError(method)


def oracle_tubes(method, acts, grads, targets, weight=None) -> np.ndarray:
    n, k = targets.shape
    out = np.zeros((n, k, *acts.shape[2:]))
    for i in range(n):
        for j in range(k):
            t = int(targets[i, j])
            out[i, j] = oracle_tube(
                method, acts[i], None if grads is None else grads[i, j], None if weight is None else weight[t]
            )
    return out


def oracle_scorecam(net, x, acts: np.ndarray, targets) -> np.ndarray:
    """Score-CAM one channel at a time: softmax score of the target on the clip masked by the channel's
    upsampled, min-max normalised map, minus the score on an all-zero clip."""
    with torch.no_grad():
        base = net(torch.zeros_like(x[:1])).double().softmax(1)[0]
        out = np.zeros((x.shape[0], targets.shape[1], *acts.shape[2:]))
        for i in range(x.shape[0]):
            weights = np.zeros((targets.shape[1], acts.shape[1]))
            for c in range(acts.shape[1]):
                a = torch.from_numpy(acts[i, c]).float()[None, None]
                if a.max() == a.min():
                    continue
                mask = F.interpolate(a, size=x.shape[2:], mode="trilinear", align_corners=False)
                mask = (mask - a.min()) / (a.max() - a.min())
                probs = net(x[i : i + 1] * mask).double().softmax(1)[0]
                for j in range(targets.shape[1]):
                    t = int(targets[i, j])
                    weights[j, c] = float(probs[t] - base[t])
            for j in range(targets.shape[1]):
                out[i, j] = relu(np.tensordot(weights[j], acts[i], axes=1))
    return out


def assert_tubes_close(mine: torch.Tensor, reference: np.ndarray, tol: float = 1e-4) -> None:
    """Equal to ``tol`` of the reference's largest magnitude (per clip and target)."""
    mine = mine.detach().double().numpy()
    assert mine.shape == reference.shape, (mine.shape, reference.shape)
    scale = np.abs(reference).reshape(*reference.shape[:2], -1).max(-1)[..., None, None, None]
    assert (scale > 0).any(), "degenerate reference: every tube is zero"
    error = np.abs(mine - reference) / np.maximum(scale, 1e-12)
    assert error.max() <= tol, f"max error {error.max():.2e} of the reference's peak"


def li2021_by_hand(net, clip: np.ndarray, tube: np.ndarray, target: int, cells: int, steps: int):
    """One clip ``(C, T, H, W)``, its tube ``(T, H, W)``: Li et al.'s deletion and insertion curves and AUCs.

    Cells are block means; they are ranked highest first (the test's tubes have no ties); step ``s`` touches
    the first ``floor(s * n / steps)`` cells; touched voxels are 0 in the normalised clip; softmax by hand."""
    c, t, h, w = clip.shape
    kh, kw = h // cells, w // cells
    means = tube.reshape(t, cells, kh, cells, kw).mean(axis=(2, 4)).reshape(-1)
    order = sorted(range(len(means)), key=lambda i: -means[i])
    n = len(order)
    curves = {}
    for mode in ("deletion", "insertion"):
        probs = []
        for s in range(steps + 1):
            touched = np.zeros(n)
            touched[order[: s * n // steps]] = 1
            grid = touched.reshape(t, cells, cells)
            pixels = np.kron(grid, np.ones((kh, kw)))  # (T, H, W): each cell over its pixels
            keep = 1 - pixels if mode == "deletion" else pixels
            perturbed = torch.from_numpy((clip * keep[None]).astype(np.float32))[None]
            with torch.no_grad():
                logits = net(perturbed)[0].double().numpy()
            e = np.exp(logits - logits.max())
            probs.append(e[target] / e.sum())
        probs = np.array(probs)
        curves[mode] = (probs, (probs.sum() - probs[0] / 2 - probs[-1] / 2) / (len(probs) - 1))
    return curves
