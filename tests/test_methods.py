"""Each method of the CAM family against its formula written out (tests/helpers/oracles.py) and against
pytorch-grad-cam; top-k sharing one pass, fusion, Score-CAM chunking, precision."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_grad_cam.base_cam as grad_cam_base
import torch
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam import LayerCAM as PgcLayerCAM
from pytorch_grad_cam import XGradCAM as PgcXGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from helpers.oracles import assert_tubes_close, oracle_scorecam, oracle_tube, oracle_tubes, reference_evidence
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.fusion import Combiner, Fusion
from pipeline.explain.methods import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, MethodError, ScoreCAM, XGradCAM
from pipeline.explain.upsample import upsample
from pipeline.models import DemoNet3D

SHAPE = (3, 8, 32, 32)
GRADIENT_METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM}
PEERS = {"gradcam": PgcGradCAM, "gradcampp": PgcGradCAMPlusPlus, "xgradcam": PgcXGradCAM, "layercam": PgcLayerCAM}


@pytest.fixture(scope="module")
def net() -> DemoNet3D:
    torch.manual_seed(1)
    model = DemoNet3D(num_classes=5, width=8)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(2, *SHAPE)


def top2(logits):
    return logits.topk(2, dim=1).indices


@pytest.mark.parametrize("name", ["cam", *GRADIENT_METHODS])
def test_method_matches_its_formula(net, clips, name):
    method = CAM() if name == "cam" else GRADIENT_METHODS[name]()
    out = TubeExplainer(copy.deepcopy(net), method, SHAPE)(clips, top2)
    acts, grads, _ = reference_evidence(net, net.features, clips, out.targets)
    assert out.tubes.dtype == torch.float32
    assert_tubes_close(out.tubes, oracle_tubes(name, acts, grads, out.targets, net.fc.weight.double().detach().numpy()))


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_gradient_methods_match_pytorch_grad_cam(net, clips, name, monkeypatch):
    """pytorch-grad-cam on the same 5-D layer, with its min-max scaling and resizing switched off (raw maps)."""
    monkeypatch.setattr(grad_cam_base, "scale_cam_image", lambda cam, target_size=None: cam)
    out = TubeExplainer(copy.deepcopy(net), GRADIENT_METHODS[name](), SHAPE)(
        clips, lambda logits: logits.argmin(1, keepdim=True)
    )
    peer_net = copy.deepcopy(net)
    with PEERS[name](model=peer_net, target_layers=[peer_net.features]) as peer:
        theirs = peer(input_tensor=clips.clone(), targets=[ClassifierOutputTarget(int(t)) for t in out.targets[:, 0]])
    assert_tubes_close(out.tubes, np.asarray(theirs, dtype=np.float64)[:, None])


@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "xgradcam"])
def test_per_slice_pooling_is_each_time_slice_on_its_own(net, clips, name):
    """``pool=hw`` (mmaction2, PySlowFast): the tube of time slice ``s`` is the method's formula on that slice's
    activations and gradients alone; for Grad-CAM, ``relu(sum_c mean_hw(g[c, s]) * A[c, s])`` written out."""
    # a layer below the last (there the gradient of a pooled linear head is constant, and the two pools agree)
    layer = "features.block1"
    out = TubeExplainer(copy.deepcopy(net), GRADIENT_METHODS[name](pool="hw"), SHAPE, layer=layer)(clips, top2)
    whole = TubeExplainer(copy.deepcopy(net), GRADIENT_METHODS[name](pool="thw"), SHAPE, layer=layer)(clips, top2)
    acts, grads, _ = reference_evidence(net, net.features.block1, clips, out.targets)
    n, k = out.targets.shape
    expected = np.zeros((n, k, *acts.shape[2:]))
    for i in range(n):
        for j in range(k):
            for s in range(acts.shape[2]):
                A, G = acts[i][:, s : s + 1], grads[i, j][:, s : s + 1]
                expected[i, j, s] = oracle_tube(name, A, G)[0]
                if name == "gradcam":
                    by_hand = np.maximum(np.einsum("c,chw->hw", G[:, 0].mean(axis=(1, 2)), A[:, 0]), 0)
                    np.testing.assert_allclose(expected[i, j, s], by_hand, atol=1e-12)
    assert acts.shape[2] > 1
    assert_tubes_close(out.tubes, expected)
    # the two conventions differ wherever the evidence changes over time
    assert (out.tubes - whole.tubes).abs().max() > 0.05 * whole.tubes.abs().max()


def test_pool_is_checked_and_refused_where_nothing_is_pooled():
    with pytest.raises(MethodError, match="method.pool must be one of"):
        GradCAM(pool="t")
    with pytest.raises(MethodError, match="does not apply to layercam"):
        LayerCAM(pool="hw")


def test_scorecam_matches_its_formula_in_any_chunking(net, clips):
    explainer = TubeExplainer(copy.deepcopy(net), ScoreCAM(batch_size=7), SHAPE)
    out = explainer(clips, top2)
    acts, _, _ = reference_evidence(net, net.features, clips, out.targets)
    expected = oracle_scorecam(net, clips, acts, out.targets)
    assert_tubes_close(out.tubes, expected)
    explainer.method.batch_size = 1000  # one chunk: the same tubes
    torch.testing.assert_close(explainer(clips, top2).tubes, out.tubes, rtol=1e-5, atol=1e-6)
    with pytest.raises(MethodError, match="batch_size"):
        ScoreCAM(batch_size=0)


def test_scorecam_memory_is_bounded_by_its_chunks(net, clips):
    """The largest masked batch the model sees is method.batch_size clips, whatever the channel count."""
    sizes = []
    explainer = TubeExplainer(copy.deepcopy(net), ScoreCAM(batch_size=5), SHAPE)
    handle = explainer.net.register_forward_pre_hook(lambda _m, inputs: sizes.append(inputs[0].shape[0]))
    explainer(clips, top2)
    handle.remove()
    assert max(sizes) == 5 and len(sizes) > 10


@pytest.mark.parametrize("name", list(GRADIENT_METHODS))
def test_topk_in_one_pass_equals_one_target_at_a_time(net, clips, name):
    explainer = TubeExplainer(copy.deepcopy(net), GRADIENT_METHODS[name](), SHAPE)
    three = explainer(clips, lambda logits: logits.topk(3, dim=1).indices)
    for j in range(3):
        single = explainer(clips, lambda logits, j=j: logits.topk(3, dim=1).indices[:, j : j + 1])
        torch.testing.assert_close(three.tubes[:, j], single.tubes[:, 0], rtol=1e-5, atol=1e-6)


def test_gradients_flow_only_above_the_layer(net, clips):
    """One backward for all k targets; autograd saves tensors only for the head, none in the trunk."""
    saved, calls = [], []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    explainer = TubeExplainer(copy.deepcopy(net), GradCAM(), SHAPE)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        torch.autograd.grad = counting
        try:
            explainer(clips, top2)
        finally:
            torch.autograd.grad = original
    assert calls == [True]
    assert 0 < len(saved) <= 4, saved
    assert all(p.grad is None and not p.requires_grad for p in explainer.net.parameters())


@pytest.mark.parametrize("combine", ["product", "weighted", "mean", "max"])
def test_fusion_of_two_layers(net, clips, combine):
    layers = ["features.block2", "features.block3"]
    explainer = TubeExplainer(copy.deepcopy(net), LayerCAM(), SHAPE, layer=layers, combiner=Combiner(combine))
    out = explainer(clips, top2)
    block2, block3 = (
        reference_evidence(net, net.features.get_submodule(name.split(".")[1]), clips, out.targets) for name in layers
    )
    fine, coarse = (
        oracle_tubes("layercam", *block2[:2], out.targets),
        oracle_tubes("layercam", *block3[:2], out.targets),
    )
    size = fine.shape[2:]
    coarse = upsample(torch.from_numpy(coarse), size).double().numpy()

    def unit(v):
        return v / np.maximum(v.reshape(*v.shape[:2], -1).max(-1)[..., None, None, None], 1e-12)

    fused = {
        "product": unit(fine) * unit(coarse),
        "weighted": unit(fine) * unit(coarse) ** 0.5,  # one grid: ranked in the order given
        "mean": (unit(fine) + unit(coarse)) / 2,
        "max": np.maximum(unit(fine), unit(coarse)),
    }[combine]
    assert out.tubes.shape == (2, 2, *size)
    assert_tubes_close(out.tubes, unit(fused))


def test_fusion_settings_are_checked():
    with pytest.raises(MethodError, match="at least two layers"):
        Fusion(GradCAM(), ["features"], "mean", 3)
    with pytest.raises(MethodError, match="method.combine must be one of product, weighted, mean, max; got 'median'"):
        Fusion(GradCAM(), ["a", "b"], "median", 3)
    with pytest.raises(MethodError, match="levels"):
        Fusion(GradCAM(), "auto", "mean", 1)
    with pytest.raises(MethodError, match="need a combine rule"):
        TubeExplainer(DemoNet3D(num_classes=4), GradCAM(), SHAPE, layer=["features.block2", "features.block3"])


def test_bf16_autocast_keeps_tube_math_in_fp32(net, clips):
    """The model runs in bf16 under autocast; tubes come out fp32 and close to the fp32 ones."""
    explainer = TubeExplainer(copy.deepcopy(net), GradCAM(), SHAPE)
    reference = explainer(clips, top2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = explainer(clips, lambda logits: reference.targets)
    assert low.tubes.dtype == torch.float32 and low.logits.dtype == torch.float32
    scale = reference.tubes.abs().amax()
    assert (low.tubes - reference.tubes).abs().max() / scale < 0.1
    assert not torch.equal(low.tubes, reference.tubes)  # the model really ran in bf16


def test_gradient_method_refused_under_inference_mode(net, clips):
    explainer = TubeExplainer(copy.deepcopy(net), GradCAM(), SHAPE)
    with torch.inference_mode(), pytest.raises(Exception, match="inference_mode"):
        explainer(clips, top2)


@pytest.mark.parametrize("name", ["gradcam", "cam"])
def test_lightning_bf16_mixed_predict(net, name):
    """Trainer(precision=bf16-mixed) on CPU: the model runs under autocast, tubes and statistics in fp32;
    gradient methods need inference_mode=False, cam runs under inference mode."""
    import pytorch_lightning as pl

    from pipeline.data.clips import ClipBatch
    from pipeline.runtime.module import TubeModule

    torch.manual_seed(5)
    batches = [
        ClipBatch(
            video=torch.rand(2, *SHAPE),
            positions=torch.arange(2) + 2 * i,
            failures=[],
            crop_box=torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2),
        )
        for i in range(2)
    ]
    method = GradCAM() if name == "gradcam" else CAM()
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        module = TubeModule(TubeExplainer(copy.deepcopy(net), method, SHAPE), [0.45] * 3, [0.225] * 3, codec="float32")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision=precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=not method.needs_grad,
        )
        out = trainer.predict(module, torch.utils.data.DataLoader(batches, batch_size=None))
        results[precision] = out
    for full, mixed in zip(results["32-true"], results["bf16-mixed"]):
        assert mixed.tubes.dtype == torch.float32
        same = (full.targets == mixed.targets).flatten()
        scale = full.tubes.abs().amax()
        assert scale > 0
        assert ((full.tubes[same] - mixed.tubes[same]).abs().max() / scale) < 0.1
        assert not torch.equal(full.tubes, mixed.tubes)  # the model really ran in bf16
