"""Deletion / insertion protocols against Li et al.'s (WACV 2021) formulas, written out here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.oracles import li2021_by_hand
from pipeline.errors import ConfigError
from pipeline.explain.protocols import Li2021, Project, protocol_from, protocol_setting


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 5),
    )
    with torch.no_grad():
        net[-1].weight.mul_(8)  # probabilities well away from uniform, so the curves move
    return net.eval()


@pytest.mark.parametrize("steps, cells", [(16, 4), (10, 4), (7, 2)])
def test_li2021_curves_and_aucs_equal_their_formulas_by_hand(steps, cells):
    net = tiny_net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 4, 24, 24, generator=gen)
    tubes = torch.rand(3, 4, 24, 24, generator=gen)
    targets = torch.tensor([0, 3, 1])
    protocol = Li2021(steps=steps, cells=cells)
    with torch.no_grad():
        deletion, insertion = protocol.curves(net, x, tubes, targets, chunk=5)
    assert deletion.shape == insertion.shape == (3, steps + 1)
    for i in range(3):
        ref = li2021_by_hand(net, x[i].numpy(), tubes[i].numpy(), int(targets[i]), cells, steps)
        np.testing.assert_allclose(deletion[i].numpy(), ref["deletion"][0], atol=2e-6)
        np.testing.assert_allclose(insertion[i].numpy(), ref["insertion"][0], atol=2e-6)
        assert float(protocol.auc(deletion)[i]) == pytest.approx(ref["deletion"][1], abs=2e-6)
        assert float(protocol.auc(insertion)[i]) == pytest.approx(ref["insertion"][1], abs=2e-6)


def test_li2021_ends_are_the_whole_clip_and_the_all_zero_clip():
    net = tiny_net(2)
    x = torch.randn(2, 3, 2, 16, 16)
    targets = torch.tensor([1, 4])
    with torch.no_grad():
        deletion, insertion = Li2021(steps=8, cells=4).curves(net, x, torch.rand(2, 2, 16, 16), targets)
        whole = net(x).softmax(1)[[0, 1], targets]
        zero = net(torch.zeros_like(x)).softmax(1)[[0, 1], targets]
    torch.testing.assert_close(deletion[:, 0], whole)
    torch.testing.assert_close(insertion[:, -1], whole)
    torch.testing.assert_close(deletion[:, -1], zero)
    torch.testing.assert_close(insertion[:, 0], zero)


def test_li2021_steps_are_the_floor_of_a_linspace_and_cells_block_means():
    protocol = Li2021(steps=10, cells=4)
    assert protocol.counts(48).tolist() == [i * 48 // 10 for i in range(11)]
    assert Li2021().counts(4096).tolist() == list(range(0, 4097, 32))  # 16 frames x 16 x 16 cells: 129 points
    tube = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    expected = tube.reshape(1, 2, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(protocol.cell_maps(tube), expected)
    # a whole cell of one value outranks every other: ranks count cells, not voxels
    tube = torch.zeros(1, 2, 8, 8)
    tube[0, 1, 2:4, 6:8] = 1.0
    assert int(protocol.ranks(tube)[0].reshape(2, 4, 4)[1, 1, 3]) == 0
    # an input size that is not a multiple of the cells: adaptive pooling keeps every pixel in a cell
    assert Li2021(cells=3).cell_maps(torch.ones(1, 2, 10, 10)).shape == (1, 2, 3, 3)


def test_li2021_random_tubes_order_the_cells_uniformly_at_random():
    protocol = Li2021(steps=4, cells=4)
    gen = torch.Generator().manual_seed(0)
    native = torch.zeros(1, 1, 2, 2)
    firsts = np.zeros(2 * 16)
    for _ in range(640):
        random = protocol.random_tubes(native, (2, 16, 16), gen)
        assert random.shape == (1, 2, 16, 16)
        firsts[int(protocol.ranks(random)[0].argmin())] += 1
    # every one of the 32 cells comes first about 20 times in 640 draws (uniform: chi-square with 31 dof)
    chi2 = ((firsts - 20) ** 2 / 20).sum()
    assert firsts.min() > 0 and chi2 < 70


def test_project_protocol_is_the_faithfulness_module():
    from pipeline.explain import faithfulness as fm

    curves = torch.tensor([[1.0, 0.5, 0.25]])
    assert float(Project.auc(curves)[0]) == pytest.approx(float(fm.curve_auc(curves)[0]))
    # the normalised trapezoid equals the trapezoid over [0, 1]
    assert float(Li2021.auc(curves)[0]) == pytest.approx((1.75 - 0.5 - 0.125) / 2)


def _ev(**values):
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {"protocol": "project", "steps": None, "cells": None, "baseline": "blur", "blur_sigma": 5.0, **values}
    )


def test_settings_take_the_protocols_defaults():
    assert protocol_setting(_ev()) == ("project", 10, None)
    assert protocol_setting(_ev(protocol="li2021")) == ("li2021", 128, 16)
    assert protocol_from(_ev(protocol="li2021", steps=64, cells=8)) == Li2021(steps=64, cells=8)
    assert protocol_from(_ev(steps=4)) == Project(steps=4)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(protocol="petsiuk"), "evaluate.protocol must be one of"),
        (dict(cells=16), "evaluate.cells applies to evaluate.protocol=li2021 only"),
        (dict(protocol="li2021", cells=0), "evaluate.cells must be >= 1"),
        (dict(protocol="li2021", steps=0), "evaluate.steps must be >= 1"),
    ],
)
def test_bad_protocol_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        protocol_setting(_ev(**values))
