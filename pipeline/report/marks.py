"""Ground truth on the report's pictures: a drawn clip's boxes, its tube's peak in every frame, hit or miss.

The peak of each time step is found as the extractor found it (:func:`pipeline.explain.clipstats.frame_peaks`
on the tube at input size, mapped to source pixels) and a hit is the pointing game's
(:func:`pipeline.explain.clipstats.peak_in_box`), so a picture shows exactly what the stats stage counted.
Everything is then moved into the pixels of the shown frames (the crop of the source frame the model saw).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.explain.clipstats import frame_peaks, peak_in_box
from pipeline.report.render import Marks


class BoxTable:
    """Ground-truth boxes by ``(video_id, source frame)``, for the clips a report draws.

    Args:
        boxes: a boxes table (``video_id, frame, x0, y0, x1, y1``, source pixels), or None (no boxes).
        tolerance: pixels added around a box for a hit (``stats.pointing_tolerance``).
    """

    def __init__(self, boxes: pd.DataFrame | None, tolerance: float = 0.0):
        self.tolerance = float(tolerance)
        self.lookup: dict[tuple[str, int], np.ndarray] = {}
        if boxes is not None:
            values = boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
            keys = zip(boxes["video_id"].astype(str), boxes["frame"].astype(int))
            self.lookup = dict(zip(keys, values))

    def clip_boxes(self, video_id: str, frame_indices) -> np.ndarray:
        """``(T, 4)`` boxes of a clip's frames in source pixels, NaN rows where a frame has none."""
        missing = np.full(4, np.nan)
        return np.stack([self.lookup.get((str(video_id), int(f)), missing) for f in frame_indices])

    def marks(self, video_id: str, frame_indices, crop_box, volume: np.ndarray) -> Marks | None:
        """The :class:`Marks` of a tube at input size ``(T, H, W)`` over the clip's cropped frames; None when no
        frame of the clip has a box."""
        boxes = self.clip_boxes(video_id, frame_indices)
        has_box = ~np.isnan(boxes).any(1)
        if not has_box.any():
            return None
        crop = torch.tensor(np.array(crop_box, dtype=np.float32))[None]
        px, py = (
            v[0].double().numpy() for v in frame_peaks(torch.from_numpy(np.ascontiguousarray(volume))[None], crop)
        )
        x0, y0, x1, y1 = boxes.T
        hits = np.where(has_box, peak_in_box(px, py, x0, y0, x1, y1, self.tolerance).astype(float), np.nan)
        # shown frames are the crop of the source frame (render.crop_frames): shift by its rounded corner
        ox, oy = (max(0, int(round(float(v)))) for v in np.asarray(crop_box)[:2])
        shift = np.array([ox, oy, ox, oy], dtype=np.float64)
        return Marks(boxes=boxes - shift, peaks=np.stack([px - ox, py - oy], 1), hits=hits)
