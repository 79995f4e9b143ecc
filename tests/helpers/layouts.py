"""Test helpers: frames that carry their own index as a barcode, and small datasets in the published layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from helpers.config import make_cfg
from pipeline.data.video import write_video
from pipeline.stages import index
from pipeline.store import read_index


def run_index(tmp_path: Path, overrides: list[str]):
    """Run the real index stage with the project's config plus ``overrides``: (index rows, metadata, run dir)."""
    cfg = make_cfg(tmp_path, overrides)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    index.run(cfg, run_dir)
    return (*read_index(run_dir), run_dir)


BITS = 10  # frame indices up to 1023
BLOCK = 8  # barcode block size in pixels (large enough to survive lossy coding)


def barcode_frames(n: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """``n`` frames whose top band encodes the frame index in binary; the rest is a slowly panning texture."""
    assert width >= BITS * BLOCK and n < 2**BITS
    rng = np.random.default_rng(seed)
    texture = rng.integers(60, 190, size=(height, width + n, 3), dtype=np.uint8)
    frames = np.stack([texture[:, i : i + width] for i in range(n)])
    for i in range(n):
        frames[i, :BLOCK] = 0
        for bit in range(BITS):
            if (i >> bit) & 1:
                frames[i, :BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 255
    return frames


def read_barcode(frame: np.ndarray) -> int:
    """The index a frame of :func:`barcode_frames` carries (read from the centre of each block)."""
    band = frame[1 : BLOCK - 1].astype(np.float32).mean(axis=(0, 2))
    bits = [band[bit * BLOCK + 2 : (bit + 1) * BLOCK - 2].mean() > 128 for bit in range(BITS)]
    return sum(1 << bit for bit, on in enumerate(bits) if on)


def write_frame_folder(folder: Path, frames: np.ndarray) -> None:
    """EPIC-Kitchens style: video frame ``i`` saved as ``frame_{i + 1:010d}.jpg``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(frames):
        Image.fromarray(image).save(folder / f"frame_{i + 1:010d}.jpg", quality=92)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(str(v) for v in row) for row in rows]) + "\n")


# ------------------------------------------------------------------------------------------------ EPIC-Kitchens
EPIC_FPS = 60000 / 1001
EPIC_VERBS = ["take", "put", "open"]
EPIC_NOUNS = ["cup", "plate", "knife", "door"]
EPIC_100_COLUMNS = [
    "narration_id",
    "participant_id",
    "video_id",
    "narration_timestamp",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "narration",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
]
EPIC_100_TEST_COLUMNS = [
    "narration_id",
    "participant_id",
    "video_id",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
]
EPIC_55_COLUMNS = [
    "uid",
    "participant_id",
    "video_id",
    "narration",
    "start_timestamp",
    "stop_timestamp",
    "start_frame",
    "stop_frame",
    "verb",
    "verb_class",
    "noun",
    "noun_class",
    "all_nouns",
    "all_noun_classes",
]
#: video id -> frame count of the test videos (P01_01 and P01_02 exist as MP4 and as frame folders)
EPIC_VIDEOS = {"P01_01": 120, "P01_02": 90}


def _stamp(frame) -> str:
    seconds = (int(frame) - 1) / EPIC_FPS if str(frame).isdigit() else 0.0
    return f"00:00:{seconds:05.2f}"


def epic_row(narration_id, video_id, start, stop, verb, noun, columns=EPIC_100_COLUMNS):
    """One EPIC action CSV row in the release's column order (frames are 1-based, both ends included)."""
    values = dict(
        narration_id=narration_id,
        uid=narration_id,
        participant_id=video_id[:3],
        video_id=video_id,
        narration_timestamp=_stamp(start),
        start_timestamp=_stamp(start),
        stop_timestamp=_stamp(stop),
        start_frame=start,
        stop_frame=stop,
        narration=f"{EPIC_VERBS[verb] if verb < 3 else 'x'} thing",
        verb=EPIC_VERBS[verb] if verb < 3 else "x",
        verb_class=verb,
        noun=EPIC_NOUNS[noun] if noun < 4 else "y",
        noun_class=noun,
        all_nouns=f"\"['{EPIC_NOUNS[noun] if noun < 4 else 'y'}']\"",
        all_noun_classes=f'"[{noun}]"',
    )
    return [values[c] for c in columns]


def make_epic_media(root: Path) -> None:
    """MP4 videos (H.264 with B-frames at 59.94 fps) and JPEG frame folders of the same frames."""
    for k, (video_id, n) in enumerate(EPIC_VIDEOS.items()):
        frames = barcode_frames(n, height=72, width=128, seed=k)
        write_video(
            root / "P01" / "videos" / f"{video_id}.MP4",
            frames,
            fps=EPIC_FPS,
            g="30",
            bf="3",
            crf="18",
            preset="veryfast",
        )
        write_frame_folder(root / "P01" / "rgb_frames" / video_id, frames)


def make_epic100_annotations(folder: Path) -> None:
    write_csv(
        folder / "EPIC_100_verb_classes.csv",
        ["id", "key", "instances", "category"],
        [[i, v, f"\"['{v}']\"", "manipulation"] for i, v in enumerate(EPIC_VERBS)],
    )
    write_csv(
        folder / "EPIC_100_noun_classes.csv",
        ["id", "key", "instances", "category"],
        [[i, n, f"\"['{n}']\"", "cutlery"] for i, n in enumerate(EPIC_NOUNS)],
    )
    write_csv(
        folder / "EPIC_100_video_info.csv",
        ["video_id", "duration", "fps", "resolution"],
        [[v, round(n / EPIC_FPS, 3), EPIC_FPS, "128x72"] for v, n in EPIC_VIDEOS.items()],
    )
    write_csv(
        folder / "EPIC_100_train.csv",
        EPIC_100_COLUMNS,
        [
            epic_row("P01_01_0", "P01_01", 11, 40, 0, 0),  # take cup: frames [10, 40)
            epic_row("P01_01_1", "P01_01", 61, 120, 1, 1),  # put plate: up to the last frame
            epic_row("P01_02_0", "P01_02", 1, 3, 2, 3),  # open door: 3 frames, padded
            epic_row("P01_02_1", "P01_02", 50, 89, 0, 1),  # take plate
        ],
    )
    write_csv(
        folder / "EPIC_100_validation.csv",
        EPIC_100_COLUMNS,
        [
            epic_row("P01_02_5", "P01_02", 21, 60, 0, 0),  # take cup (pair seen in train)
            epic_row("P01_02_6", "P01_02", 61, 80, 2, 2),  # open knife (pair never in train)
        ],
    )
    write_csv(
        folder / "EPIC_100_test_timestamps.csv",
        EPIC_100_TEST_COLUMNS,
        [
            ["P01_01_9", "P01", "P01_01", _stamp(31), _stamp(70), 31, 70],
        ],
    )


# ------------------------------------------------------------------------------------------------ UCF-101
UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball"]
#: relative path -> (fps, frames, with audio)
UCF_VIDEOS = {
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": (25.0, 40, False),
    "Archery/v_Archery_g01_c01.avi": (30000 / 1001, 45, True),
    "Archery/v_Archery_g09_c02.avi": (25.0, 30, False),
    "Basketball/v_Basketball_g02_c04.avi": (30000 / 1001, 36, True),
}


def write_avi(path: Path, frames: np.ndarray, fps: float, audio: bool) -> None:
    """An XviD-like AVI: MPEG-4 Part 2 video, optionally with a PCM audio track interleaved."""
    if not audio:
        write_video(path, frames, fps=fps, codec="mpeg4", qscale="2")
        return
    from fractions import Fraction

    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"qscale": "2"}
        sound = container.add_stream("pcm_s16le", rate=16000)
        samples_per_frame = round(16000 / fps)
        for i, image in enumerate(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
            tone = (3000 * np.sin(np.arange(samples_per_frame) * 0.05 + i)).astype(np.int16)[None]
            chunk = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, i * samples_per_frame
            for packet in sound.encode(chunk):
                container.mux(packet)
        for stream in (video, sound):
            for packet in stream.encode():
                container.mux(packet)


def make_ucf101(root: Path, splits: Path) -> None:
    """Videos in ``root/<Class>/`` (320x240 mpeg4 AVI) and ``classInd.txt`` + folds 1 and 2 in ``splits``."""
    for k, (relative, (fps, n, audio)) in enumerate(UCF_VIDEOS.items()):
        write_avi(root / relative, barcode_frames(n, height=240, width=320, seed=k), fps, audio)
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "classInd.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(UCF_CLASSES, start=1)))
    names = list(UCF_VIDEOS)
    number = {name: UCF_CLASSES.index(name.split("/")[0]) + 1 for name in names}
    (splits / "trainlist01.txt").write_text("".join(f"{n} {number[n]}\r\n" for n in names[:3]))
    (splits / "testlist01.txt").write_text(f"{names[3]}\r\n")
    (splits / "trainlist02.txt").write_text("".join(f"{n} {number[n]}\r\n" for n in names[2:]))
    (splits / "testlist02.txt").write_text("".join(f"{n}\r\n" for n in names[:2]))
