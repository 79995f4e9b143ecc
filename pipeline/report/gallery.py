"""The pictures of one gallery clip: the tube over its frames (GIF, strip, MP4), the paper-style tube, the
isosurface, compared runs and fused layers side by side; ground-truth boxes and peaks drawn where known."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from pipeline.data.video import read_frames
from pipeline.report import render
from pipeline.report.marks import BoxTable


def asset_name(clip_id: str, method: str) -> str:
    """A file-system-safe, collision-free name for a clip's pictures."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", clip_id)[:60]
    return f"{safe}-{method}-{hashlib.sha1(f'{clip_id}|{method}'.encode()).hexdigest()[:8]}"


class ClipRenderer:
    """Renders the pictures of gallery clips into ``assets``, decoding each clip's frames once; ``truth`` draws
    the ground-truth boxes and the tubes' peaks where the dataset has boxes."""

    def __init__(self, assets: Path, truth: BoxTable | None = None):
        self.assets = assets
        self.truth = truth or BoxTable(None)
        self._frames: dict[str, np.ndarray] = {}

    def frames(self, row) -> np.ndarray:
        if row.clip_id not in self._frames:
            self._frames = {
                row.clip_id: render.crop_frames(read_frames(row.source, list(row.frame_indices)), row.crop_box)
            }
        return self._frames[row.clip_id]

    def marks(self, row, volume=None) -> render.Marks | None:
        return self.truth.marks(row.video_id, row.frame_indices, row.crop_box, row.volume if volume is None else volume)

    def overlay(self, row) -> dict:
        """GIF and strip of one tube row, and how often its peak hit the box (``hits``, ``boxed`` steps)."""
        name = f"{asset_name(row.clip_id, row.method)}-t{int(row.target)}"
        marks = self.marks(row)
        if not (self.assets / f"{name}.gif").is_file():
            frames = self.frames(row)
            render.save_gif(render.draw_marks(render.overlay(frames, row.volume), marks), self.assets / f"{name}.gif")
            render.tube_strip(
                frames,
                row.volume,
                row.frame_indices,
                self.assets / f"{name}.png",
                title=f"tube for {row.target_name}",
                marks=marks,
            )
        out = dict(gif=f"assets/{name}.gif", strip=f"assets/{name}.png")
        if marks is not None:
            boxed = ~np.isnan(marks.hits)
            out.update(hits=int(marks.hits[boxed].sum()), boxed=int(boxed.sum()))
        return out

    def featured(self, row, others: dict[str, np.ndarray]) -> dict:
        """MP4, paper-style tube picture, isosurface and (with compared runs) methods side by side."""
        name = f"{asset_name(row.clip_id, row.method)}-t{int(row.target)}"
        frames = self.frames(row)
        marks = self.marks(row)
        render.save_mp4(render.draw_marks(render.overlay(frames, row.volume), marks), self.assets / f"{name}.mp4")
        render.tube_picture(frames, row.volume, self.assets / f"{name}-tube.png")
        render.isosurface(row.volume, self.assets / f"{name}-iso.png")
        out = dict(mp4=f"assets/{name}.mp4", tube=f"assets/{name}-tube.png", iso=f"assets/{name}-iso.png")
        if others:
            tubes = {row.method: row.volume, **others}
            render.side_by_side(
                frames,
                tubes,
                self.assets / f"{name}-methods.png",
                marks={n: self.marks(row, v) for n, v in tubes.items()},
            )
            out["methods"] = f"assets/{name}-methods.png"
        layers = getattr(row, "layer_volumes", None)
        if layers:  # a fused run: each fused layer's own tube beside the fused one
            tubes = {f"fused ({row.method})": row.volume, **layers}
            render.side_by_side(
                frames,
                tubes,
                self.assets / f"{name}-layers.png",
                marks={n: self.marks(row, v) for n, v in tubes.items()},
            )
            out.update(layers=f"assets/{name}-layers.png", layer_names=list(layers))
        return out
