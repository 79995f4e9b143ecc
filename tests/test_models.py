"""The model zoo: every model, built from its own conf/model/<name>.yaml (small clips, random weights), runs
every applicable method, and each tube matches the method's formula on independently captured activations."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models.video as tv
from omegaconf import OmegaConf
from torch import nn

from helpers.config import make_cfg
from helpers.oracles import assert_tubes_close, oracle_scorecam, oracle_tubes, reference_evidence, to_ncthw
from helpers.zoo import CLIP, CLIPS, SMALL, zoo_model
from pipeline.explain.explainer import TubeExplainer, classifier_weight
from pipeline.explain.fusion import Combiner, Fusion
from pipeline.explain.methods import (
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pipeline.models import ModelError, build_model, load_checkpoint
from pipeline.models.mfnet import MFNet3D
from pipeline.models.zoo import mvit

#: the configs users get; the transformers at full width run in the slow tests
ZOO = ["r3d_18", "s3d", "mfnet3d", "demo"]
#: the same torchvision VideoResNet code path as r3d_18 with other blocks: slow tests
MORE_RESNETS = ["mc3_18", "r2plus1d_18"]
FULL_TRANSFORMERS = ["mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b"]
METHODS = {"cam": CAM, "gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM}
TOKEN_MODELS = {"mvit_v1_b", "mvit_v2_s", "mvit_v1_small", "mvit_v2_small"}  # classify the class token: no cam


def explain_and_reference(name, method, clip=None, n=2, k=2):
    clip = clip or CLIPS.get(name, CLIP)
    cfg, net = zoo_model(name, clip)
    shape = (3, *clip)
    explainer = TubeExplainer(
        copy.deepcopy(net), method, shape, layer=cfg.layer, classifier=cfg.classifier, layout=cfg.layout
    )
    torch.manual_seed(1)
    x = torch.randn(n, *shape)
    out = explainer(x, lambda logits: logits.topk(k, dim=1).indices)
    acts, grads, logits = reference_evidence(
        net, net.get_submodule(explainer.layer_names[0]), x, out.targets, cfg.layout
    )
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)
    return cfg, net, explainer, x, out, acts, grads


@pytest.mark.parametrize(
    "name", ZOO + SMALL + [pytest.param(name, marks=pytest.mark.slow) for name in MORE_RESNETS + FULL_TRANSFORMERS]
)
def test_every_model_runs_every_method(name):
    """One explainer per model (the method swapped between runs; cam gets its own, it resolves the classifier),
    the reference evidence captured once for the same targets."""
    cfg, net = zoo_model(name)
    clip = CLIPS.get(name, CLIP)
    torch.manual_seed(1)
    x = torch.randn(1, 3, *clip)
    with torch.no_grad():
        targets = net(x).topk(2, dim=1).indices
    explainer = TubeExplainer(net, GradCAM(), (3, *clip), layer=cfg.layer, layout=cfg.layout)
    acts, grads, _ = reference_evidence(net, net.get_submodule(explainer.layer_names[0]), x, targets, cfg.layout)
    for method, cls in METHODS.items():
        weight = None
        if method == "cam":
            if name in TOKEN_MODELS:
                continue
            cam = TubeExplainer(net, CAM(), (3, *clip), layer=cfg.layer, classifier=cfg.classifier, layout=cfg.layout)
            weight = classifier_weight(cam.classifier, cfg.classifier).double().detach().numpy()
            out = cam(x, lambda logits: targets)
        else:
            explainer.method = cls()
            out = explainer(x, lambda logits: targets)
        assert out.tubes.shape == (1, 2, *acts.shape[2:]), method
        assert_tubes_close(out.tubes, oracle_tubes(method, acts, grads, targets, weight))


@pytest.mark.parametrize("name", ["mvit_v1_small", "mvit_v2_small"])
def test_cam_refused_on_class_token_models(name):
    cfg, net = zoo_model(name)
    with pytest.raises(ModelError, match="class token.*gradient method"):
        TubeExplainer(net, CAM(), (3, *CLIP), layer=cfg.layer, classifier=cfg.classifier, layout=cfg.layout)


@pytest.mark.parametrize("name", ["mvit_v2_small", "swin3d_small", "r3d_18"])
def test_fusion_of_the_last_two_stages(name):
    """Each layer is read in its own geometry (MViT's token grid shrinks between the two stages)."""
    cfg, net = zoo_model(name)
    clip = CLIPS.get(name, CLIP)
    layers, rule = list(cfg.fusion_layers), Combiner("product")
    explainer = TubeExplainer(copy.deepcopy(net), GradCAM(), (3, *clip), layer=layers, layout=cfg.layout, combiner=rule)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *clip)
    out = explainer(x, lambda logits: logits.topk(2, dim=1).indices)
    per_layer = [
        reference_evidence(net, net.get_submodule(layer), x, out.targets, cfg.layout) for layer in cfg.fusion_layers
    ]
    tubes = [torch.from_numpy(oracle_tubes("gradcam", a, g, out.targets)) for a, g, _ in per_layer]
    assert tubes[0].shape[2:].numel() > tubes[1].shape[2:].numel(), "the two stages should differ in resolution"
    size = tubes[0].shape[2:]
    fine = tubes[0] / tubes[0].flatten(2).amax(2).clamp(min=1e-12)[..., None, None, None]
    coarse = torch.nn.functional.interpolate(
        tubes[1].reshape(4, 1, *tubes[1].shape[2:]), size=size, mode="trilinear", align_corners=False
    ).reshape(2, 2, *size)
    coarse = coarse / coarse.flatten(2).amax(2).clamp(min=1e-12)[..., None, None, None]
    fused = fine * coarse
    fused = fused / fused.flatten(2).amax(2).clamp(min=1e-12)[..., None, None, None]
    assert out.tubes.shape == (2, 2, *size)
    assert_tubes_close(out.tubes, fused.numpy())


def test_token_layout_reads_each_blocks_grid():
    """MViT's blocks pool tokens: their outputs have different (t, h, w), read from each call."""
    _, net = zoo_model("mvit_v2_small")
    grids = {}
    handles = [
        net.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: grids.__setitem__(name, tuple(out[1]))
        )
        for name in ("blocks.0", "blocks.1", "blocks.3")
    ]
    with torch.no_grad():
        net(torch.zeros(1, 3, *CLIP))
    for handle in handles:
        handle.remove()
    assert len(set(grids.values())) == 3, grids
    for name, grid in grids.items():
        explainer = TubeExplainer(copy.deepcopy(net), GradCAM(), (3, *CLIP), layer=name, layout="tokens")
        assert (
            explainer(torch.randn(1, 3, *CLIP), lambda logits: logits.argmax(1, keepdim=True)).tubes.shape[2:] == grid
        )


@pytest.mark.slow
def test_mvit_builder_keeps_torchvision_architecture():
    """At the default clip size the zoo's MViT is torchvision's, parameter for parameter."""
    ours, theirs = mvit("mvit_v1_b", num_classes=7), tv.mvit_v1_b(num_classes=7)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    small = mvit("mvit_v1_b", num_classes=7, clip_len=8, size=(64, 64))
    assert small.pos_encoding.spatial_pos.shape[0] == 16 * 16 and small.pos_encoding.temporal_pos.shape[0] == 4
    with pytest.raises(ModelError, match="arch"):
        mvit("mvit_v3", num_classes=7)


def test_layout_errors_name_the_layer():
    _, net = zoo_model("mvit_v2_small")
    shape = (3, *CLIP)
    with pytest.raises(ModelError, match=r"blocks.2.*not a 5-D map"):
        TubeExplainer(copy.deepcopy(net), GradCAM(), shape, layer="blocks.2", layout="ncthw")
    with pytest.raises(ModelError, match=r"'norm'.*17 tokens without a \(t, h, w\) grid; set model.grid"):
        TubeExplainer(copy.deepcopy(net), GradCAM(), shape, layer="norm", layout="tokens")
    with pytest.raises(ModelError, match="model.layout must be one of"):
        TubeExplainer(copy.deepcopy(net), GradCAM(), shape, layer="blocks.2", layout="nchw")


def test_mfnet_loads_a_dataparallel_checkpoint(tmp_path):
    torch.manual_seed(4)
    trained = MFNet3D(num_classes=6).eval()
    for module in trained.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
    wrapped = nn.DataParallel(trained)  # the authors saved their models wrapped: keys start with "module."
    torch.save({"epoch": 10, "state_dict": wrapped.state_dict()}, tmp_path / "mfnet.pth")
    assert next(iter(wrapped.state_dict())).startswith("module.")
    fresh = MFNet3D(num_classes=6).eval()
    load_checkpoint(fresh, tmp_path / "mfnet.pth")
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)

    state = {k: v for k, v in wrapped.state_dict().items() if "conv5.B03" not in k}
    state["module.classifier.weight"] = torch.zeros(10, 768)
    state["module.extra.bias"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(ModelError) as err:
        load_checkpoint(MFNet3D(num_classes=6), tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing keys ['conv5.B03.conv_i1.bn.bias'" in message and "in all)" in message
    assert "unexpected keys ['extra.bias']" in message
    assert "classifier.weight: (10, 768) in the file, (6, 768) in the model" in message


@pytest.mark.slow
def test_s3d_real_head_at_full_size():
    """S3D as shipped (2x7x7 average window, 1x1x1 conv classifier) on one 16 x 224 x 224 clip."""
    for method in ("cam", "gradcam"):
        cfg, net, explainer, _, out, acts, grads = explain_and_reference(
            "s3d", METHODS[method](), clip=(16, 224, 224), n=1, k=1
        )
        assert isinstance(net.avgpool, nn.AvgPool3d)
        weight = (
            classifier_weight(explainer.classifier, cfg.classifier).double().detach().numpy()
            if method == "cam"
            else None
        )
        assert_tubes_close(out.tubes, oracle_tubes(method, acts, grads, out.targets, weight))


@pytest.mark.parametrize("name", ["mvit_v1_small", "swin3d_small"])
def test_scorecam_on_the_zoo(name):
    cfg, net, explainer, x, out, acts, _ = explain_and_reference(name, ScoreCAM(batch_size=64), n=1, k=1)
    assert_tubes_close(out.tubes, oracle_scorecam(net, x, acts, out.targets))


def test_oracle_layouts_agree_with_hand_reshape():
    """The tests' own layout conversion, checked on a hand-made token tensor with a class token."""
    tokens = torch.arange(2 * (1 + 2 * 3 * 4) * 5, dtype=torch.float32).reshape(2, 25, 5)
    out = to_ncthw((tokens, (2, 3, 4)), "tokens")
    assert out.shape == (2, 5, 2, 3, 4)
    assert out[1, 4, 1, 2, 3] == tokens[1, 1 + 1 * 12 + 2 * 4 + 3, 4]


def test_method_configs_instantiate(tmp_path):
    from hydra.utils import instantiate

    default = instantiate(make_cfg(tmp_path, ["model=r3d_18", "method=fusion"]).method)
    assert (default.layers, default.levels, default.combiner) == ("auto", 3, Combiner("weighted"))
    assert isinstance(default.method, LayerCAM)
    overrides = ["model=r3d_18", "method=fusion", "method.combine=max", "method.layers=${model.fusion_layers}"]
    fusion = instantiate(make_cfg(tmp_path, overrides).method)
    assert isinstance(fusion, Fusion) and fusion.layers == ["layer3", "layer4"] and fusion.combine == "max"
    gradcam = instantiate(
        make_cfg(
            tmp_path,
            [
                "model=mvit_v2_s",
                "method=fusion",
                "method.method._target_=pipeline.explain.methods.GradCAM",
                "method.layers=${model.fusion_layers}",
            ],
        ).method
    )
    assert isinstance(gradcam.method, GradCAM) and gradcam.layers == ["blocks.13", "blocks.14"]
    assert instantiate(make_cfg(tmp_path, ["method=scorecam", "method.batch_size=5"]).method).batch_size == 5
    with pytest.raises(Exception, match="at least two layers"):
        instantiate(
            make_cfg(
                tmp_path,
                ["model=custom", "model.net._target_=x.Y", "method=fusion", "method.layers=${model.fusion_layers}"],
            ).method
        )


def test_random_weights_are_the_same_network_in_every_process(tmp_path):
    """Without a checkpoint every worker, rank and resumed run must build one network: seeded by init_seed."""
    cfg = make_cfg(tmp_path, ["model.checkpoint=null"]).model
    torch.manual_seed(123)  # the global generator must not matter, and must not be consumed
    before = torch.random.get_rng_state()
    first = build_model(cfg).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(456)
    second = build_model(cfg).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_model(OmegaConf.merge(OmegaConf.to_container(cfg), {"init_seed": 1})).state_dict()
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_random_weights_are_the_same_network_in_every_thread(tmp_path):
    """Worker threads (``cluster.processes=false``) share torch's default generator: four threads building the
    seeded network at once, or a network whose weights they load, still build the one network (74 of 80 builds
    differed before the builds took turns)."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = make_cfg(tmp_path, ["model.checkpoint=null"]).model
    reference = build_model(cfg).state_dict()
    checkpoint = tmp_path / "trained.pt"
    torch.save(reference, checkpoint)
    trained = OmegaConf.merge(OmegaConf.to_container(cfg), {"checkpoint": str(checkpoint)})
    with ThreadPoolExecutor(4) as pool:  # seeded builds among builds that load weights (whose init draws too)
        built = list(pool.map(lambda i: build_model(trained if i % 2 else cfg).state_dict(), range(40)))
    assert all(torch.equal(weights[k], reference[k]) for weights in built for k in reference)


def test_normalise_is_the_plain_formula_to_the_bit():
    """Normalise, into a new tensor or in place, gives the bits of (x - mean) / std that the stored tubes depend on."""
    from pipeline.models.inputs import Normalise

    mean, std = [0.43, 0.40, 0.37], [0.23, 0.22, 0.21]
    video = torch.rand(2, 3, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    expected = (video - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)
    before = video.clone()
    assert torch.equal(Normalise(mean, std)(video), expected)
    assert torch.equal(video, before)  # the clip itself is left alone
    out = Normalise(mean, std)(video, in_place=True)  # the extract stage's: into the batch's own clips
    assert out.data_ptr() == video.data_ptr() and torch.equal(out, expected)
