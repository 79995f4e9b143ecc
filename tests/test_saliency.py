"""The CAM family against independent computations: a hand-written CAM and Captum's LayerGradCam."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.methods import CAM, GradCAM
from pipeline.explain.upsample import upsample
from pipeline.models import DemoNet3D, ModelError, find_classifier, find_layer, load_checkpoint

SHAPE = (3, 8, 64, 64)


@pytest.fixture
def net() -> DemoNet3D:
    torch.manual_seed(1)
    model = DemoNet3D(num_classes=5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.fixture
def clips() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(3, *SHAPE)


def by_pred(logits):
    return logits.argmax(1, keepdim=True)


def test_default_layer_and_classifier(net):
    assert find_layer(net, SHAPE) == "features"
    assert find_classifier(net) == "fc"


def test_cam_equals_hand_computation(net, clips):
    explainer = TubeExplainer(copy.deepcopy(net), CAM(), SHAPE)
    out = explainer(clips, lambda logits: logits.topk(2, dim=1).indices)
    with torch.no_grad():
        feats = net.features(clips)  # (N, C, t, h, w), computed without the explainer's hooks
        logits = net(clips)
    assert out.tubes.shape == (3, 2, *feats.shape[2:])
    for n in range(3):
        for j, k in enumerate(logits[n].topk(2).indices.tolist()):
            expected = torch.zeros(feats.shape[2:])
            for c in range(feats.shape[1]):
                expected += net.fc.weight[k, c] * feats[n, c]
            torch.testing.assert_close(out.tubes[n, j], expected, rtol=1e-5, atol=1e-5)
    # for average pooling + linear, the tube's mean plus the bias is the target's logit
    mean = out.tubes.mean(dim=(2, 3, 4)) + net.fc.bias[out.targets]
    torch.testing.assert_close(mean, logits.gather(1, out.targets), rtol=1e-4, atol=1e-4)


def test_gradcam_matches_captum(net, clips):
    explainer = TubeExplainer(copy.deepcopy(net), GradCAM(), SHAPE)
    ours = explainer(clips, by_pred)
    reference = LayerGradCam(net, net.features)
    theirs = reference.attribute(clips, target=ours.targets[:, 0], relu_attributions=True)
    theirs = LayerAttribution.interpolate(theirs, SHAPE[1:], interpolate_mode="trilinear")[:, 0]
    mine = upsample(ours.tubes[:, 0], SHAPE[1:])

    def normalise(v):
        return v / v.flatten(1).amax(1).clamp(min=1e-12)[:, None, None, None]

    assert mine.shape == theirs.shape == (3, *SHAPE[1:])
    assert (mine.flatten(1).amax(1) > 0).all()
    torch.testing.assert_close(normalise(mine), normalise(theirs.detach()), rtol=0, atol=1e-4)


def test_gradcam_topk_equals_one_target_at_a_time(net, clips):
    explainer = TubeExplainer(net, GradCAM(), SHAPE)
    both = explainer(clips, lambda logits: logits.topk(2, dim=1).indices)
    for j in range(2):
        single = explainer(clips, lambda logits, j=j: logits.topk(2, dim=1).indices[:, j : j + 1])
        torch.testing.assert_close(both.tubes[:, j], single.tubes[:, 0], rtol=1e-5, atol=1e-6)


def test_gradcam_records_no_graph_below_the_layer(net, clips):
    """Autograd must save tensors only for the head (pool + linear), not for the conv trunk."""
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    explainer = TubeExplainer(net, GradCAM(), SHAPE)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        explainer(clips, by_pred)
    assert 0 < len(saved) <= 4, saved
    assert all(p.grad is None for p in net.parameters())

    saved.clear()  # the naive way (a graph through the whole model) saves far more
    full = copy.deepcopy(net).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full(clips).max(1).values.sum()
    assert len(saved) > 10


def test_cam_refused_without_linear_head_over_layer(net):
    with pytest.raises(ModelError, match="features.block2.*channels|channels"):
        TubeExplainer(net, CAM(), SHAPE, layer="features.block2")

    class ConvHead(nn.Module):
        def __init__(self, kernel):
            super().__init__()
            self.features = nn.Conv3d(3, 4, 3, padding=1)
            self.head = nn.Conv3d(4, 5, kernel, padding=kernel // 2)

        def forward(self, x):
            return self.head(self.features(x)).mean(dim=(2, 3, 4))

    with pytest.raises(ModelError, match="1x1x1 convolution.*'head' is a Conv3d"):
        TubeExplainer(ConvHead(3).eval(), CAM(), SHAPE, classifier="head")
    # gradient methods do not need a linear head
    out = TubeExplainer(ConvHead(3).eval(), GradCAM(), SHAPE, layer="features")(torch.randn(1, *SHAPE), by_pred)
    assert out.tubes.shape == (1, 1, *SHAPE[1:])


def test_cam_with_a_1x1x1_convolution_head():
    """A 1x1x1 convolution before averaging (S3D's head) is linear over channels: the tube's mean plus the bias
    is the logit."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 5, 1), nn.AdaptiveAvgPool3d(1), nn.Flatten()
    ).eval()
    x = torch.randn(2, *SHAPE)
    out = TubeExplainer(net, CAM(), SHAPE, layer="1")(x, by_pred)
    with torch.no_grad():
        logits = net(x)
    bias = net[2].bias[out.targets]
    torch.testing.assert_close(
        out.tubes.mean(dim=(2, 3, 4)) + bias, logits.gather(1, out.targets), rtol=1e-4, atol=1e-5
    )


def test_unknown_layer_lists_candidates(net):
    with pytest.raises(ModelError, match=r"model.layer='features.block9'.*candidates"):
        TubeExplainer(net, GradCAM(), SHAPE, layer="features.block9")


@pytest.mark.parametrize("prefix,wrap", [("", False), ("net.", True), ("module.", False), ("model.module.", True)])
def test_checkpoint_formats(tmp_path, net, prefix, wrap):
    state = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state} if wrap else state, tmp_path / "w.pt")
    fresh = DemoNet3D(num_classes=5)
    load_checkpoint(fresh, tmp_path / "w.pt")
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_checkpoint_mismatch_names_keys(tmp_path, net):
    state = net.state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelError, match=r"missing keys \['fc.bias'\].*unexpected keys \['extra.weight'\]"):
        load_checkpoint(DemoNet3D(num_classes=5), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(DemoNet3D(num_classes=5), tmp_path / "missing.pt")


def test_layer_followed_by_an_in_place_op(net, clips):
    """features.block3.1 (BatchNorm) is followed by ReLU(inplace=True): the tube uses the BN output."""
    with torch.no_grad():
        bn_out = net.features.block3[1](net.features.block3[0](net.features.block2(net.features.block1(clips))))
    explainer = TubeExplainer(net, GradCAM(), SHAPE, layer="features.block3.1")
    out = explainer(clips, by_pred)  # must not raise on the in-place ReLU
    assert out.tubes.shape == (3, 1, *bn_out.shape[2:]) and (out.tubes >= 0).all()
    captured = explainer._capture(clips, cut=False)[1][0].tensor
    assert captured.min() < 0  # pre-ReLU values were kept
    torch.testing.assert_close(captured, bn_out)
