"""method=rollout / gradrollout on tiny HF VideoMAE, ViViT and TimeSformer (random weights): the tubes against
rollouts written out here from the models' own attentions (``output_attentions=True``, or hooks for TimeSformer's
two maps per block), logits unchanged by the capture, models that do not fit refused in one line, and one
stage=all run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from helpers.config import make_cfg, small_run
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.rollout import AttentionRollout, GradRollout
from pipeline.models import DemoNet3D, ModelError
from pipeline.models.adapters import adapt, unwrap
from pipeline.models.zoo import mvit

TINY = dict(
    image_size=32, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
GRID = (2, 2, 2)  # (4 / 2, 32 / 16, 32 / 16) tubelets
MODEL_CFG = dict(
    output="logits", layout="tokens", grid=None, token_order=None, input=dict(layout="ntchw", pathways=None)
)


def tiny(arch: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    if arch == "videomae":
        config = transformers.VideoMAEConfig(patch_size=16, tubelet_size=2, num_labels=3, **TINY)
        net = transformers.VideoMAEForVideoClassification(config)
        layer = "videomae.encoder.layer.1"
    else:
        config = transformers.VivitConfig(tubelet_size=[2, 16, 16], num_labels=3, **TINY)
        net = transformers.VivitForVideoClassification(config)
        layer = "vivit.layers.1"
    net.set_attn_implementation(attn)
    return net.eval(), layer


def explainer(arch: str, method, attn: str = "sdpa"):
    net, layer = tiny(arch, attn)
    from omegaconf import OmegaConf

    adapter = adapt(net, OmegaConf.create(MODEL_CFG))
    return net, TubeExplainer(adapter, method, (3, 4, 32, 32), layer=layer, layout="tokens")


def reference_attentions(net, x):
    """The model's own attentions (eager, output_attentions=True) as float64 numpy, and its logits."""
    before = net.config._attn_implementation
    net.set_attn_implementation("eager")
    with torch.no_grad():
        out = net(x.permute(0, 2, 1, 3, 4), output_attentions=True)
    net.set_attn_implementation(before)
    return [a.double().numpy() for a in out.attentions], out.logits


def numpy_rollout(attentions, blocks=None):
    """Rollout written out with numpy: per block (head mean [+ grad weighting] + I), product, read out."""
    n, _, length, _ = attentions[0].shape
    eye = np.eye(length)
    result = np.stack([eye] * n)
    for b, a in enumerate(attentions):
        if blocks is None:
            block = a.mean(1) + eye
            block = block / block.sum(-1, keepdims=True)
        else:
            block = np.maximum(blocks[b] * a, 0).mean(1) + eye
        result = np.einsum("nij,njk->nik", block, result)
    return result


def readout(result, grid):
    """The class token's row, or (no class token) the mean of the rows, class token column dropped, on the grid."""
    tokens = int(np.prod(grid))
    rows = result[:, 0] if result.shape[-1] == tokens + 1 else result.mean(1)
    return rows[:, -tokens:].reshape(len(result), *grid)


@pytest.mark.parametrize("arch", ["videomae", "vivit"])
def test_rollout_equals_the_rollout_of_the_models_own_attentions(arch):
    net, exp = explainer(arch, AttentionRollout())
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    attentions, _ = reference_attentions(net, x)
    targets = torch.tensor([[0, 2], [1, 0]])
    tubes = exp(x, lambda _: targets).tubes
    assert tubes.shape == (2, 2, *GRID)
    expected = readout(numpy_rollout(attentions), GRID)
    for j in range(2):
        np.testing.assert_allclose(tubes[:, j].double().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected[0], expected[0].mean())  # not a flat map


@pytest.mark.parametrize("arch", ["videomae", "vivit"])
def test_gradrollout_equals_chefers_rule_on_autograd_gradients(arch):
    net, exp = explainer(arch, GradRollout())
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[0, 2], [1, 0]])
    net.requires_grad_(True).set_attn_implementation("eager")  # the explainer froze the parameters
    out = net(x.permute(0, 2, 1, 3, 4), output_attentions=True)
    net.requires_grad_(False).set_attn_implementation("sdpa")
    attentions = [a.detach().double().numpy() for a in out.attentions]
    expected = []
    for j in range(2):
        picked = out.logits.gather(1, targets[:, j : j + 1]).sum()
        grads = torch.autograd.grad(picked, out.attentions, retain_graph=True)
        expected.append(readout(numpy_rollout(attentions, [g.double().numpy() for g in grads]), GRID))
    tubes = exp(x, lambda _: targets).tubes
    assert tubes.shape == (2, 2, *GRID)
    for j in range(2):
        np.testing.assert_allclose(tubes[:, j].double().numpy(), expected[j], rtol=1e-4, atol=1e-6)
    assert not np.allclose(expected[0], expected[1])  # the targets differ


@pytest.mark.parametrize("method", [AttentionRollout(), GradRollout()], ids=["rollout", "gradrollout"])
def test_logits_are_unchanged_by_the_capture(method):
    net, exp = explainer("videomae", method, attn="eager")
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = net(x.permute(0, 2, 1, 3, 4)).logits
    explained = exp(x, lambda logits: logits.argmax(1, keepdim=True))
    torch.testing.assert_close(explained.logits, plain, rtol=0, atol=0)
    assert net.config._attn_implementation == "eager" and not any(m._forward_hooks for m in net.modules())
    _, sdpa = explainer("videomae", method)
    torch.testing.assert_close(sdpa(x, lambda logits: logits.argmax(1, keepdim=True)).logits, plain)
    assert unwrap(sdpa.net).config._attn_implementation == "sdpa"  # restored after the capture


def test_models_that_do_not_fit_are_refused_in_one_line():
    with pytest.raises(ModelError, match="method=rollout needs a transformer with joint space-time attention"):
        TubeExplainer(DemoNet3D(num_classes=4), AttentionRollout(), (3, 8, 32, 32), layer="features.block2")
    net = mvit("mvit_v2_s", num_classes=3, clip_len=4, size=(32, 32))
    with pytest.raises(ModelError, match="pooling attention changes the token count between blocks"):
        GradRollout().attach(net, (2, 8, 8), "thw")


def test_a_rollout_is_not_fused():
    from pipeline.explain.fusion import Fusion
    from pipeline.explain.methods import MethodError

    with pytest.raises(MethodError, match="method.method=rollout reads every block's attention"):
        Fusion(AttentionRollout(), ["a", "b"], "mean", 3)


@pytest.mark.slow
def test_rollout_runs_end_to_end(synthetic_root, random_checkpoint, tmp_path):
    """stage=all with method=rollout on the zoo's VideoMAE at test size: tubes on the token grid, a report."""
    from pipeline.__main__ import run
    from pipeline.store import read_tubes

    overrides = [
        *small_run(synthetic_root, random_checkpoint),
        "model=videomae_b",
        "model.checkpoint=null",
        "+model.net.hidden_size=32",
        "+model.net.num_hidden_layers=2",
        "+model.net.num_attention_heads=2",
        "+model.net.intermediate_size=64",
        "+model.net.patch_size=8",
        "model.net.num_labels=4",
        "model.input.clip_len=4",
        "model.input.size=[32,32]",
        "model.input.short_side=32",
        "model.layer=videomae.encoder.layer.1",
        "method=rollout",
        "run_name=rollout",
        "stage=all",
    ]
    run(make_cfg(tmp_path, overrides))
    run_dir = tmp_path / "outputs" / "rollout"
    tubes = read_tubes(run_dir, columns=["clip_id", "method", "volume"])
    assert len(tubes) > 0 and set(tubes["method"]) == {"rollout"}
    assert (run_dir / "report" / "index.html").is_file()


def numpy_divided(temporal, spatial, grid):
    """A TimeSformer block's head-reduced temporal ``(N*hw, t, t)`` and spatial ``(N*t, 1+hw, 1+hw)`` maps as
    L x L maps over (class token, then patches in h, w, t order), written out with loops."""
    t, h, w = grid
    hw = h * w
    n, length = temporal.shape[0] // hw, 1 + t * hw

    def at(p, f):
        return 1 + p * t + f

    tm, sm = np.zeros((n, length, length)), np.zeros((n, length, length))
    for i in range(n):
        for p in range(hw):
            for f in range(t):
                for g in range(t):
                    tm[i, at(p, f), at(p, g)] = temporal[i * hw + p, f, g]
        for f in range(t):
            s = spatial[i * t + f]
            sm[i, 0, 0] += s[0, 0] / t
            for p in range(hw):
                sm[i, at(p, f), 0] = s[1 + p, 0]
                sm[i, 0, at(p, f)] = s[0, 1 + p] / t
                for q in range(hw):
                    sm[i, at(p, f), at(q, f)] = s[1 + p, 1 + q]
    return tm, sm


def test_timesformer_rollouts_compose_temporal_then_spatial_attention():
    torch.manual_seed(0)
    config = transformers.TimesformerConfig(patch_size=16, num_labels=3, **TINY)
    net = transformers.TimesformerForVideoClassification(config).eval()
    drops = [
        m
        for b in net.timesformer.encoder.layer
        for m in (b.temporal_attention.attention.attn_drop, b.attention.attention.attn_drop)
    ]
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    kept = []
    handles = [d.register_forward_hook(lambda m, i, o: kept.append(o)) for d in drops]
    net.requires_grad_(True)
    logits = net(x.permute(0, 2, 1, 3, 4)).logits
    for handle in handles:
        handle.remove()
    targets = torch.tensor([[2], [1]])
    grads = torch.autograd.grad(logits.gather(1, targets).sum(), kept)
    probs = [p.detach().double().numpy() for p in kept]
    grid = (4, 2, 2)
    expected = {}
    for name, maps in [
        ("rollout", [p.mean(1) for p in probs]),
        ("gradrollout", [np.maximum(g.double().numpy() * p, 0).mean(1) for p, g in zip(probs, grads)]),
    ]:
        result = np.stack([np.eye(17)] * 2)
        for b in range(0, len(maps), 2):
            for m in numpy_divided(maps[b], maps[b + 1], grid):  # temporal first, then spatial
                block = m + np.eye(17)
                if name == "rollout":
                    block = block / block.sum(-1, keepdims=True)
                result = np.einsum("nij,njk->nik", block, result)
        expected[name] = result[:, 0, 1:].reshape(2, 2, 2, 4).transpose(0, 3, 1, 2)  # hwt -> thw
    from omegaconf import OmegaConf

    adapter = adapt(net, OmegaConf.create(MODEL_CFG))
    for name, method in [("rollout", AttentionRollout()), ("gradrollout", GradRollout())]:
        exp = TubeExplainer(adapter, method, (3, 4, 32, 32), layer="timesformer.encoder.layer.1", layout="tokens")
        tubes = exp(x, lambda _: targets).tubes
        assert tubes.shape == (2, 1, 4, 2, 2)
        np.testing.assert_allclose(tubes[:, 0].double().numpy(), expected[name], rtol=1e-4, atol=1e-6)
