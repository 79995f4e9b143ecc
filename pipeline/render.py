"""Pictures of tubes: overlays on frames (GIF), the tube over time (PNG strip) and per-class profile plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

COLORMAP = matplotlib.colormaps["jet"]


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
    """Blend a ``(T, h, w)`` tube (any resolution) over ``(T, H, W, 3)`` frames as a heat map."""
    heat = torch.from_numpy(display_scale(tube)).float()[None]
    heat = F.interpolate(heat, size=frames.shape[1:3], mode="bilinear", align_corners=False)[0].clamp(0, 1).numpy()
    colour = COLORMAP(heat)[..., :3] * 255.0
    weight = alpha * heat[..., None] ** 0.5
    return (frames * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8)


def save_gif(frames: np.ndarray, path: Path, fps: float = 4.0, scale: int = 2) -> None:
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, optimize=True)


def tube_strip(frames: np.ndarray, tube: np.ndarray, frame_indices, path: Path, title: str = "") -> None:
    """Frames with the tube over them, one per time step, above the tube's temporal profile."""
    blended = overlay(frames, tube)
    t = len(blended)
    fig = plt.figure(figsize=(1.3 * t, 2.6), dpi=90)
    grid = fig.add_gridspec(2, t, height_ratios=[3, 1.3], hspace=0.25, wspace=0.05)
    for i in range(t):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(blended[i])
        ax.set_axis_off()
        ax.set_title(f"f{int(frame_indices[i])}", fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    mass = np.clip(tube, 0, None).sum(axis=(1, 2))
    ax.bar(range(t), mass / mass.sum() if mass.sum() > 0 else mass, color="#c0392b")
    ax.set_xlim(-0.5, t - 0.5)
    ax.set_xticks([])
    ax.set_ylabel("mass", fontsize=7)
    ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def profile_plot(names: list[str], profiles: list[np.ndarray], path: Path) -> None:
    """Mean temporal profile per class: where in the clip saliency falls."""
    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=90)
    for name, profile in zip(names, profiles):
        ax.plot(np.arange(len(profile)), profile, marker="o", markersize=3, label=name)
    ax.set_xlabel("clip time step")
    ax.set_ylabel("share of saliency")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
