import pytest
import torch
import torch.nn.functional as F

from pipeline.explain.upsample import upsample

SHAPES = [
    ((8, 16, 7, 7), (16, 112, 112)),  # the extractor's: only space grows
    ((3, 2, 7, 7), (16, 112, 112)),
    ((2, 4, 16, 16), (8, 64, 64)),
    ((5, 3, 5, 6), (7, 50, 33)),  # sizes that do not divide
    ((2, 5, 9, 9), (3, 4, 4)),  # shrinking
    ((1, 1, 1, 1), (4, 5, 6)),
    ((2, 8, 7, 7), (8, 7, 7)),  # nothing to do
]


def interpolate(tubes, size):
    """The straightforward formula: F.interpolate, trilinear, align_corners=False."""
    flat = tubes.reshape(-1, 1, *tubes.shape[-3:]).float()
    out = F.interpolate(flat, size=size, mode="trilinear", align_corners=False)
    return out.reshape(*tubes.shape[:-3], *size)


@pytest.mark.parametrize("shape, size", SHAPES)
def test_equals_f_interpolate_to_float_rounding(shape, size):
    tubes = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got, expected = upsample(tubes, size), interpolate(tubes, size)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("shape, size", SHAPES)
def test_a_tube_upsamples_the_same_alone_as_in_a_batch(shape, size):
    """read_tubes upsamples rows in batches of its own; the extractor's statistics saw the same numbers."""
    tubes = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    batch = upsample(tubes, size)
    for i in range(shape[0]):
        assert torch.equal(upsample(tubes[i], size), batch[i])


def test_leading_dims_and_half_input():
    tubes = torch.rand(2, 3, 4, 5, 6)
    out = upsample(tubes.half(), (8, 10, 12))
    assert out.shape == (2, 3, 8, 10, 12) and out.dtype == torch.float32
    assert torch.equal(out, upsample(tubes.half().float(), (8, 10, 12)))


def test_gradients_after_a_first_call_under_inference_mode():
    """The cached interpolation matrices are plain tensors, so a later call can be differentiated."""
    with torch.inference_mode():
        upsample(torch.rand(1, 3, 4, 4), (6, 9, 11))
    tubes = torch.rand(1, 3, 4, 4, requires_grad=True)
    upsample(tubes, (6, 9, 11)).sum().backward()
    expected = torch.rand(1, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        expected.copy_(tubes)
    interpolate(expected, (6, 9, 11)).sum().backward()
    torch.testing.assert_close(tubes.grad, expected.grad)
