"""Pictures of tubes: overlays on frames (MP4), the tube over time (PNG strip), the paper-style tube
(frames stacked in depth with the saliency drawn through them), an isosurface view, methods side by side, and
the per-class plots of the report (temporal profiles, spatial density, deletion / insertion curves).

Everything here draws what it is given; it reads no tables. Matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from PIL import Image, ImageDraw
from skimage.measure import marching_cubes

from pipeline.data.video import write_video

COLORMAP = matplotlib.colormaps["jet"]
BOX_COLOUR, HIT_COLOUR, MISS_COLOUR = (255, 255, 255), (40, 220, 60), (255, 40, 200)


@dataclass
class Marks:
    """Ground truth drawn over a clip's frames, in the frames' pixels (NaN where a time step has no box).

    Attributes:
        boxes: ``(T, 4)`` x0, y0, x1, y1 of the ground-truth box.
        peaks: ``(T, 2)`` x, y of the tube's peak in each frame.
        hits: ``(T,)`` 1 where the peak fell in the box (the pointing game), 0 where not, NaN without a box.
    """

    boxes: np.ndarray
    peaks: np.ndarray
    hits: np.ndarray

    def scaled(self, sx: float, sy: float) -> Marks:
        """The same marks on frames resized ``sx`` times in width and ``sy`` times in height."""
        return Marks(boxes=self.boxes * [sx, sy, sx, sy], peaks=self.peaks * [sx, sy], hits=self.hits)


def draw_marks(frames: np.ndarray, marks: Marks | None) -> np.ndarray:
    """``frames`` ``(T, H, W, 3)`` with each step's box outlined and the tube's peak as a cross (green: on the
    box, magenta: off it); steps without a box are left as they are."""
    if marks is None:
        return frames
    out = []
    for frame, box, peak, hit in zip(frames, marks.boxes, marks.peaks, marks.hits):
        if np.isnan(hit):
            out.append(frame)
            continue
        image = Image.fromarray(np.ascontiguousarray(frame))
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=BOX_COLOUR)
        x, y, r = float(peak[0]), float(peak[1]), max(2.0, frame.shape[0] / 24)
        colour = HIT_COLOUR if hit > 0 else MISS_COLOUR
        draw.line((x - r, y, x + r, y), fill=colour, width=1)
        draw.line((x, y - r, x, y + r), fill=colour, width=1)
        out.append(np.asarray(image))
    return np.stack(out)


def crop_frames(frames: np.ndarray, crop_box) -> np.ndarray:
    """The part of source frames ``(T, H, W, 3)`` the model saw (``crop_box`` in source pixels)."""
    x0, y0, x1, y1 = (int(round(v)) for v in crop_box)
    return frames[:, max(0, y0) : y1, max(0, x0) : x1]


def display_scale(tube: np.ndarray) -> np.ndarray:
    """The tube's positive part scaled to [0, 1] by its own peak (for display only)."""
    positive = np.clip(tube, 0, None)
    peak = positive.max()
    return positive / peak if peak > 0 else positive


def overlay(frames: np.ndarray, tube: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a tube (any resolution, e.g. the layer's native ``(t, h, w)``) over ``(T, H, W, 3)`` frames as a heat map."""
    if tube.shape[0] != len(frames):
        tube = _resize_tube(tube, (len(frames), *tube.shape[1:]))
    heat = torch.from_numpy(np.ascontiguousarray(display_scale(tube))).float()[None]
    heat = F.interpolate(heat, size=frames.shape[1:3], mode="bilinear", align_corners=False)[0].clamp(0, 1).numpy()
    colour = COLORMAP(heat)[..., :3] * 255.0
    weight = alpha * heat[..., None] ** 0.5
    return (frames * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def fit_width(frames: np.ndarray, width: int) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` made at most ``width`` pixels wide, aspect kept (returned as they are when narrower)."""
    h, w = frames.shape[1:3]
    if w <= width:
        return frames
    size = (width, max(1, round(h * width / w)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


def save_mp4(frames: np.ndarray, path: Path, fps: float = 4.0, scale: int = 2, max_width: int = 320) -> None:
    """Frames ``(T, H, W, 3)`` as an H.264 MP4, enlarged by a whole ``scale`` (pixels kept sharp) as far as
    ``max_width`` allows; sizes made even for yuv420p. Frames wider than ``max_width`` are refused: shrink them
    (:func:`fit_width`) before drawing on them, so that thin marks survive."""
    width = frames.shape[2]
    if width > max_width:
        raise ValueError(f"frames {width} pixels wide, more than max_width={max_width}: fit_width them first")
    scale = max(1, min(scale, max_width // width))
    big = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    big = big[:, : big.shape[1] // 2 * 2, : big.shape[2] // 2 * 2]
    write_video(path, np.ascontiguousarray(big), fps=fps, preset="veryfast")


def _resize_tube(tube: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resize of a ``(t, h, w)`` tube, for drawing only."""
    return F.interpolate(
        torch.from_numpy(np.ascontiguousarray(tube)).float()[None, None],
        size=size,
        mode="trilinear",
        align_corners=False,
    )[0, 0].numpy()


def tube_picture(
    frames: np.ndarray, tube: np.ndarray, path: Path, title: str = "", side: int = 48, level: float = 0.5
) -> None:
    """The paper's picture: the clip's frames stacked in depth along the time axis, each overlaid with its
    slice of the tube, and the tube's salient region (``level`` of its peak) drawn through them as a surface."""
    t = len(frames)
    small = np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.BILINEAR)) for f in frames])
    shown = overlay(small, tube) / 255.0
    fig = plt.figure(figsize=(6.4, 3.6), dpi=90)
    ax = fig.add_subplot(projection="3d")
    yy, zz = np.meshgrid(np.arange(side + 1), np.arange(side + 1)[::-1])
    spacing = side / 2.0
    for i in range(t):  # frame i as a plane at depth i * spacing (image rows downwards: z flipped)
        ax.plot_surface(
            np.full_like(yy, i * spacing, dtype=float),
            yy,
            zz,
            facecolors=shown[i],
            shade=False,
            rstride=2,
            cstride=2,
            alpha=0.85,
        )
    volume = display_scale(_resize_tube(tube, (2 * t, 24, 24)))
    if volume.min() < level < volume.max():  # a flat tube (one voxel) has no surface
        verts, faces, _, _ = marching_cubes(volume, level=level)
        # volume axes (time, row, col) -> plot axes (depth, x, height)
        depth = verts[:, 0] / (2 * t - 1) * (t - 1) * spacing
        x = (verts[:, 2] + 0.5) * side / 24
        z = side - (verts[:, 1] + 0.5) * side / 24
        mesh = Poly3DCollection(
            np.stack([depth, x, z], 1)[faces], facecolor=COLORMAP(0.9), edgecolor="none", alpha=0.35
        )
        ax.add_collection3d(mesh)
    ax.set_box_aspect(((t - 1) * spacing + 1, side, side))
    ax.view_init(elev=18, azim=-58)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def isosurface(tube: np.ndarray, path: Path, levels=(0.3, 0.6, 0.85), title: str = "") -> None:
    """Nested isosurfaces of the tube (shares of its peak) in (time, row, column) space."""
    t = tube.shape[0]
    volume = display_scale(_resize_tube(tube, (max(2 * t, 8), 32, 32)))
    fig = plt.figure(figsize=(4.2, 3.6), dpi=90)
    ax = fig.add_subplot(projection="3d")
    for level in levels:
        if not volume.min() < level < volume.max():  # no surface at this level (a tube of one voxel is flat)
            continue
        verts, faces, _, _ = marching_cubes(volume, level=level)
        tt = verts[:, 0] / (volume.shape[0] - 1) * (t - 1)
        mesh = Poly3DCollection(
            np.stack([tt, verts[:, 2], volume.shape[1] - verts[:, 1]], 1)[faces],
            facecolor=COLORMAP(level),
            edgecolor="none",
            alpha=0.25 + 0.5 * level,
        )
        ax.add_collection3d(mesh)
    ax.set_xlim(0, max(t - 1, 1))
    ax.set_ylim(0, volume.shape[2])
    ax.set_zlim(0, volume.shape[1])
    ax.set_xlabel("time step", fontsize=7)
    ax.set_ylabel("x", fontsize=7)
    ax.set_zlabel("y", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.view_init(elev=20, azim=-60)
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def side_by_side(
    frames: np.ndarray, tubes: dict[str, np.ndarray], path: Path, steps: int = 4, marks: dict | None = None
) -> None:
    """One row per method (or fused layer): ``steps`` evenly spaced frames of the clip with that tube over them,
    and its :class:`Marks` (``marks[name]``) where given."""
    t = len(frames)
    picks = np.unique(np.linspace(0, t - 1, min(steps, t)).round().astype(int))
    fig, axes = plt.subplots(
        len(tubes), len(picks), figsize=(1.5 * len(picks) + 0.8, 1.5 * len(tubes)), dpi=90, squeeze=False
    )
    for row, (name, tube) in enumerate(tubes.items()):
        blended = draw_marks(overlay(frames, tube), (marks or {}).get(name))
        for col, i in enumerate(picks):
            ax = axes[row, col]
            ax.imshow(blended[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
            if row == 0:
                ax.set_title(f"step {i}", fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def tube_strip(
    frames: np.ndarray,
    tube: np.ndarray,
    frame_indices,
    path: Path,
    title: str = "",
    tile: int = 96,
    marks: Marks | None = None,
) -> None:
    """Frames with the tube (and its :class:`Marks`) over them, one per time step (labelled with the source
    frame), above bars of the tube's temporal profile. Drawn with Pillow: a few milliseconds, so every gallery
    clip can have one."""
    blended = draw_marks(overlay(frames, tube), marks)
    t = len(blended)
    gap, label_h, bars_h = 4, 14, 40
    top = label_h if not title else 2 * label_h
    canvas = Image.new("RGB", (t * (tile + gap) - gap, top + tile + gap + bars_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((0, 0), title, fill="#222")
    mass = np.clip(tube, 0, None).reshape(tube.shape[0], -1).sum(1)
    if len(mass) != t:  # a tube at another time resolution: its profile resampled to the frames
        mass = np.interp(np.linspace(0, len(mass) - 1, t), np.arange(len(mass)), mass)
    share = mass / mass.max() if mass.max() > 0 else mass
    for i in range(t):
        x = i * (tile + gap)
        canvas.paste(Image.fromarray(blended[i]).resize((tile, tile), Image.BILINEAR), (x, top))
        draw.text((x + 2, top - label_h + 1), f"f{int(frame_indices[i])}", fill="#555")
        height = int(round(share[i] * (bars_h - 2)))
        draw.rectangle(
            (x + tile // 4, canvas.height - 1 - height, x + 3 * tile // 4, canvas.height - 1), fill="#c0392b"
        )
    canvas.save(path)


def profile_plot(names: list[str], profiles: list[np.ndarray], path: Path, max_lines: int = 12) -> None:
    """Mean temporal profile per class: where in the clip saliency falls. Up to ``max_lines`` classes as
    lines; more as a heat map (one row per class), which stays readable for hundreds of classes."""
    if len(names) > max_lines:
        fig, ax = plt.subplots(figsize=(6, min(0.12 * len(names) + 1.2, 30)), dpi=90)
        image = ax.imshow(np.stack(profiles), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_yticks(range(len(names)) if len(names) <= 120 else [])
        ax.set_yticklabels(names if len(names) <= 120 else [], fontsize=5)
        fig.colorbar(image, ax=ax, label="share of saliency")
    else:
        fig, ax = plt.subplots(figsize=(6, 2.8), dpi=90)
        for name, profile in zip(names, profiles):
            ax.plot(np.arange(len(profile)), profile, marker="o", markersize=3, label=name)
        ax.set_ylabel("share of saliency")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    ax.set_xlabel("clip time step")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def class_plots(profile: np.ndarray, everyone: np.ndarray, density: np.ndarray | None, path: Path) -> None:
    """A class's temporal profile against the whole dataset's, beside its mean spatial density map."""
    fig, axes = plt.subplots(
        1, 2 if density is not None else 1, figsize=(7.5 if density is not None else 4.5, 2.6), dpi=90, squeeze=False
    )
    ax = axes[0, 0]
    ax.plot(profile, marker="o", markersize=3, label="this class", color="#c0392b")
    ax.plot(everyone, linestyle="--", color="#777", label="all classes")
    ax.set_xlabel("clip time step")
    ax.set_ylabel("share of saliency")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if density is not None:
        grid = int(round(np.sqrt(len(density))))
        image = axes[0, 1].imshow(np.asarray(density).reshape(grid, grid), cmap="magma", vmin=0)
        axes[0, 1].set_title("where in the frame (share of saliency)", fontsize=8)
        axes[0, 1].set_xticks([])
        axes[0, 1].set_yticks([])
        fig.colorbar(image, ax=axes[0, 1], fraction=0.046)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def distribution_plot(mine: dict[str, np.ndarray], everyone: dict[str, np.ndarray], path: Path) -> None:
    """Histograms (share of clips per tenth of [0, 1]) of per-clip statistics: a class against all classes."""
    fig, axes = plt.subplots(1, len(mine), figsize=(2.6 * len(mine), 2.2), dpi=90, squeeze=False)
    for ax, (name, hist) in zip(axes[0], mine.items()):
        centres = (np.arange(len(hist)) + 0.5) / len(hist)
        ax.bar(centres, hist, width=0.9 / len(hist), color="#c0392b", label="this class")
        ax.step(
            np.r_[0, centres + 0.5 / len(hist)],
            np.r_[everyone[name][0], everyone[name]],
            where="pre",
            color="#555",
            label="all classes",
        )
        ax.set_xlim(0, 1)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("share of clips", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def curve_plot(curves: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """Deletion / insertion curves: the target's probability against the share of voxels removed / revealed."""
    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=90)
    for name, curve in curves.items():
        ax.plot(np.linspace(0, 1, len(curve)), curve, linestyle="--" if "random" in name else "-", label=name)
    ax.set_xlabel("share of voxels removed / revealed")
    ax.set_ylabel("target probability")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
