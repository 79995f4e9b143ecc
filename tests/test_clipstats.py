import math

import pytest
import torch

from pipeline.explain.clipstats import clip_statistics

T, H, W = 4, 5, 6
BOX = [16.0, 0.0, 112.0, 96.0]


def stats_of(tube, box=BOX):
    return clip_statistics(tube[None], torch.tensor([box]))


def scalar(stats, name):
    return float(stats[name][0])


def test_output_shapes():
    tubes = torch.rand(3, T, H, W)
    stats = clip_statistics(tubes, torch.tensor([BOX] * 3))
    for name in (
        "mass",
        "peak_t",
        "peak_y",
        "peak_x",
        "centroid_t",
        "centroid_y",
        "centroid_x",
        "top10_mass",
        "entropy",
    ):
        assert stats[name].shape == (3,), name
    for name in ("temporal_profile", "frame_peak_x", "frame_peak_y"):
        assert stats[name].shape == (3, T), name


def test_one_voxel_tube():
    tube = torch.zeros(T, H, W)
    tube[2, 3, 1] = 2.5
    stats = stats_of(tube)
    assert scalar(stats, "mass") == pytest.approx(2.5)
    assert (int(stats["peak_t"][0]), scalar(stats, "peak_y"), scalar(stats, "peak_x")) == (2, 3.0, 1.0)
    assert scalar(stats, "centroid_t") == pytest.approx(2.0)
    assert scalar(stats, "centroid_y") == pytest.approx(3.0)
    assert scalar(stats, "centroid_x") == pytest.approx(1.0)
    assert scalar(stats, "top10_mass") == pytest.approx(1.0)
    assert scalar(stats, "entropy") == pytest.approx(0.0, abs=1e-7)
    assert stats["temporal_profile"][0].tolist() == [0.0, 0.0, 1.0, 0.0]
    # step 2: column 1, row 3 -> source x 16 + 1.5 * 96 / 6 = 40, y 0 + 3.5 * 96 / 5 = 67.2
    assert float(stats["frame_peak_x"][0, 2]) == pytest.approx(40.0)
    assert float(stats["frame_peak_y"][0, 2]) == pytest.approx(67.2)


@pytest.mark.parametrize("shape", [(4, 5, 6), (2, 3, 5), (3, 3, 3), (1, 7, 9)])
def test_uniform_tube(shape):
    t, h, w = shape
    n = t * h * w
    stats = stats_of(torch.full(shape, 0.5))
    assert scalar(stats, "mass") == pytest.approx(0.5 * n)
    assert scalar(stats, "entropy") == pytest.approx(1.0, abs=1e-6)
    # the top tenth is ceil(n / 10) voxels, each holding 1 / n of the mass
    top = (n + 9) // 10
    assert scalar(stats, "top10_mass") == pytest.approx(top / n, rel=1e-5)
    assert stats["temporal_profile"][0].tolist() == pytest.approx([1.0 / t] * t)
    assert scalar(stats, "centroid_t") == pytest.approx((t - 1) / 2, abs=1e-5)
    assert scalar(stats, "centroid_y") == pytest.approx((h - 1) / 2, abs=1e-5)
    assert scalar(stats, "centroid_x") == pytest.approx((w - 1) / 2, abs=1e-5)


def test_uniform_top10_when_voxels_divide_by_ten():
    # 2 * 3 * 5 = 30 voxels: exactly 3 of them are the top tenth
    stats = stats_of(torch.ones(2, 3, 5))
    assert scalar(stats, "top10_mass") == pytest.approx(0.1, rel=1e-5)


def test_all_negative_tube():
    tube = -torch.rand(T, H, W, generator=torch.Generator().manual_seed(0)) - 0.1
    tube[1, 2, 4] = -0.01  # the least negative voxel is still the peak
    stats = stats_of(tube)
    assert scalar(stats, "mass") == 0.0
    assert stats["temporal_profile"][0].tolist() == pytest.approx([0.25] * 4)
    assert scalar(stats, "entropy") == pytest.approx(1.0)
    assert scalar(stats, "top10_mass") == 0.0
    assert (int(stats["peak_t"][0]), scalar(stats, "peak_y"), scalar(stats, "peak_x")) == (1, 2.0, 4.0)
    # with no mass the distribution counts as uniform: centroid in the middle
    assert scalar(stats, "centroid_t") == pytest.approx(1.5)
    assert scalar(stats, "centroid_y") == pytest.approx(2.0)
    assert scalar(stats, "centroid_x") == pytest.approx(2.5)
    for name in ("mass", "entropy", "top10_mass", "centroid_x", "centroid_y"):
        assert math.isfinite(scalar(stats, name))


def test_mixed_signs_use_positive_part():
    tube = torch.zeros(2, 2, 2)
    tube[0, 0, 0] = 3.0
    tube[1, 1, 1] = 1.0
    tube[0, 1, 0] = -10.0
    stats = stats_of(tube, [0.0, 0.0, 2.0, 2.0])
    assert scalar(stats, "mass") == pytest.approx(4.0)
    assert stats["temporal_profile"][0].tolist() == pytest.approx([0.75, 0.25])
    assert scalar(stats, "centroid_t") == pytest.approx(0.25)
    assert scalar(stats, "centroid_y") == pytest.approx(0.25)
    assert scalar(stats, "centroid_x") == pytest.approx(0.25)
    # ceil(0.8) = 1 voxel in the top tenth
    assert scalar(stats, "top10_mass") == pytest.approx(0.75)
    expected_entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(8)
    assert scalar(stats, "entropy") == pytest.approx(expected_entropy, rel=1e-5)
    assert (int(stats["peak_t"][0]), scalar(stats, "peak_y"), scalar(stats, "peak_x")) == (0, 0.0, 0.0)
    # box is 2x2 source pixels on a 2x2 input: pixel centres at 0.5 and 1.5
    assert stats["frame_peak_x"][0].tolist() == pytest.approx([0.5, 1.5])
    assert stats["frame_peak_y"][0].tolist() == pytest.approx([0.5, 1.5])


def test_frame_peaks_through_crop_box():
    crop = [10 * 128 / 85, 0.0, 74 * 128 / 85, 96.0]
    tube = torch.zeros(T, H, W)
    spots = [(0, 0), (4, 5), (2, 3), (1, 0)]  # (row, column) of each step's maximum
    for step, (row, col) in enumerate(spots):
        tube[step, row, col] = 1.0 + step
    stats = stats_of(tube, crop)
    x0, y0, x1, y1 = crop
    for step, (row, col) in enumerate(spots):
        assert float(stats["frame_peak_x"][0, step]) == pytest.approx(x0 + (col + 0.5) * (x1 - x0) / W, rel=1e-6)
        assert float(stats["frame_peak_y"][0, step]) == pytest.approx(y0 + (row + 0.5) * (y1 - y0) / H, rel=1e-6)
    # the global peak is the biggest one, at step 3
    assert (int(stats["peak_t"][0]), scalar(stats, "peak_y"), scalar(stats, "peak_x")) == (3, 1.0, 0.0)


def test_batch_tubes_are_independent():
    one = torch.zeros(T, H, W)
    one[3, 0, 5] = 1.0
    uniform = torch.ones(T, H, W)
    negative = -torch.ones(T, H, W)
    boxes = torch.tensor([BOX, [0.0, 0.0, 60.0, 50.0], [5.0, 5.0, 17.0, 15.0]])
    batch = clip_statistics(torch.stack([one, uniform, negative]), boxes)
    for i, tube in enumerate([one, uniform, negative]):
        alone = clip_statistics(tube[None], boxes[i : i + 1])
        for name, value in alone.items():
            assert torch.allclose(batch[name][i].float(), value[0].float(), atol=1e-6), name
    # the second box is 60x50 source pixels on a 6x5 input: 10 source pixels per input pixel
    assert batch["frame_peak_x"][1].tolist() == pytest.approx([5.0] * T)
    assert batch["frame_peak_y"][1].tolist() == pytest.approx([5.0] * T)


def test_accepts_half_and_double_input():
    tube = torch.zeros(1, 2, 2, 2)
    tube[0, 1, 0, 1] = 1.0
    for dtype in (torch.float16, torch.float64):
        stats = clip_statistics(tube.to(dtype), torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64))
        assert stats["mass"].dtype == torch.float32
        assert scalar(stats, "centroid_t") == pytest.approx(1.0)
        assert scalar(stats, "centroid_x") == pytest.approx(1.0)


def test_border_mass_and_density_of_a_uniform_tube():
    # 16 x 16 frame: the border band is 2 pixels on each side (12.5 %); the inner 12 x 12 holds 144 / 256
    stats = stats_of(torch.ones(2, 16, 16))
    assert scalar(stats, "border_mass") == pytest.approx(1 - 144 / 256)
    assert stats["density"].shape == (1, 64)
    torch.testing.assert_close(stats["density"][0], torch.full((64,), 1 / 64))


def test_border_mass_and_density_of_one_voxel():
    tube = torch.zeros(T, H, W)  # 5 x 6 frame: the border is row 0 and 4 (centres 0.1, 0.9) and column 0 and 5
    tube[1, 2, 3] = 1.0
    stats = stats_of(tube)
    assert scalar(stats, "border_mass") == pytest.approx(0.0)
    tube[1, 2, 3], tube[3, 0, 2] = 0.0, 4.0  # top row: border
    stats = stats_of(tube)
    assert scalar(stats, "border_mass") == pytest.approx(1.0)
    # row 0 of 5 -> grid row floor(0 * 8 / 5) = 0; column 2 of 6 -> floor(2 * 8 / 6) = 2
    expected = torch.zeros(64)
    expected[0 * 8 + 2] = 1.0
    torch.testing.assert_close(stats["density"][0], expected)


def test_density_sums_mass_over_time_per_cell():
    tube = torch.zeros(2, 8, 8)
    tube[0, 1, 1], tube[1, 6, 7], tube[1, 1, 1] = 1.0, 2.0, 1.0
    density = stats_of(tube)["density"][0].reshape(8, 8)
    assert density[1, 1].item() == pytest.approx(0.5) and density[6, 7].item() == pytest.approx(0.5)
    assert density.sum().item() == pytest.approx(1.0)
    empty = stats_of(torch.zeros(2, 8, 8))
    assert scalar(empty, "border_mass") == pytest.approx(1 - 36 / 64)  # no mass: taken as uniform


def sorted_top_sums(flat, top):
    return flat.double().sort(dim=1, descending=True).values[:, :top].sum(1)


@pytest.mark.parametrize(
    "case", ["smooth", "ties", "sparse", "few_positive", "sample_misleads", "zeros", "uniform", "one_voxel", "tiny"]
)
def test_top_and_xlogx_sums_equal_sorting_and_xlogy(case):
    """On the CPU the top tenth is found by selection among the values above a sampled threshold; it sums the same
    voxels as sorting does, in every branch (ties at the threshold, mass in fewer voxels than the top, a sample that
    sees only the largest values). The sums of x log x are xlogy's (0 log 0 = 0), subnormal masses included."""
    from pipeline.explain.clipstats import _SAMPLE_STEP, _top_and_xlogx_sums

    g = torch.Generator().manual_seed(0)
    native = torch.randn(3, 1, 4, 7, 7, generator=g)
    smooth = torch.nn.functional.interpolate(native, size=(8, 56, 56), mode="trilinear").reshape(3, -1)
    flat = {
        "smooth": smooth.clamp(min=0),
        "ties": torch.rand(3, 6000, generator=g).round(decimals=1),
        "sparse": (smooth - 1.2).clamp(min=0),  # a few percent of the voxels hold mass
        "few_positive": (smooth - 0.75).clamp(min=0),  # about as many voxels with mass as the top
        "sample_misleads": torch.full((3, 6200), 1e-3),
        "zeros": torch.zeros(3, 500),
        "uniform": torch.ones(3, 777),
        "one_voxel": torch.zeros(3, 999).index_fill_(1, torch.tensor([5]), 2.0),
        # subnormals and values below 1e-30 beside ordinary ones: x log x is taken of m + the smallest float32
        "tiny": torch.rand(3, 4000, generator=g) * torch.tensor([1.0, 1e-30, 1e-40, 0.0]).repeat(1000),
    }[case]
    if case == "sample_misleads":  # every sampled voxel is among the largest, but they are a third of the top
        flat[:, ::_SAMPLE_STEP] = 1.0
    top = -(-flat.shape[1] // 10)
    tops, xlogx = _top_and_xlogx_sums(flat, top)
    torch.testing.assert_close(tops.double(), sorted_top_sums(flat, top), rtol=1e-6, atol=0)
    expected = torch.special.xlogy(flat.double(), flat.double()).sum(1)
    torch.testing.assert_close(xlogx.double(), expected, rtol=1e-6, atol=1e-6 * flat.sum(1).max().item())


def previous_clip_statistics(tubes):
    """The straightforward formulas the statistics were first written with (distribution p = mass / its sum)."""
    n, t, h, w = tubes.shape
    flat = tubes.reshape(n, -1)
    mass_map = tubes.clamp(min=0)
    mass = mass_map.reshape(n, -1).sum(1)
    p = mass_map.reshape(n, -1) / mass[:, None]
    p3 = p.reshape(n, t, h, w)
    peak = flat.argmax(1)
    top = -(-t * h * w // 10)
    spatial = p3.sum(1)
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    inner = ((ys > 0.125) & (ys < 0.875))[:, None] & ((xs > 0.125) & (xs < 0.875))[None, :]
    cells = (torch.arange(h) * 8 // h)[:, None] * 8 + (torch.arange(w) * 8 // w)[None, :]
    return dict(
        mass=mass,
        peak_t=(peak // (h * w)).int(),
        peak_y=(peak % (h * w) // w).float(),
        peak_x=(peak % w).float(),
        centroid_t=(p3.sum((2, 3)) * torch.arange(t)).sum(1),
        centroid_y=(p3.sum((1, 3)) * torch.arange(h)).sum(1),
        centroid_x=(p3.sum((1, 2)) * torch.arange(w)).sum(1),
        top10_mass=p.sort(dim=1, descending=True).values[:, :top].sum(1),
        entropy=-(p * torch.log(p.clamp(min=1e-30))).sum(1) / math.log(t * h * w),
        temporal_profile=p3.sum((2, 3)),
        frame_peak_x=(tubes.reshape(n, t, -1).argmax(2) % w).float() + 0.5,  # box (0, 0, w, h): source = input
        frame_peak_y=(tubes.reshape(n, t, -1).argmax(2) // w).float() + 0.5,
        border_mass=(spatial * ~inner).sum((1, 2)),
        density=torch.zeros(n, 64).index_add_(1, cells.flatten(), spatial.reshape(n, -1)),
    )


@pytest.mark.parametrize("shape", [(16, 7, 7), (2, 7, 7), (4, 4, 4)])
def test_statistics_equal_the_straightforward_formulas(shape):
    """Upsampled CAM-like tubes (a third of the voxels negative; one tube with many ties): every statistic is the
    previous formulas' to float32 rounding, positions exactly."""
    from pipeline.explain.upsample import upsample

    g = torch.Generator().manual_seed(0)
    tubes = upsample(torch.randn(4, *shape, generator=g) + 0.4, (16, 112, 112))
    tubes[3] = tubes[3].round(decimals=1)
    got = clip_statistics(tubes, torch.tensor([[0.0, 0.0, 112.0, 112.0]] * 4))
    expected = previous_clip_statistics(tubes)
    assert set(got) == set(expected)
    for name, value in expected.items():
        if name.startswith("peak") or name.startswith("frame_peak"):
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value.float(), rtol=1e-6, atol=1e-7, msg=name)


def test_the_statistics_are_the_declared_ones():
    """The extractor computes exactly the statistics the contract declares (``peak_frame`` is the writer's:
    ``peak_t`` through the clip's frame indices), and the tube schema holds each with its declared type."""
    from pipeline.store.schema import CLIP_STATISTICS, TUBE_SCHEMA

    computed = clip_statistics(torch.rand(2, 4, 8, 8), torch.tensor([[0.0, 0, 8, 8]] * 2))
    assert set(computed) | {"peak_frame"} == {s.name for s in CLIP_STATISTICS}
    assert all(TUBE_SCHEMA.field(s.name).type == s.dtype for s in CLIP_STATISTICS)
