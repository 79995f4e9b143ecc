"""Faithfulness metrics against hand computations on constructed tubes and a model whose output is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.explain import faithfulness as fm


class SumModel(torch.nn.Module):
    """Two logits: ``[w . x, 0]``, so the first class's probability is ``sigmoid(w . x)``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight.flatten()

    def forward(self, x):
        first = (x.reshape(x.shape[0], -1) * self.weight).sum(1)
        return torch.stack([first, torch.zeros_like(first)], 1)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_saliency_order_ranks_voxels_from_the_most_salient():
    tube = torch.tensor([3.0, 1.0, 2.0, 5.0]).reshape(1, 1, 1, 4)
    assert fm.saliency_order(tube).tolist() == [[1, 3, 2, 0]]


def test_ties_are_broken_at_random_not_in_raster_order():
    tube = torch.zeros(1, 1, 1, 64)
    firsts = {int(fm.saliency_order(tube, torch.Generator().manual_seed(s))[0].argmin()) for s in range(10)}
    assert len(firsts) > 5


def test_deletion_and_insertion_curves_match_a_hand_computation():
    # one channel, 4 voxels with values 1..4; the model weighs them 1, 0, 2, 0; baseline 0
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 1, 4)
    model = SumModel(torch.tensor([1.0, 0.0, 2.0, 0.0]))
    tube = torch.tensor([0.5, 0.1, 0.9, 0.2]).reshape(1, 1, 1, 4)  # order: voxel 2, 0, 3, 1
    ranks = fm.saliency_order(tube)
    deletion, insertion = fm.perturbation_curves(model, x, torch.zeros_like(x), ranks, torch.tensor([0]), steps=4)
    # deletion removes voxel 2 (w.x: 7 -> 1), then 0 (-> 0), then 3 and 1 (no weight)
    expected_del = [sigmoid(v) for v in (7, 1, 0, 0, 0)]
    expected_ins = [sigmoid(v) for v in (0, 6, 7, 7, 7)]
    np.testing.assert_allclose(deletion[0].numpy(), expected_del, rtol=1e-6)
    np.testing.assert_allclose(insertion[0].numpy(), expected_ins, rtol=1e-6)
    trapezoid = lambda ys: sum((a + b) / 2 for a, b in zip(ys, ys[1:])) / (len(ys) - 1)
    assert float(fm.curve_auc(deletion)[0]) == pytest.approx(trapezoid(expected_del), rel=1e-6)
    assert float(fm.curve_auc(insertion)[0]) == pytest.approx(trapezoid(expected_ins), rel=1e-6)


def test_curves_in_small_chunks_equal_one_pass():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 2, 3, 3)
    model = SumModel(torch.randn(2 * 2 * 3 * 3) * 0.3)
    ranks = fm.saliency_order(torch.rand(3, 2, 3, 3))
    targets = torch.tensor([0, 1, 0])
    one = fm.perturbation_curves(model, x, fm.baseline_clip(x, "mean"), ranks, targets, steps=6)
    small = fm.perturbation_curves(model, x, fm.baseline_clip(x, "mean"), ranks, targets, steps=6, chunk=5)
    for a, b in zip(one, small):
        torch.testing.assert_close(a, b)
    # endpoints: the clip itself and the baseline, whatever the order
    full = model(x).softmax(1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(one[0][:, 0], full)
    torch.testing.assert_close(one[1][:, -1], full)


def test_auc_of_constant_and_linear_curves():
    assert fm.curve_auc(torch.full((1, 11), 0.3))[0].item() == pytest.approx(0.3)
    assert fm.curve_auc(torch.linspace(0, 1, 11)[None])[0].item() == pytest.approx(0.5)


def test_baselines():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 20, 24)
    mean = fm.baseline_clip(x, "mean")
    torch.testing.assert_close(mean[:, :, 1, 5, 7], x.mean(dim=(2, 3, 4)))
    constant = torch.full((1, 3, 2, 20, 24), 0.7)
    torch.testing.assert_close(fm.baseline_clip(constant, "blur", 3.0), constant)
    blurred = fm.baseline_clip(x, "blur", 3.0)
    assert blurred.shape == x.shape and blurred.std() < 0.5 * x.std()
    torch.testing.assert_close(blurred[:, :, 2], fm.baseline_clip(x[:, :, 2:3], "blur", 3.0)[:, :, 0])  # frame by frame
    with pytest.raises(ValueError, match="evaluate.baseline"):
        fm.baseline_clip(x, "zeros")


def test_spearman_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 60)).astype(np.float32)
    b = a + rng.normal(0, 2, size=a.shape).astype(np.float32)
    ours = fm.spearman(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    theirs = [spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert fm.spearman(torch.from_numpy(a[:1]), torch.from_numpy(-a[:1]))[0].item() == pytest.approx(-1.0)
    assert math.isnan(fm.spearman(torch.ones(1, 5), torch.rand(1, 5))[0].item())


def test_box_masks_and_tube_iou():
    # the model saw source pixels [10, 50) x [0, 40) as a 4 x 4 input: one input pixel = 10 source pixels
    crop = torch.tensor([[10.0, 0.0, 50.0, 40.0]])
    boxes = torch.tensor([[[10.0, 0.0, 30.0, 20.0], [float("nan")] * 4]])  # time step 0: the top-left 2 x 2
    has_box = ~torch.isnan(boxes).any(2)
    masks = fm.box_masks(torch.nan_to_num(boxes), crop, (4, 4))
    assert masks[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    tube = torch.zeros(1, 2, 4, 4)
    tube[0, 0, :2, :2] = 1.0
    assert fm.tube_iou(tube, masks, has_box)[0].item() == pytest.approx(1.0)
    tube[0, 0, :2, 2] = 1.0  # 6 salient pixels, 4 in the box
    assert fm.tube_iou(tube, masks, has_box)[0].item() == pytest.approx(4 / 6)
    tube[0, 1] = 5.0  # the step without a box does not count, but its peak sets the level: nothing else is salient
    assert fm.tube_iou(tube, masks, has_box)[0].item() == pytest.approx(0.0)
    assert math.isnan(fm.tube_iou(tube, masks, torch.zeros_like(has_box))[0].item())
