"""Decoding clips from video files (PyAV) and frame folders (JPEG), and writing video files (PyAV).

Everything here works on one video at a time and knows nothing about models or tables. Errors are raised as
:class:`VideoError` with a message that names the file, so callers can turn them into failure rows.

Frame indices are 0-based positions in decoding order of the whole file: frame ``i`` is the ``i``-th picture a
decoder returns when it decodes the file from its start. :func:`read_frames` seeks to the keyframe before the
first wanted frame and identifies every decoded picture by its timestamp (``round((pts * time_base -
start_time) * fps)``). It falls back to decoding from the start and counting whenever the timestamps cannot be
trusted (missing pts, a frame rate that is not constant, timestamps off the frame grid, a seek that lands after
the wanted frame), so a picture is never returned under the wrong index.

A frame folder (e.g. EPIC-Kitchens ``rgb_frames/P01_01/``) holds one JPEG per frame named
``frame_%010d.jpg`` and numbered from 1: frame index ``i`` is the file ``frame_{i + 1:010d}.jpg``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

#: name of the JPEG of frame number ``n`` in a frame folder, and the number of the first frame
FRAME_FILE = "frame_{:010d}.jpg"
FIRST_FRAME_NUMBER = 1
_FRAME_NAME = re.compile(r"frame_(\d+)\.jpe?g$", re.IGNORECASE)
#: packets read to find the first frame's timestamp (more than any decoder's reordering delay)
_REORDER_PACKETS = 32
#: how far before the first wanted frame successive seeks land when a seek overshoots (seconds)
_SEEK_BACKOFF = (0.0, 0.5, 2.0, 10.0)
#: how a decoded frame becomes RGB: on the calling thread. PyAV >= 17 converts with FFmpeg's threaded scaler,
#: which starts a pool of threads for every frame (two per frame on 2 cores): a clip then costs 1.75x the CPU,
#: and two decoders at once wait on each other's thread starts (0.7x the clips/s each).
_TO_RGB = {"format": "rgb24", **({"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {})}


class VideoError(RuntimeError):
    """A video that cannot be probed or decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video file (or frame folder) tells without decoding it.

    ``fps`` is NaN for a frame folder: the folder does not know its rate, the dataset reader does.
    """

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    duration: float = math.nan


def frame_file(folder: str | Path, index: int) -> Path:
    """The JPEG of 0-based frame ``index`` in a frame folder (``frame_{index + 1:010d}.jpg``)."""
    return Path(folder) / FRAME_FILE.format(int(index) + FIRST_FRAME_NUMBER)


# ----------------------------------------------------------------------------------------------- probing
def probe(path: str | Path) -> VideoInfo:
    """Frame count, frame rate, size, codec and duration of a video file or frame folder, decoding nothing.

    Containers that do not store a frame count (some AVI and MKV files) are counted by demuxing packets.
    """
    path = Path(path)
    if path.is_dir():
        return _probe_folder(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")
    _check_riff_size(path)
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
                num_frames = _count_packets(path, container, stream, float(rate))
            if num_frames <= 0:
                raise VideoError(f"{path}: video stream holds no frames")
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / av.time_base
            else:
                duration = num_frames / float(rate)
            return VideoInfo(
                num_frames=int(num_frames),
                fps=float(rate),
                width=int(stream.codec_context.width),
                height=int(stream.codec_context.height),
                codec=stream.codec_context.name,
                duration=duration,
            )
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot be opened as video ({err})") from err


def _check_riff_size(path: Path) -> None:
    """An AVI file states its length in its first bytes (``RIFF <size> AVI ``); a shorter file was cut short and
    would probe as whole (the frame count is in the header) but fail to decode: :class:`VideoError`."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        declared, actual = int.from_bytes(head[4:8], "little") + 8, path.stat().st_size
        if actual < declared:
            raise VideoError(f"{path}: truncated: {actual} bytes of the {declared} its AVI header declares")


#: how far (seconds) the packets of a file without a frame count (Matroska, WebM) may end before the duration it
#: declares: the video track's own ``DURATION`` tag, or the container's duration, which an audio track may extend
_TRUNCATED_AFTER = {"track": 0.25, "container": 1.0}


def _count_packets(path: Path, container, stream, fps: float) -> int:
    """The frames of a stream whose container stores no count: its packets, demuxed (not decoded).

    A Matroska file cut short (a download stopped midway) still opens and demuxes up to the cut; it is told by
    its packets ending before the duration written in its header. Raises :class:`VideoError` then.
    """
    stamps = [packet.pts for packet in container.demux(stream) if packet.size]
    known = [pts for pts in stamps if pts is not None]
    declared = _declared_duration(container, stream)
    if known and declared is not None and stream.time_base:
        seen = float((max(known) - min(known)) * stream.time_base) + 1 / fps
        if declared[0] - seen > _TRUNCATED_AFTER[declared[1]]:
            raise VideoError(
                f"{path}: truncated: its {len(stamps)} frames end at {seen:.2f} s of the {declared[0]:.2f} s "
                f"its {'video track' if declared[1] == 'track' else 'container'} declares"
            )
    return len(stamps)


def _declared_duration(container, stream) -> tuple[float, str] | None:
    """``(seconds, "track" | "container")``: the stream's ``DURATION`` tag (``00:00:03.000000000``, written by
    FFmpeg's Matroska muxer), else the container's duration; ``None`` when neither is known."""
    tag = (stream.metadata or {}).get("DURATION", "")
    match = re.fullmatch(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", tag.strip())
    if match:
        return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]), "track"
    if container.duration:
        return container.duration / av.time_base, "container"
    return None


def _probe_folder(folder: Path) -> VideoInfo:
    """A frame folder: the highest frame number gives the count, the first JPEG's header the size."""
    numbers = [int(m.group(1)) for entry in os.scandir(folder) if (m := _FRAME_NAME.match(entry.name))]
    if not numbers:
        raise VideoError(f"{folder}: frame folder holds no frame_*.jpg files")
    first = frame_file(folder, min(numbers) - FIRST_FRAME_NUMBER)
    try:
        with Image.open(first) as image:
            width, height = image.size
    except OSError as err:
        raise VideoError(f"{first}: unreadable JPEG ({err})") from err
    return VideoInfo(
        num_frames=max(numbers) - FIRST_FRAME_NUMBER + 1, fps=math.nan, width=width, height=height, codec="jpeg"
    )


# ----------------------------------------------------------------------------------------------- decoding
def read_frames(source: str | Path, indices: list[int] | np.ndarray, seek: bool = True) -> np.ndarray:
    """Decode the frames at ``indices`` (0-based, any order, repeats allowed) as uint8 ``(T, H, W, 3)`` RGB.

    Args:
        source: a video file, or a frame folder of ``frame_%010d.jpg`` files (frame ``i`` is number ``i + 1``).
        indices: the frames wanted.
        seek: seek to the keyframe before the first wanted frame (exactness is checked, see the module notes);
            ``False`` decodes from the start of the file and counts frames.
    """
    source = Path(source)
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        raise VideoError(f"{source}: no frame indices requested")
    if wanted.min() < 0:
        raise VideoError(f"{source}: negative frame index {int(wanted.min())}")
    needed = sorted(set(wanted.tolist()))
    if source.is_dir():
        frames = _read_folder(source, needed)
    elif not source.is_file():
        raise VideoError(f"{source}: no such file")
    else:
        frames = _read_video(source, needed, seek)
    shapes = {frame.shape for frame in frames.values()}
    if len(shapes) > 1:
        raise VideoError(f"{source}: frames {needed[0]}..{needed[-1]} differ in size {sorted(shapes)}")
    return np.stack([frames[i] for i in wanted.tolist()])


def _read_folder(folder: Path, needed: list[int]) -> dict[int, np.ndarray]:
    frames = {}
    for index in needed:
        path = frame_file(folder, index)
        if not path.is_file():
            raise VideoError(f"{path}: frame {index} missing from the frame folder")
        try:
            with Image.open(path) as image:
                frames[index] = np.asarray(image.convert("RGB"))
        except OSError as err:
            raise VideoError(f"{path}: unreadable JPEG ({err})") from err
    return frames


def _read_video(path: Path, needed: list[int], seek: bool) -> dict[int, np.ndarray]:
    try:
        if seek and needed[0] > 0:
            with av.open(str(path)) as container:
                found = _decode_by_timestamp(container, needed)
            if found is not None:
                return found
        with av.open(str(path)) as container:
            return _decode_counting(path, container, needed)
    except (av.FFmpegError, IndexError) as err:
        raise VideoError(f"{path}: decoding failed ({err})") from err


def _video_stream(container):
    """The video stream, decoded on the calling thread only: every caller (an extract task, a DataLoader worker,
    a probe) already owns one core, and FFmpeg's frame threads then only contend for it (a clip cost 1.3x the
    CPU time with ``thread_type=AUTO`` on 2 busy cores, the same frames)."""
    stream = container.streams.video[0]
    stream.thread_type = "NONE"
    stream.codec_context.thread_count = 1
    return stream


def _frame_grid(container, stream, last: int) -> tuple[float, float, float] | None:
    """``(time_base, first_pts_seconds, fps)`` when the stream's timestamps can index frames, else ``None``.

    The rate must be constant: the container's frame count must equal its duration times the rate. The first
    frame's timestamp is the smallest pts among the first packets (B-frame reordering and AVI's derived
    timestamps can start it above the stream's ``start_time``).
    """
    rate = stream.average_rate
    if not rate or not stream.time_base:
        return None
    if not stream.frames:  # Matroska / WebM (SSv2, Kinetics): no frame count stored; every packet is checked
        return _grid_from_packets(container, stream, float(rate), last)
    if not stream.duration:
        return None
    if round(float(stream.duration * stream.time_base * rate)) != stream.frames:
        return None
    first_pts = []
    for packet in container.demux(stream):
        if packet.size:
            if packet.pts is None:
                return None
            first_pts.append(packet.pts)
        if len(first_pts) >= _REORDER_PACKETS:
            break
    if not first_pts:
        return None
    return float(stream.time_base), float(min(first_pts) * stream.time_base), float(rate)


def _grid_from_packets(container, stream, fps: float, last: int) -> tuple[float, float, float] | None:
    """``(time_base, first_pts_seconds, fps)`` when the timestamps of the packets up to frame ``last``, sorted,
    are the frames ``0, 1, ..., last`` of a constant-rate grid (within 5% of a frame: WebM stores milliseconds),
    else ``None``.

    Demuxing reads the packets without decoding them (the first 10 s of a video: about a millisecond), up to
    ``last`` plus the decoder's reordering window, so a clip early in a long file does not read all of it. A gap
    (a variable frame rate) or a packet that is no picture of its own (a VP8 alt-ref frame outside a
    superframe) breaks the sequence, and the caller counts frames from the start instead.
    """
    stamps = []
    for packet in container.demux(stream):
        if packet.size:
            if packet.pts is None:
                return None
            stamps.append(packet.pts)
            if len(stamps) > last + _REORDER_PACKETS:
                break
    if len(stamps) <= last:
        return None  # fewer frames than wanted: counting reports how many there are
    stamps.sort()
    time_base = float(stream.time_base)
    first = stamps[0] * time_base
    for index, pts in enumerate(stamps[: last + 1]):
        if abs((pts * time_base - first) * fps - index) > 0.05:
            return None
    return time_base, first, fps


def _decode_by_timestamp(container, needed: list[int]) -> dict[int, np.ndarray] | None:
    """Seek to the keyframe before ``needed[0]`` and decode up to ``needed[-1]``; ``None`` when not exact.

    A seek that lands on a picture after the first wanted frame, or on a picture that is not a keyframe, is
    retried from further back.
    """
    stream = _video_stream(container)
    grid = _frame_grid(container, stream, needed[-1])
    if grid is None:
        return None
    time_base, start, fps = grid
    first = needed[0]
    for backoff in _SEEK_BACKOFF:
        target = start + first / fps - backoff
        if target <= start:
            return None  # as far back as the start: counting from there is as fast
        container.seek(int(math.floor(target / time_base)), stream=stream, backward=True, any_frame=False)
        frames = _decode_on_grid(container, stream, needed, time_base, start, fps)
        if frames is not _OVERSHOT:
            return frames
    return None


_OVERSHOT = object()


def _decode_on_grid(container, stream, needed, time_base, start, fps):
    """Decode from the current position, indexing frames by timestamp.

    Returns the frames, ``_OVERSHOT`` when decoding starts after the first wanted frame or not on a keyframe,
    or ``None`` when the timestamps do not index frames exactly.
    """
    first, last, wanted = needed[0], needed[-1], set(needed)
    frames, previous = {}, None
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        position = (frame.pts * time_base - start) * fps
        index = round(position)
        if abs(position - index) > 0.05 or index < 0:
            return None  # off the frame grid
        if previous is None and (index > first or not frame.key_frame):
            return _OVERSHOT
        if previous is not None and index != previous + 1:
            return None  # frames missing or out of order
        previous = index
        if index in wanted:
            frames[index] = frame.to_ndarray(**_TO_RGB)
        if index >= last:
            return frames
    return None  # ended early: counting decides, and reports how many frames there are


def _decode_counting(path: Path, container, needed: list[int]) -> dict[int, np.ndarray]:
    """Decode from the start and count frames up to ``needed[-1]``."""
    stream = _video_stream(container)
    last, wanted = needed[-1], set(needed)
    frames, decoded = {}, 0
    for position, frame in enumerate(container.decode(stream)):
        decoded = position + 1
        if position in wanted:
            frames[position] = frame.to_ndarray(**_TO_RGB)
        if position >= last:
            return frames
    raise VideoError(f"{path}: frame {last} requested but only {decoded} frames could be decoded")


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
    skipped_pts: set[int] | None = None,
    **options: str,
) -> None:
    """Write uint8 ``(T, H, W, 3)`` RGB frames as a video file (used by the synthetic dataset and tests).

    ``skipped_pts``: frame-grid timestamps left out, so that frame ``i`` is not at ``i / fps`` (a variable frame
    rate, as some phone and screen recordings have; test material for the decoder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(round(fps)) if math.isclose(fps, round(fps)) else Fraction(fps).limit_denominator(1001)
    stamps = [p for p in range(len(frames) + len(skipped_pts)) if p not in skipped_pts] if skipped_pts else None
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {k: str(v) for k, v in options.items()}
        if stamps:
            stream.codec_context.time_base = 1 / rate
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if stamps:
                frame.pts, frame.time_base = stamps[i], 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
