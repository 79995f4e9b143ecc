"""The pictures of one gallery clip: the tube over its frames (an MP4 at most ``ANIMATION_WIDTH`` wide, a strip),
the paper-style tube, the isosurface, compared runs and fused layers side by side; ground-truth boxes and peaks
drawn where known."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from pipeline.data.video import read_frames
from pipeline.report import render
from pipeline.report.marks import BoxTable

#: the widest a clip is shown (its animation, and the frames every picture of it is drawn from), in pixels
ANIMATION_WIDTH = 320


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
        self._frames: dict[str, tuple[np.ndarray, tuple[float, float]]] = {}  # the last clip: frames, scale

    def frames(self, row) -> np.ndarray:
        """The clip's frames as shown: the model's view (``crop_box``) of each source frame, at most
        ``ANIMATION_WIDTH`` wide."""
        if row.clip_id not in self._frames:
            view = render.crop_frames(read_frames(row.source, list(row.frame_indices)), row.crop_box)
            shown = render.fit_width(view, ANIMATION_WIDTH)
            scale = (shown.shape[2] / view.shape[2], shown.shape[1] / view.shape[1])
            self._frames = {row.clip_id: (shown, scale)}
        return self._frames[row.clip_id][0]

    def marks(self, row, volume=None) -> render.Marks | None:
        """The :class:`~pipeline.report.render.Marks` of a tube (the row's own by default) in the pixels of the
        model's view."""
        return self.truth.marks(row.video_id, row.frame_indices, row.crop_box, row.volume if volume is None else volume)

    def _drawn(self, row, marks: render.Marks | None) -> render.Marks | None:
        """``marks`` moved onto the shown frames (the view shrunk to ``ANIMATION_WIDTH``)."""
        self.frames(row)
        return None if marks is None else marks.scaled(*self._frames[row.clip_id][1])

    def animation(self, row, marks: render.Marks | None) -> str:
        """The MP4 of one tube row over the clip (drawn once per clip, method and target), relative to the report."""
        name = f"{asset_name(row.clip_id, row.method)}-t{int(row.target)}.mp4"
        if not (self.assets / name).is_file():
            frames = self.frames(row)
            drawn = render.draw_marks(render.overlay(frames, row.volume), self._drawn(row, marks))
            render.save_mp4(drawn, self.assets / name, max_width=ANIMATION_WIDTH)
        return f"assets/{name}"

    def overlay(self, row) -> dict:
        """Animation and strip of one tube row, and how often its peak hit the box (``hits``, ``boxed`` steps)."""
        name = f"{asset_name(row.clip_id, row.method)}-t{int(row.target)}"
        marks = self.marks(row)
        if not (self.assets / f"{name}.png").is_file():
            render.tube_strip(
                self.frames(row),
                row.volume,
                row.frame_indices,
                self.assets / f"{name}.png",
                title=f"tube for {row.target_name}",
                marks=self._drawn(row, marks),
            )
        out = dict(animation=self.animation(row, marks), strip=f"assets/{name}.png")
        if marks is not None:
            boxed = ~np.isnan(marks.hits)
            out.update(hits=int(marks.hits[boxed].sum()), boxed=int(boxed.sum()))
        return out

    def featured(self, row, others: dict[str, np.ndarray]) -> dict:
        """MP4 (the gallery's animation of the row), paper-style tube picture, isosurface and (with compared runs)
        methods side by side."""
        name = f"{asset_name(row.clip_id, row.method)}-t{int(row.target)}"
        frames = self.frames(row)
        mp4 = self.animation(row, self.marks(row))
        render.tube_picture(frames, row.volume, self.assets / f"{name}-tube.png")
        render.isosurface(row.volume, self.assets / f"{name}-iso.png")
        out = dict(mp4=mp4, tube=f"assets/{name}-tube.png", iso=f"assets/{name}-iso.png")
        if others:
            tubes = {row.method: row.volume, **others}
            render.side_by_side(
                frames,
                tubes,
                self.assets / f"{name}-methods.png",
                marks={n: self._drawn(row, self.marks(row, v)) for n, v in tubes.items()},
            )
            out["methods"] = f"assets/{name}-methods.png"
        layers = getattr(row, "layer_volumes", None)
        if layers:  # a fused run: each fused layer's own tube beside the fused one
            tubes = {f"fused ({row.method})": row.volume, **layers}
            render.side_by_side(
                frames,
                tubes,
                self.assets / f"{name}-layers.png",
                marks={n: self._drawn(row, self.marks(row, v)) for n, v in tubes.items()},
            )
            out.update(layers=f"assets/{name}-layers.png", layer_names=list(layers))
        return out
