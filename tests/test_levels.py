"""Automatic fusion layers (``method.layers: auto``): the resolution levels of real zoo networks, checked against
their architectures by hand, the fusion they give equal to the same layers named by hand, and a clear refusal
for a network with a single level."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers.zoo import zoo_model
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.fusion import Combiner
from pipeline.explain.levels import choose_layers, find_levels
from pipeline.explain.methods import GradCAM, LayerCAM
from pipeline.models import ModelError

#: model -> (clip, {level grid: the layer that represents it}, the layers fused), worked out from the source:
CASES = {
    # r3d_18: stem (1,2,2) + layer1 keep 8x16x16; layer2..4 each halve t, h and w
    "r3d_18": (
        (8, 32, 32),
        {(8, 16, 16): "layer1", (4, 8, 8): "layer2", (2, 4, 4): "layer3", (1, 2, 2): "layer4"},
        ["layer2", "layer3", "layer4"],
    ),
    # S3D: features.0 (spatial conv stride 2 -> 16x32x32, then temporal stride 2) -> 8x32x32; pools 1 and 4 halve
    # h, w;
    # pool 7 (3x3x3, stride 2) and pool 13 (2x2x2, stride 2) halve every axis; the last level ends the trunk
    "s3d": (
        (16, 64, 64),
        {
            (16, 32, 32): "features.0.0",
            (8, 32, 32): "features.0",
            (8, 16, 16): "features.3",
            (8, 8, 8): "features.6",
            (4, 4, 4): "features.12",
            (2, 2, 2): "features",
        },
        ["features.6", "features.12", "features"],
    ),
    # the demo network: block1 (1,2,2), block2 (2,2,2), block3 keeps block2's grid: one level, ended by features
    # r2plus1d_18: each stage's first (2+1)D convolution halves h, w (a step inside it), then t
    "r2plus1d_18": (
        (8, 32, 32),
        {(8, 16, 16): "layer1", (4, 8, 8): "layer2", (2, 4, 4): "layer3", (1, 2, 2): "layer4"},
        ["layer2", "layer3", "layer4"],
    ),
    "demo": ((8, 64, 64), {(8, 32, 32): "features.block1", (4, 16, 16): "features"}, ["features.block1", "features"]),
}


#: the same for torchvision's own transformer classes in the reduced builds of test_models (fast) and at full size
SWIN_LEVELS = {(4, 16, 16): "features.0", (4, 8, 8): "features.2", (4, 4, 4): "features.4", (4, 2, 2): "norm"}
CASES["swin3d_small"] = ((8, 64, 64), SWIN_LEVELS, ["features.2", "features.4", "norm"])
# reduced MViT-v2: blocks 1 and 3 pool queries; blocks.3 (the last block) carries no evidence: two levels left
CASES["mvit_v2_small"] = (
    (8, 32, 32),
    {(4, 8, 8): "blocks.0", (4, 4, 4): "blocks.2", (4, 2, 2): None},
    ["blocks.0", "blocks.2"],
)
CASES.update(
    # Swin3D-T: 2x4x4 patches; features.1/3/5 merge patches (h, w halve); the final norm ends the last level
    swin3d_t=(
        (8, 64, 64),
        {(4, 16, 16): "features.0", (4, 8, 8): "features.2", (4, 4, 4): "features.4", (4, 2, 2): "norm"},
        ["features.2", "features.4", "norm"],
    ),
    # MViT-v2-S: 3x7x7 patches, stride 2x4x4; blocks 1, 3 and 14 pool queries (h, w halve); the head reads the
    # class token, so blocks.15's patch tokens carry no evidence and blocks.14 represents the last level
    mvit_v2_s=(
        (8, 64, 64),
        {(4, 16, 16): "blocks.0", (4, 8, 8): "blocks.2", (4, 4, 4): "blocks.13", (4, 2, 2): "blocks.14"},
        ["blocks.2", "blocks.13", "blocks.14"],
    ),
)
FULL = ["swin3d_t", "mvit_v2_s"]


@pytest.mark.parametrize(
    "name", [n for n in CASES if n not in FULL] + [pytest.param(n, marks=pytest.mark.slow) for n in FULL]
)
def test_levels_of_the_zoo_match_the_architectures(name):
    clip, levels, chosen = CASES[name]
    cfg, net = zoo_model(name, clip)
    found = find_levels(net, (3, *clip), cfg.layout)
    assert {level.grid: level.layer for level in found} == levels
    assert choose_layers(net, (3, *clip), cfg.layout, 3) == chosen
    if name.startswith("mvit"):
        assert found[-1].modules[-1] == f"blocks.{len(net.blocks) - 1}"  # a map of the level, without evidence


@pytest.mark.parametrize("name", ["r3d_18", "mvit_v2_small"])
def test_auto_fusion_equals_the_same_layers_named_by_hand(name):
    clip, _, chosen = CASES[name]
    cfg, net = zoo_model(name, clip)
    rule = Combiner("weighted")
    auto = TubeExplainer(
        copy.deepcopy(net), LayerCAM(), (3, *clip), layer="auto", layout=cfg.layout, combiner=rule, levels=3
    )
    named = TubeExplainer(copy.deepcopy(net), LayerCAM(), (3, *clip), layer=chosen, layout=cfg.layout, combiner=rule)
    assert auto.layer_names == chosen and auto.layer_name == "+".join(chosen)
    torch.manual_seed(2)
    x = torch.randn(2, 3, *clip)
    a = auto(x, lambda logits: logits.topk(2, dim=1).indices)
    b = named(x, lambda logits: logits.topk(2, dim=1).indices)
    torch.testing.assert_close(a.tubes, b.tubes, rtol=0, atol=0)
    assert [t.shape[2:] for t in a.layer_tubes] == [t.shape[2:] for t in b.layer_tubes]
    for mine, theirs in zip(a.layer_tubes, b.layer_tubes):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert torch.equal(rule(a.layer_tubes), a.tubes)


def test_levels_setting_picks_more_or_fewer_levels():
    clip, _, _ = CASES["r3d_18"]
    cfg, net = zoo_model("r3d_18", clip)
    two = TubeExplainer(net, GradCAM(), (3, *clip), layer="auto", combiner=Combiner("max"), levels=2)
    assert two.layer_names == ["layer3", "layer4"]
    assert choose_layers(net, (3, *clip), "ncthw", count=9) == ["layer1", "layer2", "layer3", "layer4"]


def test_a_model_with_one_level_gets_one_clear_message():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    with pytest.raises(
        ModelError,
        match=r"Sequential has 1 resolution level.*8x16x16.*\(maps found: 2 8x16x16\).*"
        r"single-layer method .*or name method.layers",
    ):
        TubeExplainer(net, GradCAM(), (3, 8, 16, 16), layer="auto", combiner=Combiner("mean"), levels=3)
