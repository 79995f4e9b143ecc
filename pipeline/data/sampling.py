"""Clip samplers: which source frames of a video (or segment) feed each model input.

A sampler maps a frame range ``[start, end)`` to a list of clips, each a list of ``clip_len`` source frame
indices. Consecutive time steps are ``frame_stride`` source frames apart, or, with ``target_fps``, as many
frames as make the clip play at that rate given the video's own fps (step ``fps / target_fps``, rounded per
time step: 59.94 fps sampled at 15 fps takes frames 0, 4, 8, 12, 16, 20, 24, 28, ...). Ranges shorter than a
clip are padded by repeating their last frame; the number of repeated steps is reported so tables can say which
clips were padded.

Samplers:
    ``center``   one clip centred in the range.
    ``uniform``  ``num_clips`` clips spread evenly from the first to the last possible start.
    ``sliding``  a window every ``clip_stride`` frames from the start of the range, plus one clip ending at the
                 range's end when the windows would leave frames at the end uncovered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Clip:
    frame_indices: list[int]
    padded: int


@dataclass(frozen=True)
class ClipSampler:
    """Base: ``clip_len`` model time steps, one every ``frame_stride`` source frames (or at ``target_fps``)."""

    clip_len: int
    frame_stride: int = 1
    target_fps: float | None = None

    def __post_init__(self):
        if self.clip_len < 1 or self.frame_stride < 1:
            raise ConfigError(
                f"sampler.clip_len and sampler.frame_stride must be >= 1, got {self.clip_len}, {self.frame_stride}"
            )
        if self.target_fps is not None and not self.target_fps > 0:
            raise ConfigError(f"sampler.target_fps must be > 0 (or null to use frame_stride), got {self.target_fps}")

    def offsets(self, fps: float | None = None) -> np.ndarray:
        """Frame offsets of the time steps from a clip's first frame."""
        if self.target_fps is None:
            return self.frame_stride * np.arange(self.clip_len)
        if fps is None or not math.isfinite(fps) or fps <= 0:
            raise ConfigError(f"sampler.target_fps={self.target_fps} needs the video's frame rate, got {fps}")
        return np.round(np.arange(self.clip_len) * (fps / self.target_fps)).astype(int)

    def span(self, fps: float | None = None) -> int:
        """Source frames one clip covers."""
        return int(self.offsets(fps)[-1]) + 1

    def starts(self, start: int, end: int, span: int) -> list[int]:
        raise NotImplementedError

    def __call__(self, start: int, end: int, fps: float | None = None) -> list[Clip]:
        """The clips of frames ``[start, end)`` of a video playing at ``fps`` (needed only with ``target_fps``)."""
        if end <= start:
            raise ConfigError(f"empty frame range [{start}, {end})")
        offsets = self.offsets(fps)
        clips = []
        for first in self.starts(start, end, int(offsets[-1]) + 1):
            indices = first + offsets
            clips.append(Clip(np.minimum(indices, end - 1).astype(int).tolist(), int((indices >= end).sum())))
        unique = {tuple(c.frame_indices): c for c in clips}
        return list(unique.values())


@dataclass(frozen=True)
class CenterSampler(ClipSampler):
    """One clip centred in the range."""

    def starts(self, start: int, end: int, span: int) -> list[int]:
        return [start + max(0, (end - start - span) // 2)]


@dataclass(frozen=True)
class UniformSampler(ClipSampler):
    """``num_clips`` clips spread evenly from the first to the last possible start."""

    num_clips: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.num_clips < 1:
            raise ConfigError(f"sampler.num_clips must be >= 1, got {self.num_clips}")

    def starts(self, start: int, end: int, span: int) -> list[int]:
        last = max(start, end - span)
        return sorted({int(round(s)) for s in np.linspace(start, last, self.num_clips)})


@dataclass(frozen=True)
class SlidingSampler(ClipSampler):
    """A clip every ``clip_stride`` source frames; ``None`` means back to back (stride = the clip's span)."""

    clip_stride: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.clip_stride is not None and self.clip_stride < 1:
            raise ConfigError(
                f"sampler.clip_stride must be >= 1 (or null for back-to-back clips), got {self.clip_stride}"
            )

    def starts(self, start: int, end: int, span: int) -> list[int]:
        last = max(start, end - span)
        starts = list(range(start, last + 1, self.clip_stride or span))
        if starts[-1] != last:
            starts.append(last)
        return starts
