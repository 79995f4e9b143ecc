"""Clip samplers: which source frames of a video (or segment) feed each model input.

A sampler maps a frame range ``[start, end)`` to a list of clips, each a list of ``clip_len`` source frame
indices taken every ``frame_stride`` frames. Ranges shorter than a clip are padded by repeating their last
frame; the number of repeated steps is reported so tables can say which clips were padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clip:
    frame_indices: list[int]
    padded: int


def _clip_at(first: int, end: int, clip_len: int, stride: int) -> Clip:
    indices = first + stride * np.arange(clip_len)
    padded = int((indices >= end).sum())
    return Clip(np.minimum(indices, end - 1).astype(int).tolist(), padded)


@dataclass(frozen=True)
class ClipSampler:
    """Base: ``clip_len`` model time steps, one every ``frame_stride`` source frames."""

    clip_len: int
    frame_stride: int = 1

    def __post_init__(self):
        if self.clip_len < 1 or self.frame_stride < 1:
            raise ValueError(f"sampler.clip_len and sampler.frame_stride must be >= 1, got {self.clip_len}, {self.frame_stride}")

    @property
    def span(self) -> int:
        """Source frames one clip covers."""
        return (self.clip_len - 1) * self.frame_stride + 1

    def starts(self, start: int, end: int) -> list[int]:
        raise NotImplementedError

    def __call__(self, start: int, end: int) -> list[Clip]:
        if end <= start:
            raise ValueError(f"empty frame range [{start}, {end})")
        clips = [_clip_at(first, end, self.clip_len, self.frame_stride) for first in self.starts(start, end)]
        unique = {tuple(c.frame_indices): c for c in clips}
        return list(unique.values())


@dataclass(frozen=True)
class CenterSampler(ClipSampler):
    """One clip centred in the range."""

    def starts(self, start: int, end: int) -> list[int]:
        return [start + max(0, (end - start - self.span) // 2)]


@dataclass(frozen=True)
class UniformSampler(ClipSampler):
    """``num_clips`` clips spread evenly from the first to the last possible start."""

    num_clips: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.num_clips < 1:
            raise ValueError(f"sampler.num_clips must be >= 1, got {self.num_clips}")

    def starts(self, start: int, end: int) -> list[int]:
        last = max(start, end - self.span)
        return sorted({int(round(s)) for s in np.linspace(start, last, self.num_clips)})
