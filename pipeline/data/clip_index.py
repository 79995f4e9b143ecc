"""From dataset records and probes to clip rows: frame ranges, the sampler's clips, clip ids and shards."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from pipeline.data.datasets.base import VideoRecord
from pipeline.data.sampling import ClipSampler
from pipeline.data.video import VideoInfo
from pipeline.errors import ConfigError
from pipeline.store import INDEX_SCHEMA
from pipeline.store.files import Failure


class FrameRangeError(ValueError):
    """A segment that does not fit in its video."""


def _bounds(start: float, end: float | None, unit: str = "") -> str:
    """``[start, end)`` as written, e.g. ``[2.5s, 4s)`` or ``[30, end)``."""
    return f"[{start:g}{unit}, {'end' if end is None else f'{end:g}{unit}'})"


def _frame_range(rec: VideoRecord, info: VideoInfo, fps: float) -> tuple[int, int]:
    """The record's 0-based ``[start, end)`` frames in this video; :class:`FrameRangeError` when it does not fit."""
    frames = info.num_frames
    length = f"{frames} frames" + (f", {frames / fps:.2f}s" if math.isfinite(fps) and fps > 0 else "")
    if rec.start_sec is not None or rec.end_sec is not None:
        if not math.isfinite(fps):
            raise FrameRangeError(
                f"{rec.source}: a segment in seconds needs the frame rate (set dataset.fps for frame folders)"
            )
        start = math.ceil((rec.start_sec or 0.0) * fps - 1e-6)
        end = frames if rec.end_sec is None else math.ceil(rec.end_sec * fps - 1e-6)
        where = (
            f"{_bounds(rec.start_sec or 0.0, rec.end_sec, 's')} = frames "
            f"{_bounds(start, None if rec.end_sec is None else end)}"
        )
    else:
        start, end = rec.start_frame, frames if rec.end_frame is None else rec.end_frame
        where = f"frames {_bounds(start, rec.end_frame)}"
    if start >= frames:
        raise FrameRangeError(f"{rec.source}: {where} start at or after the end of the video ({length})")
    if end <= start:
        raise FrameRangeError(f"{rec.source}: {where} hold no frame (the segment stops before it starts)")
    if start < 0 or end > frames:
        raise FrameRangeError(f"{rec.source}: {where} lie beyond the video's {length}")
    return start, end


def build_clips(
    records: list[VideoRecord], probes: dict[str, object], sampler: ClipSampler
) -> tuple[pd.DataFrame, list[dict]]:
    """Clip rows (no shard yet) and failure rows for records that cannot give a clip.

    A clip id is ``<segment id or video id>:<first frame, 6 digits>``; a clip id met a second time (a video or
    segment listed twice) is a failure row, the first one is kept.
    """
    rows, failures, seen = [], [], set()

    def fail(rec: VideoRecord, error_type: str, message: str) -> None:
        failures.append(
            Failure(
                clip_id=rec.segment_id or rec.video_id,
                source=rec.source,
                stage="index",
                error_type=error_type,
                message=message,
            )
        )

    for rec in records:
        info = probes[rec.source]
        if isinstance(info, Exception):
            fail(rec, type(info).__name__, str(info))
            continue
        fps = info.fps if math.isfinite(info.fps) else (rec.fps if rec.fps else math.nan)
        try:
            start, end = _frame_range(rec, info, fps)
            clips = sampler(start, end, fps if math.isfinite(fps) else None)
        except FrameRangeError as err:
            fail(rec, "FrameRangeError", str(err))
            continue
        except ValueError as err:
            fail(rec, "SamplingError", f"{rec.source}: {err}")
            continue
        for clip in clips:
            clip_id = f"{rec.segment_id or rec.video_id}:{clip.frame_indices[0]:06d}"
            if clip_id in seen:
                fail(
                    rec,
                    "DuplicateClip",
                    f"{rec.source}: clip {clip_id} already comes from an earlier entry (listed twice?)",
                )
                continue
            seen.add(clip_id)
            rows.append(
                dict(
                    clip_id=clip_id,
                    video_id=rec.video_id,
                    source=rec.source,
                    label=rec.label,
                    label_name=rec.label_name,
                    split=rec.split,
                    frame_indices=clip.frame_indices,
                    padded=clip.padded,
                    num_frames=info.num_frames,
                    fps=fps,
                    width=info.width,
                    height=info.height,
                    segment_id=rec.segment_id,
                    start_frame=start,
                    end_frame=end,
                    codec=info.codec,
                    duration=info.duration,
                )
            )
    frame = pd.DataFrame(rows, columns=[f.name for f in INDEX_SCHEMA if f.name != "shard"])
    return frame, failures


def assign_shards(num_clips: int, clips_per_shard: int) -> np.ndarray:
    """Contiguous shards of (almost) equal size, at most ``clips_per_shard`` clips each."""
    if clips_per_shard < 1:
        raise ConfigError(f"index.clips_per_shard must be >= 1, got {clips_per_shard}")
    shards = max(1, -(-num_clips // clips_per_shard))
    return (np.arange(num_clips) * shards // max(num_clips, 1)).astype(np.int32)
