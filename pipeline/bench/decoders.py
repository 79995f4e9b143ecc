"""torchcodec (exact seek mode) against the project's PyAV seek (:func:`pipeline.data.video.read_frames`) on the
same clips: clips/s, and whether every frame is the right one.

Videos: the decoding tests' kinds (H.264 MP4 at 59.94 fps with B-frames, MPEG-4 AVI at 29.97 and 25 fps, a
variable-frame-rate MKV), 150 frames of a panning texture (every frame distinct), and the synthetic dataset's
H.264 videos. Clips: 16 frames, stride 1 and 2, spread over each video. Truth: PyAV decoding the whole file and
counting frames. A frame is *right* when it is nearer (mean absolute difference) to the true frame than to
either neighbour; the colour conversion of the two libraries may differ by a few levels, reported as the
largest absolute difference. torchcodec needs FFmpeg's shared libraries (4 to 8) on the system; PyAV's wheels
bring their own, so without them the table says torchcodec cannot load.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import av
import numpy as np

from pipeline.data.datasets.synthetic import SyntheticSpec, generate
from pipeline.data.video import read_frames, write_video


def _panning(n: int, height: int = 72, width: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    canvas = (rng.integers(0, 256, size=(height, width + n, 3)).astype(np.float32) * 0.5 + 64).astype(np.uint8)
    return np.stack([canvas[:, i : i + width] for i in range(n)])


def videos(root: Path, quick: bool) -> dict[str, list[Path]]:
    frames = _panning(150)
    kinds = {
        "H.264 MP4 59.94 fps, B-frames": (".mp4", dict(fps=60000 / 1001, g="24", bf="3", crf="20", preset="veryfast")),
        "MPEG-4 AVI 29.97 fps": (".avi", dict(fps=30000 / 1001, codec="mpeg4", g="20", bf="2", qscale="3")),
        "MPEG-4 AVI 25 fps": (".avi", dict(fps=25, codec="mpeg4", g="12")),
    }
    out = {}
    for i, (name, (suffix, options)) in enumerate(kinds.items()):
        out[name] = [root / f"kind{i}{suffix}"]
        write_video(out[name][0], frames, **options)
    out["VFR MKV (timestamps skip)"] = [root / "vfr.mkv"]
    write_video(out["VFR MKV (timestamps skip)"][0], frames[:60], 25, skipped_pts={10, 11, 30})
    data = generate(root / "synthetic", SyntheticSpec(groups=1, clips_per_group=3 if quick else 10), progress=False)
    out["synthetic dataset (H.264 MP4)"] = sorted(data.rglob("*.mp4"))
    return out


def clips(path: Path, count: int) -> list[list[int]]:
    with av.open(str(path)) as container:
        total = sum(1 for _ in container.decode(video=0))
    found = []
    for stride in (1, 2):
        span = 15 * stride + 1
        for start in np.linspace(0, max(total - span, 0), count).round().astype(int):
            found.append([min(int(start) + k * stride, total - 1) for k in range(16)])
    return found


def torchcodec_reader():
    """``read(path, indices)`` with torchcodec's exact seek mode, or the reason it cannot load."""
    try:
        from torchcodec.decoders import VideoDecoder

        def read(path, indices):
            decoder = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
            return decoder.get_frames_at(list(indices)).data.numpy()

        return read, None
    except Exception as err:  # not installed, or FFmpeg's shared libraries missing
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def _attempt(read, path, indices):
    """The decoded clip, or the error's text (a clip one decoder cannot read is counted, not fatal)."""
    try:
        return read(path, indices)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def _right(frames: np.ndarray, indices: list[int], truth: list[np.ndarray]) -> tuple[int, int]:
    """How many frames are nearer to their true frame than to its neighbours, and the largest difference."""
    right, worst = 0, 0
    for frame, i in zip(frames.astype(np.int16), indices):
        near = {j: np.abs(frame - truth[j]).mean() for j in (i - 1, i, i + 1) if 0 <= j < len(truth)}
        right += min(near, key=near.get) == i
        worst = max(worst, int(np.abs(frame - truth[i]).max()))
    return right, worst


def run(out_dir: Path, quick: bool) -> str:
    codec_read, why = torchcodec_reader()
    readers = {"PyAV seek (read_frames)": read_frames}
    if codec_read is not None:
        readers["torchcodec exact seek"] = codec_read
    lines = [
        "## Decoders (`decoders`): torchcodec vs PyAV seek",
        "",
        "16-frame clips (stride 1 and 2) spread over each video; right = nearest to the frame a whole-file PyAV "
        "decode counts at that index; max diff = largest pixel difference to it (colour conversion).",
        "",
        "| videos | decoder | clips | clips/s | right frames | max diff | clips failed |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, paths in videos(Path(tmp), quick).items():
            work = [(p, c) for p in paths for c in clips(p, 3 if quick else 8)]
            truth = {}
            for p in paths:
                with av.open(str(p)) as container:
                    truth[p] = [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(video=0)]
            for name, read in readers.items():
                _attempt(read, *work[0])  # warm-up (library loading)
                started = time.perf_counter()
                decoded = [_attempt(read, p, c) for p, c in work]
                seconds = time.perf_counter() - started
                checks = [_right(f, c, truth[p]) for f, (p, c) in zip(decoded, work) if not isinstance(f, str)]
                errors = sorted({f for f in decoded if isinstance(f, str)})
                right, frames = sum(r for r, _ in checks), sum(len(c) for _, c in work)
                lines.append(
                    f"| {kind} | {name} | {len(work)} | {len(work) / seconds:.0f} | {right}/{frames} "
                    f"| {max((w for _, w in checks), default='-')} | {len(work) - len(checks)} {'; '.join(errors)} |"
                )
    if why:
        lines += ["", f"torchcodec could not load here: {why}."]
    return "\n".join([*lines, ""])
