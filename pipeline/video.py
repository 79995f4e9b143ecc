"""Video decoding with PyAV, and the resize/crop that maps source frames to model input.

Everything here works on one video at a time and knows nothing about models or tables. Errors are raised as
:class:`VideoError` with a message that names the file, so callers can turn them into failure rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F


class VideoError(RuntimeError):
    """A video that cannot be probed or decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video file tells without decoding it."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str


def probe(path: str | Path) -> VideoInfo:
    """Read frame count, frame rate, size and codec from the container, decoding nothing.

    Containers that do not store a frame count (some AVI and MKV files) are counted by demuxing packets.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate or stream.codec_context.width <= 0:
                raise VideoError(f"{path}: video stream has no frame rate or size")
            num_frames = stream.frames
            if num_frames <= 0:
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            if num_frames <= 0:
                raise VideoError(f"{path}: video stream holds no frames")
            return VideoInfo(
                num_frames=int(num_frames),
                fps=float(rate),
                width=int(stream.codec_context.width),
                height=int(stream.codec_context.height),
                codec=stream.codec_context.name,
            )
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot be opened as video ({err})") from err


def read_frames(path: str | Path, indices: list[int] | np.ndarray) -> np.ndarray:
    """Decode the frames at ``indices`` (0-based, any order, repeats allowed) as uint8 ``(T, H, W, 3)`` RGB.

    Decoding runs from the start of the file up to the last needed frame and counts frames, so indices are
    exact whatever the container's timestamps say.
    """
    path = Path(path)
    wanted = np.asarray(indices, dtype=np.int64)
    if wanted.size == 0:
        raise VideoError(f"{path}: no frame indices requested")
    if wanted.min() < 0:
        raise VideoError(f"{path}: negative frame index {int(wanted.min())}")
    last = int(wanted.max())
    needed = set(wanted.tolist())
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                decoded = position + 1
                if position in needed:
                    frames[position] = frame.to_ndarray(format="rgb24")
                if position >= last:
                    break
    except (av.FFmpegError, IndexError) as err:
        raise VideoError(f"{path}: decoding failed ({err})") from err
    if last not in frames:
        raise VideoError(f"{path}: frame {last} requested but only {decoded} frames could be decoded")
    return np.stack([frames[i] for i in wanted.tolist()])


@dataclass(frozen=True)
class ResizeCrop:
    """Resize so the short side is ``short_side``, then centre-crop to ``size`` = (height, width).

    :meth:`crop_box` says which region of the source frame the crop covers, in source pixels, so tubes can be
    drawn back onto the original video.
    """

    short_side: int
    size: tuple[int, int]

    def _geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        scale = self.short_side / min(height, width)
        new_h, new_w = max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale))
        top, left = (new_h - self.size[0]) // 2, (new_w - self.size[1]) // 2
        return new_h, new_w, top, left

    def crop_box(self, height: int, width: int) -> list[float]:
        """The crop as ``[x0, y0, x1, y1]`` in source pixels."""
        new_h, new_w, top, left = self._geometry(height, width)
        sx, sy = width / new_w, height / new_h
        return [left * sx, top * sy, (left + self.size[1]) * sx, (top + self.size[0]) * sy]

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float ``(3, T, h, w)`` in [0, 1]."""
        height, width = frames.shape[1:3]
        new_h, new_w, top, left = self._geometry(height, width)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
        if (new_h, new_w) != (height, width):
            video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        video = video[:, :, top : top + self.size[0], left : left + self.size[1]].clamp_(0.0, 1.0)
        return video.permute(1, 0, 2, 3).contiguous()


def source_to_input(box: np.ndarray, crop_box: list[float], input_hw: tuple[int, int]) -> np.ndarray:
    """Map ``[..., x0, y0, x1, y1]`` boxes from source pixels to model-input pixels of a clip."""
    x0, y0, x1, y1 = crop_box
    sx, sy = input_hw[1] / (x1 - x0), input_hw[0] / (y1 - y0)
    out = np.asarray(box, dtype=np.float64).copy()
    out[..., [0, 2]] = (out[..., [0, 2]] - x0) * sx
    out[..., [1, 3]] = (out[..., [1, 3]] - y0) * sy
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: float, codec: str = "libx264", **options: str) -> None:
    """Write uint8 ``(T, H, W, 3)`` RGB frames as a video file (used by the synthetic dataset and tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(round(fps)) if math.isclose(fps, round(fps)) else Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {k: str(v) for k, v in options.items()}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
