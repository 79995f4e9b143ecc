"""Pictures of tubes: files that decode back to what was drawn, and overlays checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.video import probe, read_frames
from pipeline.report import render


@pytest.fixture
def clip():
    """8 grey frames of 40 x 48 and a tube that is hot in the top-left corner of frames 2 to 5."""
    frames = np.full((8, 40, 48, 3), 100, dtype=np.uint8)
    tube = np.zeros((4, 5, 6), dtype=np.float32)
    tube[1:3, 0, 0] = 1.0
    return frames, tube


def _not_blank(path) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return pixels.std() > 5


def test_overlay_leaves_frames_where_the_tube_is_zero(clip):
    frames, tube = clip
    out = render.overlay(frames, tube)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert (out[:, -10:, -10:] == 100).all()  # far from the hot corner: untouched
    assert (out[3, 0, 0] != 100).any() and (out[0, 0, 0] == 100).all()  # hot in the middle frames only
    assert (render.overlay(frames, -tube) == frames).all()  # the negative part is not drawn


def test_mp4_decodes_back_enlarged_no_wider_than_its_cap(clip, tmp_path):
    frames, tube = clip
    render.save_mp4(render.overlay(frames, tube), tmp_path / "a.mp4", fps=4, scale=2)
    info = probe(tmp_path / "a.mp4")
    assert (info.num_frames, info.width, info.height) == (8, 96, 80)
    decoded = read_frames(tmp_path / "a.mp4", list(range(8)))
    assert abs(float(decoded[:, -20:, -20:].mean()) - 100) < 4  # the grey survives the codec
    render.save_mp4(frames, tmp_path / "b.mp4", scale=2, max_width=60)  # doubling would pass the cap: not enlarged
    assert (probe(tmp_path / "b.mp4").width, probe(tmp_path / "b.mp4").height) == (48, 40)
    with pytest.raises(ValueError, match="fit_width them first"):
        render.save_mp4(frames, tmp_path / "c.mp4", max_width=40)


def test_fit_width_shrinks_keeping_the_aspect(clip):
    frames, _ = clip
    assert render.fit_width(frames, 48) is frames
    small = render.fit_width(frames, 24)
    assert small.shape == (8, 20, 24, 3) and (small == 100).all()


def test_pictures_are_drawn(clip, tmp_path):
    frames, tube = clip
    frames = frames.copy()
    frames[:, 20:30, 20:30] = (200, 40, 40)
    render.tube_picture(frames, tube, tmp_path / "tube.png", title="t")
    render.isosurface(tube, tmp_path / "iso.png")
    render.side_by_side(frames, {"cam": tube, "gradcam": tube[:, ::-1]}, tmp_path / "methods.png")
    render.tube_strip(
        frames, render._resize_tube(tube, (8, 40, 48)), range(0, 16, 2), tmp_path / "strip.png", title="x"
    )
    render.class_plots(
        np.full(8, 1 / 8), np.full(8, 1 / 8), np.random.default_rng(0).random(64), tmp_path / "class.png"
    )
    render.curve_plot(
        {"deletion": np.linspace(1, 0, 11), "random deletion": np.linspace(1, 0.5, 11)}, tmp_path / "curves.png"
    )
    for name in ("tube", "iso", "methods", "strip", "class", "curves"):
        assert _not_blank(tmp_path / f"{name}.png"), name
    # the strip has one tile per frame, 96 pixels each with 4 between them
    assert Image.open(tmp_path / "strip.png").size[0] == 8 * 100 - 4


def test_profile_plot_of_many_classes_is_a_heat_map(tmp_path):
    profiles = list(np.random.default_rng(0).dirichlet(np.ones(8), size=200))
    render.profile_plot([f"class {i}" for i in range(200)], profiles, tmp_path / "many.png")
    render.profile_plot(["a", "b"], profiles[:2], tmp_path / "few.png")
    assert _not_blank(tmp_path / "many.png") and _not_blank(tmp_path / "few.png")


def test_a_tube_without_mass_draws_nothing(clip, tmp_path):
    frames, tube = clip
    assert (render.overlay(frames, np.zeros_like(tube)) == frames).all()
    render.isosurface(np.zeros_like(tube), tmp_path / "iso.png")  # no surface, still a picture
    render.tube_picture(frames, np.zeros_like(tube), tmp_path / "tube.png")
    assert (tmp_path / "iso.png").is_file() and _not_blank(tmp_path / "tube.png")
